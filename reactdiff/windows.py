"""Reactions for a speaker clip of any length from a model that reacts to fixed windows.

The generator reacts to ``seq_len`` = 750 frames (30 s): the reference architecture works on
15 fixed 50-frame windows with per-frame-index latent statistics, and both architectures'
``generate`` read the first ``seq_len`` frames. A clip of any other length is covered with whole
windows here (docs/generation.md): a shorter clip is looped to fill one, a longer one gets
windows overlapping by a fifth of a window, cross-faded linearly so nothing jumps at a seam.
It lives in ``reactdiff`` because both the generate job and the served MLflow model (which
carries only this package) take clips of any length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Sampling:
    """How reactions are drawn, besides the speaker, their number and the seed; None: the
    generator's config. One value the evaluate and generate jobs pass down to
    ``generator.generate(..., **sampling.kwargs())``."""

    steps: int | None = None          # DDIM steps (an evenly spaced subset of the training timesteps)
    decoder_dropout: bool = False     # the frozen decoder's dropout on while sampling, as the reference does
    guidance: float | None = None     # classifier-free guidance scale (1: none)

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")

    def kwargs(self) -> dict[str, Any]:
        return {"steps": self.steps, "decoder_dropout": self.decoder_dropout, "guidance": self.guidance}


WINDOWS_PER_CALL = 8          # model windows denoised in one generator call (bounds memory on long clips)


def windows(frames: int, seq_len: int, overlap: int) -> list[int]:
    """Start frames of the model windows covering ``frames`` frames: every ``seq_len - overlap``,
    the last one ending on the last frame (it may overlap its neighbour by more). A clip of at
    most ``seq_len + 1`` frames is one window (REACT's 751: the 751st repeats the 750th)."""
    if frames <= seq_len + 1:
        return [0]
    stride = seq_len - overlap
    starts = list(range(0, frames - seq_len, stride))
    return starts + [frames - seq_len]


def crossfade_weights(starts: list[int], seq_len: int, overlap: int) -> np.ndarray:
    """float [W, seq_len]: 1 inside each window, linear ramps over ``overlap`` frames where it
    meets a neighbour, so the weighted mean of overlapping windows slides from one to the next."""
    ramp = np.arange(1, overlap + 1, dtype=np.float64) / (overlap + 1)
    weights = np.ones((len(starts), seq_len))
    for w in range(len(starts)):
        if w > 0:
            weights[w, :overlap] = ramp
        if w < len(starts) - 1:
            weights[w, seq_len - overlap:] = ramp[::-1]
    return weights


def generate_reactions(generator, features: dict[str, np.ndarray], frames: int, *, samples: int, seed: int,
                       sampling: Sampling = Sampling()) -> tuple[np.ndarray, np.ndarray, str]:
    """K reactions (raw emotion [K, T, 25], tdmm [K, T, 58]) for a speaker clip of any length T.

    The model reacts to windows of ``seq_len`` frames (30 s); REACT's 751-frame clips are one
    window and the 751st frame repeats the 750th, as before. A shorter clip is looped to fill
    one window and the reactions cut back to its length; a longer one is covered by windows
    overlapping by a fifth of a window (6 s), window w drawn with seed ``seed + w`` and
    neighbours cross-faded linearly over the overlap (no jump at a seam).
    """
    seq_len = int(generator.config.seq_len)
    overlap = seq_len // 5
    if frames < seq_len:
        reps = -(-seq_len // frames)
        feats = {k: np.concatenate([v[:frames]] * reps)[:seq_len] for k, v in features.items()}
        r = generator.generate(feats, num_samples=samples,
                               seed=seed, **sampling.kwargs())
        note = (f"the clip has {frames} frames, fewer than the model's {seq_len}-frame window: the speaker was "
                f"looped {reps} times to fill it and the reactions cut back to {frames} frames")
        return (r.emotion.float().cpu().numpy()[:, :frames], r.tdmm.float().cpu().numpy()[:, :frames], note)
    starts = windows(frames, seq_len, overlap)
    if len(starts) == 1:
        r = generator.generate(features, num_samples=samples,
                               seed=seed, **sampling.kwargs())
        return r.emotion.float().cpu().numpy(), r.tdmm.float().cpu().numpy(), ""
    weights = crossfade_weights(starts, seq_len, overlap)
    emotion = tdmm = None
    total = np.zeros(frames)
    for first in range(0, len(starts), WINDOWS_PER_CALL):
        chunk = starts[first:first + WINDOWS_PER_CALL]
        batch = {k: np.stack([v[s:s + seq_len] for s in chunk]) for k, v in features.items()}
        r = generator.generate(batch, num_samples=samples, seed=[seed + first + i for i in range(len(chunk))],
                               **sampling.kwargs())
        e, t = r.emotion.float().cpu().numpy(), r.tdmm.float().cpu().numpy()      # [W, K, L, D]
        if emotion is None:
            emotion = np.zeros((samples, frames, e.shape[-1]))
            tdmm = np.zeros((samples, frames, t.shape[-1]))
        for i, s in enumerate(chunk):
            wt = weights[first + i][None, :, None]
            emotion[:, s:s + seq_len] += wt * e[i]
            tdmm[:, s:s + seq_len] += wt * t[i]
            total[s:s + seq_len] += weights[first + i]
    note = (f"{len(starts)} model windows of {seq_len} frames (starting at {starts}) overlap by at least "
            f"{overlap} frames and are cross-faded linearly; window w is drawn with seed {seed} + w")
    return ((emotion / total[None, :, None]).astype(np.float32), (tdmm / total[None, :, None]).astype(np.float32),
            note)
