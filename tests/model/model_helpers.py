"""Shared helpers for the model-library tests: a tiny generator config and synthetic features."""

from __future__ import annotations

import torch

import reactdiff

# Three facial and two acoustic groups: exercises the named-group fusion of the paper layout
# (first facial group self-attends, then cross-attends the others; first acoustic group
# attends the second) at toy widths.
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
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch is not None else ()
    return {name: torch.randn(*shape, frames, w, generator=g) for name, w in widths.items()}
