"""Shared fixtures for the generation tests: one synthetic REACT test split (2 dyads, 751 frames),
its feature snapshot (the real extraction job on local Ray) and a small, untrained generator
registered as ``models:/reactdiff@champion`` in a private sqlite MLflow — each built once.

Untrained weights are enough here: these tests check files, shapes, formats, determinism and
the evaluation round trip, not reaction quality (the training tests do that).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

SPLIT = "test"


@dataclass
class Speaker:
    clip_id: str
    video: str
    audio: str
    emotion: str
    tdmm: str


@dataclass
class Registered:
    uri: str            # MLflow tracking + registry URI
    version: object     # ModelVersion of models:/reactdiff@champion
    snapshot: object    # pipeline.data.snapshot.Snapshot the model was registered with


@pytest.fixture(scope="session")
def react_test_split(tmp_path_factory) -> Path:
    from pipeline.data import synth

    root = tmp_path_factory.mktemp("generate-data") / "react"
    synth.generate(str(root), dyads=(0, 0, 2), frames=751, seed=3)
    return root


@pytest.fixture(scope="session")
def speaker(react_test_split) -> Speaker:
    """The speaker of item 0 of the test split: mp4 (no audio stream), wav, Emotion csv, 3DMM npy."""
    from pipeline.data import react

    ds = react.open_dataset(str(react_test_split))
    clip = ds.clip(ds.items(SPLIT)[0].speaker, SPLIT)
    return Speaker(clip.clip_id, clip.video, clip.audio, clip.emotion, clip.tdmm)


@pytest.fixture(scope="session")
def snapshot(ray_local, react_test_split, tmp_path_factory):
    from pipeline.data.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("generate-snapshots")
    result = extract(ExtractConfig(data=str(react_test_split), out=str(out), feature_set="demo"))
    assert result.published, result.report
    return result.snapshot


@pytest.fixture(scope="session")
def _registered(snapshot, _migrated_mlflow_db, tmp_path_factory) -> Registered:
    """Register once; MLFLOW_TRACKING_URI is set only while registering (tests use ``registry``)."""
    import mlflow
    import numpy as np
    import torch

    from pipeline.registry import models as registry
    from pipeline.registry import runs as tracking
    from reactdiff.generator import build_generator

    db = tmp_path_factory.mktemp("generate-mlflow") / "mlflow.db"
    shutil.copy(_migrated_mlflow_db, db)
    uri = f"sqlite:///{db}"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        torch.manual_seed(0)
        generator = build_generator("small")
        clips = snapshot.load_clips(snapshot.clip_ids(SPLIT), list(generator.feature_widths))
        generator.update_statistics({name: torch.from_numpy(np.stack([c[name] for c in clips.values()]))
                                     for name in generator.feature_widths})
        generator.eval()
        run_id = tracking.create_run(run_name="generate-tests")
        version = registry.register_generator(generator, run_id=run_id, snapshot=snapshot, alias="champion")
        tracking.finish_run(run_id)
    mlflow.set_tracking_uri(previous)
    return Registered(uri, version, snapshot)


@pytest.fixture
def registry(_registered, workdir, monkeypatch) -> Registered:
    """The registry holding ``models:/reactdiff@champion`` (v1), active for one test (with a
    private working directory, so nothing lands in the repository's .reactdiff)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _registered.uri)
    mlflow.set_tracking_uri(_registered.uri)
    return _registered
