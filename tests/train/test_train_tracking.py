"""MLflow run lifecycle helpers (pipeline/registry/runs.py): resume-safe epoch logging, params, plots."""

from __future__ import annotations

import numpy as np

from pipeline import plots
from pipeline.registry import runs as tracking


def _history(epochs, offset=0.0):
    return [{"epoch": e, "train/loss": 1.0 / e + offset, "val/loss": 2.0 / e + offset} for e in epochs]


def test_epoch_history_is_logged_once_even_when_replayed_after_a_restart(mlflow_uri):
    run_id = tracking.create_run(run_name="resume")
    first = tracking.EpochLogger(run_id)
    assert first.log_history(_history([1, 2])) == [1, 2]
    # a restarted rank 0 replays the checkpoint's history (epochs 1-2) and adds epoch 3 ...
    again = tracking.EpochLogger(run_id)
    assert again.last_logged_epoch() == 2
    assert again.log_history(_history([1, 2, 3], offset=10.0)) == [3]
    assert again.log_epoch(3, {"train/loss": 0.0}) is False
    c = tracking.client()
    for key in ("epoch", "train/loss", "val/loss"):
        assert sorted(m.step for m in c.get_metric_history(run_id, key)) == [1, 2, 3]
    # ... and the values MLflow kept for 1-2 are the first ones (the checkpoint's), not duplicates
    losses = {m.step: m.value for m in c.get_metric_history(run_id, "train/loss")}
    assert losses[1] == 1.0 and losses[3] == 1.0 / 3 + 10.0


def test_params_of_a_resumed_run_keep_their_first_value_and_record_changes(mlflow_uri):
    run_id = tracking.create_run(run_name="p", params={"stage1.epochs": 1, "preset": "small", "model.x": None})
    tracking.reopen_run(run_id, params={"stage1.epochs": 3, "preset": "small", "new": "yes"})
    run = tracking.client().get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params["stage1.epochs"] == "1" and run.data.params["new"] == "yes"
    assert run.data.tags["reactdiff.param_changed.stage1.epochs"] == "1 -> 3"
    assert "reactdiff.param_changed.preset" not in run.data.tags


def test_snapshot_input_lineage_is_recorded_once(mlflow_uri):
    run_id = tracking.create_run(run_name="lineage")
    for _ in range(2):
        tracking.log_snapshot_input(run_id, "s3://bucket/snapshots/20260101T000000Z-abc", "20260101T000000Z-abc",
                                    "abc" * 20, columns=["video_pixels", "emotion"])
    inputs = tracking.client().get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "20260101T000000Z-abc" and ds.digest == ("abc" * 20)[:36] and ds.source_type == "s3"
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"


def test_sqlite_experiments_keep_artifacts_next_to_the_database(mlflow_uri, tmp_path):
    exp_id = tracking.ensure_experiment("reactdiff-x")
    location = tracking.client().get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "mlartifacts").resolve().as_uri()
    assert tracking.ensure_experiment("reactdiff-x") == exp_id


def test_find_runs_by_tags_newest_first(mlflow_uri):
    a = tracking.create_run(run_name="a", tags={"reactdiff.stage": "autoencoder", "reactdiff.snapshot_id": "s1"})
    b = tracking.create_run(run_name="b", tags={"reactdiff.stage": "autoencoder", "reactdiff.snapshot_id": "s1"})
    tracking.create_run(run_name="c", tags={"reactdiff.stage": "autoencoder", "reactdiff.snapshot_id": "s2"})
    tracking.finish_run(a)
    found = tracking.find_runs({"reactdiff.stage": "autoencoder", "reactdiff.snapshot_id": "s1"})
    assert [r.info.run_id for r in found] == [b, a]
    assert [r.info.run_id for r in tracking.find_runs({"reactdiff.snapshot_id": "s1"}, status="FINISHED")] == [a]


def test_using_scopes_the_store_and_restores_the_environment(mlflow_uri, tmp_path, monkeypatch):
    import mlflow

    import os

    other, third = (f"sqlite:///{tmp_path / name}" for name in ("other.db", "third.db"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", third)      # environment and global MLflow URI differ
    with tracking.using(other) as uri:
        assert uri == other and tracking.tracking_uri() == other and mlflow.get_tracking_uri() == other
        assert os.environ["MLFLOW_TRACKING_URI"] == other   # Ray workers started here inherit it
    assert os.environ["MLFLOW_TRACKING_URI"] == third and mlflow.get_tracking_uri() == mlflow_uri


def test_plots_render_to_png():
    history = _history([1, 2, 3]) + [{"epoch": 3, "val/FRCorr": 0.2}]
    png = plots.figure_png(plots.loss_curve_figure(history, title="run"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rng = np.random.default_rng(0)
    fig = plots.plot_reactions(rng.random((3, 100, 25)), rng.random((100, 25)), real_emotion=rng.random((100, 25)))
    assert plots.figure_png(fig)[:4] == b"\x89PNG"
