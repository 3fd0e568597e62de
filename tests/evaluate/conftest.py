"""Fixtures of the evaluation tests: the tiny snapshot (session) and two registered tiny
generators (per test, in the test's private MLflow). Builders live in tests.helpers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.data.snapshot import Snapshot
from pipeline.registry import models as registry
from pipeline.registry import runs as tracking
from tests.helpers.models import tiny_generator
from tests.helpers.snapshots import GENERATOR, write_tiny_snapshot


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory):
    return Snapshot.open(write_tiny_snapshot(str(tmp_path_factory.mktemp("eval-snapshots"))))


@dataclass
class Models:
    uri: str              # tracking/registry URI
    versions: list        # ModelVersion 1, 2


@pytest.fixture
def registered(mlflow_uri, tiny_snapshot):
    """Two registered versions of tiny generators (v1, v2), trained on the tiny snapshot (tags)."""
    versions = []
    for seed in (0, 1):
        run_id = tracking.create_run(run_name=f"train-{seed}")
        generator = tiny_generator(seed, GENERATOR, random_stats=True)
        versions.append(registry.register_generator(generator, run_id=run_id, snapshot=tiny_snapshot))
        tracking.finish_run(run_id)
    return Models(mlflow_uri, versions)
