"""TrainConfig: the bundled train.yaml, CLI options, validation, preset (reference) settings."""

from __future__ import annotations

import argparse

import pytest

from pipeline import config
from pipeline.config import ConfigError
from pipeline.train.job import TrainConfig
from pipeline.train.config import resolved_settings


def _args(*argv):
    import jobs.train

    parser = argparse.ArgumentParser()
    jobs.train.add_arguments(parser)
    return jobs.train.config_from_args(parser.parse_args(list(argv)))


def test_bundled_config_loads_with_documented_defaults():
    cfg = config.load(TrainConfig, "train")
    assert cfg.stage == "autoencoder" and cfg.preset == "small-temporal" and cfg.features == "latest"
    assert cfg.scaling.num_workers == 2 and cfg.checkpoint.metric is None and cfg.checkpoint.mode == "min"
    assert cfg.mlflow.experiment == "reactdiff" and cfg.mlflow.alias == "challenger"
    assert cfg.stage1.epochs is None and cfg.stage1.grad_clip == 1.0       # null → the preset's value


def test_cli_options_land_in_the_trained_stage():
    cfg = _args("--stage", "diffusion", "--features", "s3://b/snap", "--epochs", "7", "--batch-size", "3",
                "--num-workers", "4", "--gpu", "--set", "stage1.epochs=99")
    assert cfg.stage == "diffusion" and cfg.features == "s3://b/snap"
    assert (cfg.stage2.epochs, cfg.stage2.batch_size) == (7, 3) and cfg.stage1.epochs == 99
    assert cfg.scaling.num_workers == 4 and cfg.scaling.use_gpu is True
    cfg = _args("--set", "stage=diffusion", "--epochs", "2")                # stage given through --set
    assert cfg.stage2.epochs == 2 and cfg.stage1.epochs is None


@pytest.mark.parametrize("overrides, message", [
    (["stage=vae"], "stage"),
    (["scaling.num_workers=0"], "num_workers"),
    (["checkpoint.every=0"], "checkpoint.every"),
    (["name=../escape"], "name"),
    (["stage1.epochs=many"], "stage1.epochs"),
    (["stage=diffusion", "model.seq_len=100"], "model.seq_len"),
    (["checkpoint.mode=best"], "checkpoint.mode"),
])
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config.load(TrainConfig, "train", overrides)


def test_preset_reference_settings_fill_unset_values():
    from reactdiff.presets import preset_config

    paper = preset_config("paper")
    cfg = config.load(TrainConfig, "train", ["stage=diffusion", "stage2.lr=0.00001"])
    s = resolved_settings(cfg, paper).to_dict()
    assert s["lr"] == 1e-5 and s["weight_decay"] == 5e-4 and s["ema_decay"] == 0.999
    assert s["epochs"] == 200 and s["batch_size"] == 16 and s["betas"] == [0.9, 0.999]
    s1 = resolved_settings(config.load(TrainConfig, "train"), paper).to_dict()
    assert s1["lr"] == 1e-4 and s1["grad_clip"] == 1.0


def test_export_takes_the_best_readable_checkpoint(tmp_path, caplog):
    import torch

    from pipeline.train.checkpoints import CHECKPOINT_FILE, export_checkpoint, write_checkpoint
    from pipeline.train.job import TrainError

    run_dir = tmp_path / "run"
    for epoch, val in ((1, 3.0), (2, 1.0), (3, 2.0), (4, None)):      # epoch 4: not validated
        d = run_dir / f"checkpoint_epoch{epoch:04d}"
        d.mkdir(parents=True)
        metrics = {} if val is None else {"val/loss": val}
        write_checkpoint(str(d), {"epoch": epoch, "w": torch.full((2,), float(epoch))},
                         {"epoch": epoch, "metrics": metrics})
    defaults = TrainConfig(name="r").checkpoint                            # the latest; mode min
    assert export_checkpoint(str(run_dir), name="r", metric=defaults.metric, mode=defaults.mode)[1]["epoch"] == 4

    def export(mode=defaults.mode):
        return export_checkpoint(str(run_dir), name="r", metric="val/loss", mode=mode)

    uri, state = export()
    assert uri.endswith("checkpoint_epoch0002") and state["epoch"] == 2
    assert export(mode="max")[1]["epoch"] == 1

    best = run_dir / "checkpoint_epoch0002" / CHECKPOINT_FILE
    best.write_bytes(best.read_bytes()[:40])                              # truncated upload
    uri, state = export()
    assert state["epoch"] == 3 and "checkpoint_epoch0002" in caplog.text and "unreadable" in caplog.text

    for epoch in (1, 3, 4):
        (run_dir / f"checkpoint_epoch{epoch:04d}" / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="none of its 4 checkpoints is readable"):
        export()


def test_global_batch_is_split_over_workers():
    from pipeline.train.job import worker_batch_size
    from pipeline.train.config import TrainError

    assert worker_batch_size(16, 4, 3186) == 4          # the reference's 16 items per step on 4 GPUs
    assert worker_batch_size(16, 1, 3186) == 16
    with pytest.raises(TrainError, match="does not divide over 3 workers"):
        worker_batch_size(16, 3, 3186)
    assert worker_batch_size(8, 2, 6) == 3              # fewer rows than asked: capped, with a warning


def test_paper_stage1_from_a_paper_snapshot_has_the_reference_attention_roles(tmp_path):
    """The snapshot lists its columns sorted (audio_mfcc26 < audio_wav2vec2); stage 1 built by the
    training pipeline must still make wav2vec2 the acoustic query and MFCC its key/value (§3.3)."""
    import torch

    from pipeline import storage
    from pipeline.data.features import load_feature_set
    from pipeline.data.snapshot import FORMAT, Snapshot
    from pipeline.train.job import _generator_config
    from reactdiff import ReactDiffGenerator, build_generator

    models = {name: str(tmp_path / f"{name}.pt") for name in ("au", "va", "fe", "wav2vec2")}
    fs = load_feature_set("paper", models)
    uri = str(tmp_path / "snap")
    storage.write_json(storage.join(uri, "_manifest.json"), {   # written as extraction writes it
        "format": FORMAT, "id": "paper-columns", "feature_set": {"hash": "x"},
        "features": {e.column: {"width": e.width, "dtype": e.dtype, "kind": e.kind} for e in fs.extractors}})
    snapshot = Snapshot.open(uri)
    assert list(snapshot.acoustic) == ["audio_mfcc26", "audio_wav2vec2"]     # the trap: sorted order

    gc = _generator_config(TrainConfig(stage="autoencoder", preset="paper"), snapshot, None)
    with torch.device("meta"):
        built, preset = ReactDiffGenerator(gc), build_generator("paper")
    enc = built.autoencoder.encoder
    assert enc.facial_self.to_q.in_features == 25088 and enc.facial_self.to_k.in_features == 25088
    assert [list(block) for block in enc.facial_cross] == [["video_fe", "video_va"]] * 2
    assert [block["video_fe"].to_k.in_features for block in enc.facial_cross] == [1408, 1408]
    assert list(enc.acoustic_attn) == ["audio_mfcc26"]                       # MFCC is the key/value...
    assert enc.acoustic_attn["audio_mfcc26"].to_q.in_features == 1536        # ...wav2vec2 the query
    assert enc.acoustic_attn["audio_mfcc26"].to_k.in_features == 26
    assert built.parameter_counts() == preset.parameter_counts()
    assert round(built.parameter_counts()["autoencoder"] / 1e6, 2) == 124.71
