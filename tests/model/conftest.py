"""Fixtures for the model-library tests: a tiny generator and synthetic per-frame features.

Helpers are handed out as fixtures (``make_tiny``, ``make_features``) rather than imported, so
the tests work under any pytest import mode.
"""

from __future__ import annotations

import pytest
import torch

import reactdiff

# Three facial and two acoustic groups: exercises the named-group fusion of the paper layout
# (first facial group self-attends, then cross-attends the others; first acoustic group
# attends the second) at toy widths. 40 frames = 4 windows of 10.
TINY = dict(
    seq_len=40,
    window=10,
    facial={"video_a": 12, "video_b": 6, "video_c": 4},
    acoustic={"audio_x": 5, "audio_y": 3},
    mmt={"hidden_dim": 32, "feature_dim": 16, "heads": 2, "decoder_heads": 2, "decoder_blocks": 1},
    denoiser={"model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
              "attention_resolutions": (2,), "cond_dim": 32, "norm_groups": 8},
)


def tiny_generator(**overrides) -> reactdiff.ReactDiffGenerator:
    torch.manual_seed(0)
    return reactdiff.build_generator("small", **{**TINY, **overrides})


def features(widths: dict[str, int], batch: int | None, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random named features [batch, frames, width] (or [frames, width] when batch is None)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch is not None else ()
    return {name: torch.randn(*shape, frames, w, generator=g) for name, w in widths.items()}


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
