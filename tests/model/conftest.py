"""Fixtures for the model-library tests: a tiny generator and synthetic per-frame features
(builders in tests.helpers.models, handed out as ``make_tiny`` and ``make_features``)."""

from __future__ import annotations

import pytest
import torch

import reactdiff
from tests.helpers.models import features, tiny_generator


@pytest.fixture
def make_tiny():
    return tiny_generator


@pytest.fixture
def make_features():
    return features


@pytest.fixture
def tiny() -> reactdiff.ReactDiffGenerator:
    """A tiny generator whose latent statistics are filled from 6 random clips."""
    gen = tiny_generator()
    gen.update_statistics(features(gen.feature_widths, 6, gen.config.seq_len, seed=1))
    return gen


@pytest.fixture
def speaker(tiny) -> dict[str, torch.Tensor]:
    """One unbatched speaker clip with one frame more than seq_len (like REACT's 751)."""
    return features(tiny.feature_widths, None, tiny.config.seq_len + 1, seed=2)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Run these tiny models on one thread, restoring the setting afterwards.

    The tensors here are far too small for intra-op parallelism, and on a shared 2-core host
    OpenMP workers spinning against other processes made a step 20-50× slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
