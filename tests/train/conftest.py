"""Fixtures of the training tests: one synthetic feature snapshot on (moto) S3, one private
MLflow store, and the two stages trained once per session with 2 Ray Train workers.

Sizes are the smallest that still exercise everything: 4 train dyads (8 person clips, 8 directed
items), 2 val dyads, clips of 100 frames = 2 diffusion windows of 50, the ``small`` preset,
batch 4 (2 per worker), 2 epochs.
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from pipeline.data import synth
from pipeline.data.extract import ExtractConfig, extract
from pipeline.train.job import train
from tests.helpers.training import DYADS, FRAMES, load_config, tiny_overrides


@pytest.fixture(scope="session")
def train_snapshot(tmp_path_factory, ray_local, s3_server) -> str:
    """A published feature snapshot (demo feature set) on moto S3; returns its URI."""
    root = tmp_path_factory.mktemp("train-react") / "data"
    synth.generate(str(root), dyads=DYADS, frames=FRAMES, seed=0, release="2024")
    out = f"s3://{s3_server.bucket}/train-{uuid.uuid4().hex[:8]}/snapshots"
    result = extract(ExtractConfig(data=str(root), out=out, feature_set="demo", frames=FRAMES))
    return result.uri


@pytest.fixture(scope="session")
def train_mlflow(tmp_path_factory, _migrated_mlflow_db) -> str:
    """A private sqlite MLflow store shared by the session's training runs."""
    db = tmp_path_factory.mktemp("train-mlflow") / "mlflow.db"
    shutil.copy(_migrated_mlflow_db, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def train_storage(s3_server) -> str:
    """Ray Train storage_path on S3: checkpoints, autoencoder.pt, latent pairs."""
    return f"s3://{s3_server.bucket}/train-{uuid.uuid4().hex[:8]}/checkpoints"


@pytest.fixture(scope="session")
def stage1(train_snapshot, train_storage, train_mlflow):
    """Stage 1 trained in two calls with the same run name:

    1. ``epochs=1`` — finishes, exports autoencoder.pt;
    2. ``epochs=2`` with rank 1 raising once at the start of epoch 2 — the re-run resumes from
       the epoch-1 checkpoint, the worker failure restarts the group from it again, and the run
       completes epoch 2 in the same MLflow run.
    """
    name = "tiny-autoencoder"
    common = tiny_overrides(train_snapshot, train_storage, train_mlflow, "autoencoder", name=name)
    first = train(load_config(common + ["stage1.epochs=1"]))
    second = train(load_config(common + ["debug.fail_at_epoch=2", "debug.fail_rank=1"]))
    return first, second


@pytest.fixture(scope="session")
def stage2(stage1, train_snapshot, train_storage, train_mlflow):
    """Stage 2 on the frozen stage 1, found through MLflow (newest finished stage-1 run)."""
    return train(load_config(tiny_overrides(train_snapshot, train_storage, train_mlflow, "diffusion")))
