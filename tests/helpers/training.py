"""Helpers of the training tests: sizes and the config of a tiny 2-worker CPU run."""

from __future__ import annotations

from pipeline import config
from pipeline.train.job import TrainConfig

FRAMES = 100
DYADS = (4, 2, 1)       # train / val / test dyads → 8 / 4 / 2 person clips


def tiny_overrides(snapshot_uri: str, storage_uri: str, tracking_uri: str, stage: str, **extra) -> list[str]:
    """``--set`` overrides of the bundled train.yaml for a 2-worker CPU run on the tiny snapshot."""
    section = "stage1" if stage == "autoencoder" else "stage2"
    values = {
        "stage": stage, "features": snapshot_uri, "storage_path": storage_uri,
        "mlflow.tracking_uri": tracking_uri,
        f"{section}.epochs": 2, f"{section}.batch_size": 4,
        "scaling.num_workers": 2, "checkpoint.every": 1, "checkpoint.num_to_keep": 2,
        "validation.max_items": 4, "validation.samples": 2, "validation.steps": 5, "validation.plot_every": 1,
        "data.encode_batch_size": 4, "data.encode_actors": 1,
    }
    if stage == "autoencoder":
        values["model.seq_len"] = FRAMES         # stage 2 inherits it from the stage-1 model
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def load_config(overrides: list[str]) -> TrainConfig:
    return config.load(TrainConfig, "train", overrides)
