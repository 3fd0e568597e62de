"""Both stages on real local Ray (2 Train workers), Parquet snapshot and checkpoints on moto S3,
MLflow on sqlite: resume by name, worker-failure recovery, exports, registry."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.helpers.training import FRAMES, load_config, tiny_overrides

pytestmark = pytest.mark.slow


def _client(uri):
    import mlflow

    return mlflow.MlflowClient(uri, registry_uri=uri)


def _steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def _artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(_artifacts(client, run_id, a.path) if a.is_dir else [a.path])
    return out


def test_stage1_resumes_by_name_and_after_a_worker_failure(stage1, train_mlflow, train_storage):
    from pipeline import storage

    first, second = stage1
    assert (first.epoch, second.epoch) == (1, 2)
    assert first.name == second.name == "tiny-autoencoder"
    assert first.mlflow_run_id == second.mlflow_run_id          # the re-run continued the same MLflow run
    # rank 1 really failed once at epoch 2 (the marker is written just before it raises) ...
    assert storage.exists(storage.join(train_storage, "tiny-autoencoder", "_debug", "failed_at_epoch0002"))
    # ... and yet every epoch is in MLflow exactly once, for every metric
    c = _client(train_mlflow)
    for key in ("epoch", "train/loss", "val/loss", "time/data_wait_fraction"):
        assert _steps(c, first.mlflow_run_id, key) == [1, 2], key
    run = c.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["reactdiff.param_changed.stage1.epochs"] == "1 -> 2"
    assert run.data.params["stage1.epochs"] == "1"               # first value kept, change recorded as a tag
    assert float(run.data.params["resolved.lr"]) == pytest.approx(1e-3)   # the small preset's reference-style lr


def test_stage1_exports_autoencoder_with_train_statistics(stage1, train_snapshot, train_mlflow):
    from pipeline.registry.models import load_generator_file
    from pipeline.data.snapshot import Snapshot

    result = stage1[1]
    snap = Snapshot.open(train_snapshot)
    assert result.output_uri.startswith("s3://") and result.output_uri.endswith("/autoencoder.pt")
    gen = load_generator_file(result.output_uri)
    # every train clip folded into the min/max (uneven val/stats shards drop nothing) ...
    assert gen.latent_stats.ready and int(gen.latent_stats.count) == len(snap.clip_ids("train"))
    # ... per frame for the paper's windowed UNet, one per dimension for the default temporal variant
    frames = 1 if gen.config.architecture == "temporal" else FRAMES
    assert tuple(gen.latent_stats.minimum.shape) == (frames, gen.config.mmt.feature_dim)
    assert gen.metadata["snapshot_id"] == snap.id and gen.metadata["stage"] == "autoencoder"
    assert np.allclose(gen.mean_face.numpy(), snap.mean_face())
    c = _client(train_mlflow)
    run = c.get_run(result.mlflow_run_id)
    assert run.data.tags["reactdiff.output_uri"] == result.output_uri
    assert run.data.tags["reactdiff.snapshot_id"] == snap.id
    assert run.data.tags["reactdiff.stage"] == "autoencoder"
    assert run.data.tags.get("reactdiff.git_commit")
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [(snap.id, snap.feature_set_hash[:36])]
    arts = _artifacts(c, result.mlflow_run_id)
    assert {"config.yaml", "plots/loss_curves.png", "autoencoder/autoencoder.pt"} <= set(arts)
    assert any(a.startswith("plots/reconstruction_epoch") for a in arts)


def test_checkpoints_are_plain_tensors_loaded_with_weights_only(stage1, train_storage):
    import torch

    from pipeline import storage
    from pipeline.train.checkpoints import CHECKPOINT_FILE, generator_from_state

    run_dir = storage.join(train_storage, "tiny-autoencoder")
    names = [n for n in storage.listdir(run_dir) if n.startswith("checkpoint_epoch")]
    assert names == ["checkpoint_epoch0001", "checkpoint_epoch0002"]       # num_to_keep=2
    raw = storage.read_bytes(storage.join(run_dir, names[-1], CHECKPOINT_FILE))
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["stage"] == "autoencoder"
    assert state["mlflow_run_id"] == stage1[1].mlflow_run_id
    assert {"model", "ema", "optimizer", "history", "config", "snapshot_id"} <= set(state)
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    gen = generator_from_state(state)                        # EMA weights, statistics included
    assert gen.latent_stats.ready


def test_stage2_trains_on_latent_pairs_and_registers_a_challenger(stage2, stage1, train_snapshot, train_mlflow,
                                                                 monkeypatch):
    import mlflow

    from pipeline import storage
    from pipeline.registry import models as registry
    from pipeline.registry import runs as tracking
    from pipeline.data.snapshot import Snapshot

    snap = Snapshot.open(train_snapshot)
    assert stage2.stage == "diffusion" and stage2.epoch == 2
    assert stage2.name == "diffusion-from-tiny-autoencoder"          # found stage 1 through MLflow
    marker = storage.read_json(storage.join(stage2.run_dir, "latent_pairs", "train", "_SUCCESS.json"))
    assert marker["items"] == len(snap.items("train")) and marker["autoencoder_uri"] == stage1[1].output_uri
    c = _client(train_mlflow)
    for key in ("epoch", "train/loss", "val/loss", "val/FRCorr", "val/FRDist"):
        assert _steps(c, stage2.mlflow_run_id, key) == [1, 2], key
    assert stage2.model_version == "1"
    arts = _artifacts(c, stage2.mlflow_run_id)
    assert {"config.yaml", "plots/loss_curves.png", "diffusion/generator.pt"} <= set(arts)
    assert any(a.startswith("plots/reaction_epoch") for a in arts)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", train_mlflow)
    version = registry.resolve_version("models:/reactdiff@challenger")
    assert str(version.version) == "1" and version.tags["snapshot_id"] == snap.id
    assert version.run_id == stage2.mlflow_run_id
    gen, mv = registry.load_generator("models:/reactdiff@challenger")
    assert str(mv.version) == "1" and gen.latent_stats.ready
    clip = snap.clip_ids("test")[0]
    feats = {k: v[:FRAMES] for k, v in snap.load_clips([clip], list(gen.feature_widths))[clip].items()}
    reaction = gen.generate(feats, num_samples=3, seed=0, steps=4)
    assert tuple(reaction.emotion.shape) == (3, FRAMES, 25) and tuple(reaction.tdmm.shape) == (3, FRAMES, 58)
    assert np.isfinite(reaction.emotion.numpy()).all()
    # the same model through MLflow's pyfunc (models from code, pinned requirements, signature)
    with tracking.using(train_mlflow):
        model = mlflow.pyfunc.load_model("models:/reactdiff@challenger")
    out = model.predict({k: v[None] for k, v in feats.items()}, params={"samples": 2, "seed": 1})
    assert out["emotion"].shape == (1, 2, FRAMES, 25) and out["tdmm"].shape == (1, 2, FRAMES, 58)


def test_rerunning_a_finished_run_adds_no_epoch_and_no_version(stage2, train_snapshot, train_storage, train_mlflow):
    from pipeline.train.job import train

    again = train(load_config(tiny_overrides(train_snapshot, train_storage, train_mlflow, "diffusion")))
    assert again.mlflow_run_id == stage2.mlflow_run_id and again.model_version == stage2.model_version
    c = _client(train_mlflow)
    assert _steps(c, stage2.mlflow_run_id, "epoch") == [1, 2]
    assert [str(v.version) for v in c.search_model_versions("name = 'reactdiff'")] == ["1"]
