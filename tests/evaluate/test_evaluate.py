"""Evaluation: order contract, determinism, distributed FRDist, baselines, report, MLflow.

Real local Ray (actor-pool generation, FRDist tasks), a tiny snapshot (6 directed items, 751
frames, a non-trivial neighbour matrix) and a tiny untrained generator; real MLflow sqlite.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.evaluate import predictions, protocol, records
from pipeline.evaluate import scoring as ev
from pipeline.evaluate.scoring import EvalOptions
from tests.helpers.models import tiny_generator
from tests.helpers.snapshots import GENERATOR, write_tiny_snapshot

SAMPLES, STEPS = 2, 1


@pytest.fixture(scope="module")
def generated(ray_local, tiny_snapshot, tmp_path_factory):
    """One generation over Ray (batches of 2 items) with predictions saved as Parquet."""
    path = str(tmp_path_factory.mktemp("eval") / "predictions.parquet")
    gen = tiny_generator(0, GENERATOR, random_stats=True)
    options = EvalOptions(samples=SAMPLES, steps=STEPS, seed=7, batch_size=2, actors=1, frdist_tasks=3)
    report = ev.evaluate_generator(gen, tiny_snapshot, "val", options, baselines=("gt", "mime"),
                                   save_predictions=path)
    return gen, report, path


def direct_predictions(gen, snapshot, seed: int, which: list[int]) -> np.ndarray:
    """Items ``which``, one by one in this process, with the documented per-item seeds."""
    import torch

    items = [snapshot.items("val")[k] for k in which]
    feats = snapshot.load_clips([i.speaker for i in items], list(gen.feature_widths))
    out = []
    for item in items:
        x = {k: torch.tensor(v[None]) for k, v in feats[item.speaker].items()}
        r = gen.generate(x, num_samples=SAMPLES, steps=STEPS, seed=protocol.item_seed(seed, item.index))
        out.append(r.emotion[0].numpy())
    return np.stack(out)


def test_metrics_equal_compute_all_on_the_same_predictions(generated, tiny_snapshot):
    from reactdiff import metrics as M

    gen, report, path = generated
    saved = predictions.read_predictions(path)
    # order contract + partition-independent seeds: what the actor made in batches of 2 equals
    # items generated alone in this process (an original and a mirrored item, in another batch)
    assert saved.shape == (6, SAMPLES, 750, 25)
    np.testing.assert_allclose(saved[[1, 4]], direct_predictions(gen, tiny_snapshot, 7, [1, 4]), rtol=0, atol=1e-5)
    assert not np.allclose(saved[1], saved[4])

    items = tiny_snapshot.items("val")
    listener, speaker = protocol.ground_truth(tiny_snapshot, items)
    assert np.array_equal(listener[0], tiny_snapshot.load_clips([items[0].listener], ["emotion"])
                          [items[0].listener]["emotion"][:750])
    expected = M.compute_all(saved, listener, speaker, tiny_snapshot.neighbours("val"))
    assert report.metrics == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected["FRDist"] == report.metrics["FRDist"]            # distributed FRDist: bit for bit

    assert report.counts["items"] == 6 and report.samples == SAMPLES and report.seed == 7
    assert {"generate", "FRCorr", "FRDist", "FRSyn", "gt.FRDist", "mime.FRCorr"} <= set(report.timings)
    assert report.predictions_uri == path


def test_baseline_rows_gt_and_mime(generated):
    _, report, _ = generated
    gt, mime = report.baselines["gt"], report.baselines["mime"]
    assert gt["FRDist"] == 0.0 and gt["FRDiv"] == 0.0 and mime["FRDiv"] == 0.0
    # bidirectional items: Mime's sequences are GT's sequences (metrics.md §6)
    assert mime["FRVar"] == pytest.approx(gt["FRVar"]) and mime["FRDvs"] == pytest.approx(gt["FRDvs"])
    assert gt["FRCorr"] > mime["FRCorr"] and mime["FRDist"] > 0
    table = report.table()
    assert "Ground truth" in table and "Mime" in table and "FRDist ↓" in table


def test_distributed_frdist_equals_single_process(ray_local):
    from reactdiff import metrics as M

    rng = np.random.default_rng(0)
    n = 7
    pred = rng.random((n, 3, 750, 25), dtype=np.float32)
    listener = rng.random((n, 750, 25), dtype=np.float32)
    neighbours = (rng.random((n, n)) < 0.3).astype(np.uint8)
    np.fill_diagonal(neighbours, 1)
    single = M.frdist(pred, listener, neighbours)
    for tasks in (1, 3, 7):
        assert ev.frdist_distributed(pred, listener, neighbours, tasks=tasks) == single
    # a broadcast baseline travels as one sample and is re-broadcast in the task
    gt = M.baseline_predictions("mime", listener, pred[:, 0], num_samples=3)
    assert ev.frdist_distributed(gt, listener, neighbours, tasks=2) == M.frdist(gt, listener, neighbours)


def test_predictions_parquet_contract(tmp_path, ray_local):
    import ray

    rng = np.random.default_rng(1)
    pred = rng.random((4, 2, 751, 25), dtype=np.float32)
    # canonical fixed_shape_tensor, rows out of order
    predictions.write_predictions(str(tmp_path / "a.parquet"), pred[[2, 0, 3, 1]], items=[2, 0, 3, 1])
    assert np.array_equal(predictions.read_predictions(str(tmp_path / "a.parquet")), pred[:, :, :750])
    assert np.array_equal(predictions.read_predictions(str(tmp_path / "a.parquet"), items=[3, 1]), pred[[3, 1], :, :750])
    # what Ray Data's write_parquet makes of an ndarray column: a folder of files, Ray's tensor type
    rows = [{"item": i, "emotion": pred[i], "speaker": f"s{i}"} for i in range(4)]
    ray.data.from_items(rows).write_parquet(str(tmp_path / "ray"))
    assert np.array_equal(predictions.read_predictions(str(tmp_path / "ray")), pred[:, :, :750])
    # one row per (item, sample)
    per_sample = [{"item": i, "sample": s, "emotion": pred[i, s]} for i in range(4) for s in (1, 0)]
    ray.data.from_items(per_sample).write_parquet(str(tmp_path / "per_sample"))
    assert np.array_equal(predictions.read_predictions(str(tmp_path / "per_sample")), pred[:, :, :750])
    # missing and duplicated items are errors, never silently misaligned
    with pytest.raises(ValueError, match="1 of 4 items are missing"):
        predictions.read_predictions(str(tmp_path / "a.parquet"), items=[0, 1, 2, 5])
    predictions.write_predictions(str(tmp_path / "dup.parquet"), pred[[0, 0, 1]], items=[0, 0, 1])
    with pytest.raises(ValueError, match="appears 2 times"):
        predictions.read_predictions(str(tmp_path / "dup.parquet"))


def test_quarantined_clip_drops_its_items(tmp_path):
    from pipeline.data.snapshot import Snapshot

    snap = Snapshot.open(write_tiny_snapshot(str(tmp_path), quarantined=("NoXI/001_session/Novice_video/1",)))
    items, neighbours, dropped = protocol.split_items(snap, "val")
    assert dropped == 2 and [i.index for i in items] == [0, 2, 3, 5]     # dyad 1 and its mirror
    # the one rule, shared with `reactdiff generate --split`: a quarantined speaker *or* listener
    assert protocol.available_items(snap, "val", snap.items("val")) == [0, 2, 3, 5]
    full = snap.neighbours("val")
    assert np.array_equal(neighbours, full[np.ix_([0, 2, 3, 5], [0, 2, 3, 5])])


def test_evaluate_job_scores_saved_predictions_and_logs_to_mlflow(generated, tiny_snapshot, registered, workdir,
                                                                   tmp_path, ray_local):
    """--model models:/reactdiff/1 --predictions FILE: JSON report + metrics on the version's run;
    without --model: a new run in experiment reactdiff-eval (with the baseline rows)."""
    import mlflow

    from jobs.cli import main

    _, report, path = generated
    out = tmp_path / "report.json"
    code = main(["evaluate", "--model", "models:/reactdiff/1", "--predictions", path, "--baseline", "gt",
                 "--out", str(out), "--set", "frdist_tasks=2"])
    assert code == 0
    written = json.loads(out.read_text())
    assert written["metrics"] == pytest.approx(report.metrics)
    assert written["baselines"]["gt"]["FRDist"] == 0.0 and set(written["baselines"]) == {"gt"}
    assert written["model_version"] == "1" and written["snapshot_id"] == tiny_snapshot.id
    assert written["split"] == "val" and written["samples"] == SAMPLES and written["binarize"] is False
    assert {"read_predictions", "FRDist", "gt.FRDist"} <= set(written["timings"])

    c = mlflow.MlflowClient()
    run = c.get_run(registered.versions[0].run_id)
    assert run.data.metrics["val_FRCorr"] == pytest.approx(report.metrics["FRCorr"])
    assert run.data.metrics["val_FRDist"] == pytest.approx(report.metrics["FRDist"])

    out2 = tmp_path / "report2.json"
    assert main(["evaluate", "--predictions", path, "--features", tiny_snapshot.uri, "--baseline", "mime",
                 "--out", str(out2), "--binarize"]) == 0
    exp = c.get_experiment_by_name("reactdiff-eval")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert runs[0].data.metrics["val_mime_FRDiv"] == 0.0 and "val_FRSyn" in runs[0].data.metrics
    assert json.loads(out2.read_text())["binarize"] is True
    # a predictions file that does not fit the split is a clear error (exit 1), not a crash
    assert main(["evaluate", "--predictions", str(tmp_path / "nope.parquet"),
                 "--features", tiny_snapshot.uri]) == 1


def test_promotion_with_real_evaluations(registered, tiny_snapshot, ray_local, monkeypatch):
    """First model becomes champion; the second is gated on the same items and seeds, the
    champion's metrics come from its cached evaluation, and the decision matches the gate."""
    from pipeline.registry import promote as P

    calls = []
    real = ev.evaluate_generator

    def spy(*args, **kwargs):
        calls.append(kwargs["model_uri"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate_generator", spy)
    options = EvalOptions(samples=SAMPLES, steps=STEPS, max_items=4, frdist_tasks=2, actors=1, batch_size=4)
    first = P.promote(P.PromoteConfig(candidate="1", evaluation=options))
    assert first.decision == "first" and calls == ["models:/reactdiff/1"]
    second = P.promote(P.PromoteConfig(candidate="2", evaluation=options))
    assert calls == ["models:/reactdiff/1", "models:/reactdiff/2"]          # v1 not evaluated again
    assert second.champion_metrics == pytest.approx(first.candidate_metrics)
    expected = P.apply_gate(P.default_gate(), second.candidate_metrics, second.champion_metrics).passed
    assert second.decision == ("promoted" if expected else "refused")
    import mlflow

    champion = mlflow.MlflowClient().get_model_version_by_alias("reactdiff", "champion")
    assert str(champion.version) == ("2" if expected else "1")


def test_decoder_dropout_is_an_option_and_is_recorded(generated, tiny_snapshot):
    """The reference samples with the frozen decoder's dropout on (model.md §4.2): an evaluation
    option, reproducible for a seed, recorded with the latent normalisation in the report."""
    gen, off, _ = generated
    assert (off.decoder_dropout, off.latent_normalisation, off.architecture) == (False, "exact", "reference")
    options = EvalOptions(samples=SAMPLES, steps=STEPS, seed=7, batch_size=3, actors=1, frdist_tasks=2,
                          decoder_dropout=True)
    on = ev.evaluate_generator(gen, tiny_snapshot, "val", options, baselines=())
    again = ev.evaluate_generator(gen, tiny_snapshot, "val", options, baselines=())
    assert on.decoder_dropout is True and "decoder dropout on" in on.table()
    assert on.metrics != off.metrics and on.metrics == again.metrics
    # promotion's metric cache keys on the protocol: dropout on and off are different protocols
    assert records.evaluation_tag("val", "s", EvalOptions(decoder_dropout=True)) != records.evaluation_tag(
        "val", "s", EvalOptions())


def test_guidance_is_an_option_and_is_recorded(generated, tiny_snapshot):
    """Classifier-free guidance: the model's own scale by default, another one on request, the one
    used recorded in the report; the option changes the protocol (and so promotion's cache key)."""
    gen, own, _ = generated
    assert own.guidance == gen.config.diffusion.guidance == 1.0
    gen = copy.deepcopy(gen)
    torch.manual_seed(3)
    with torch.no_grad():    # untrained, the zero-initialised UNet ignores its condition: wake it
        for p in gen.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    options = EvalOptions(samples=SAMPLES, steps=STEPS, seed=7, batch_size=3, actors=1, frdist_tasks=2, guidance=2.5)
    guided = ev.evaluate_generator(gen, tiny_snapshot, "val", options, baselines=())
    assert guided.guidance == 2.5 and "guidance 2.5" in guided.table()
    assert guided.metrics != ev.evaluate_generator(gen, tiny_snapshot, "val", dataclasses.replace(
        options, guidance=None), baselines=()).metrics
    assert records.evaluation_tag("val", "s", EvalOptions(guidance=2.5)) != records.evaluation_tag(
        "val", "s", EvalOptions())
    with pytest.raises(ConfigError, match="guidance must be >= 0"):
        EvalOptions(guidance=-1.0).validate()
    with pytest.raises(ConfigError, match="steps must be >= 1"):     # the same check as generate's
        EvalOptions(steps=0).validate()
