"""Fixtures of the extraction tests: one small synthetic REACT dataset per session."""

from __future__ import annotations

import pytest

from pipeline.data import synth

FRAMES = 50   # 2 s clips: enough for alignment checks, fast on 2 cores


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    """A synthetic REACT 2024 dataset, 2/1/1 dyads = 8 person clips of FRAMES frames. Read-only:
    tests that break files work on a copy (``tests.helpers.media.copy_dataset``)."""
    root = tmp_path_factory.mktemp("react") / "data"
    synth.generate(str(root), dyads=(2, 1, 1), frames=FRAMES, seed=0, release="2024")
    return str(root)
