"""The pictures of the pipeline (matplotlib, headless): the reaction plot and the loss curves.

``plot_reactions`` is the one picture of generated reactions: what ``reactdiff generate`` writes
as ``reactions.png`` and what training logs to MLflow at its checkpoints (generated reactions to
a val speaker, or stage 1's reconstruction, against the real trajectory). On one time axis: the
15 AUs as an activity raster (one row per AU and sample, so timing and diversity are visible at
a glance), valence and arousal curves, the 8 expression probabilities (sample mean with the
min–max band across samples) and the dominant expression per frame; the speaker's attributes
and the real listener's on top when they are known.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import numpy as np

from pipeline.data.react import EMOTION_COLUMNS, FPS
from pipeline.registry.runs import EPOCH_METRIC

# REACT facial attributes (model.md §1.2): 15 AU occurrences, valence, arousal, 8 expressions.
AU_NAMES = EMOTION_COLUMNS[:15]
EXPRESSION_NAMES = EMOTION_COLUMNS[17:]
AU_SLICE, VALENCE, AROUSAL, EXPRESSION_SLICE = slice(0, 15), 15, 16, slice(17, 25)

# One colour per expression class (tab10 without grey), used by the plot's raster and legend.
EXPRESSION_COLOURS = ("#7f7f7f", "#f2b701", "#3969ac", "#11a579", "#7f3c8d", "#80ba5a",
                      "#e73f74", "#e68310")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _fit(trajectory: np.ndarray, frames: int) -> np.ndarray:
    """A [T', 25] trajectory on ``frames`` frames: cropped, or its last frame held."""
    trajectory = np.asarray(trajectory, np.float32)[:frames]
    return np.pad(trajectory, ((0, frames - len(trajectory)), (0, 0)), mode="edge")


def plot_reactions(emotion: np.ndarray, speaker_emotion: np.ndarray | None = None, *,
                   real_emotion: np.ndarray | None = None, fps: float = FPS, title: str = "",
                   label: str = "reaction", real_label: str = "real listener"):
    """Figure of K reactions ``emotion`` [K, T, 25] (or one [T, 25]) under the speaker's
    attributes [T', 25] and the real trajectory ``real_emotion`` [T', 25] (the listener's
    actual reaction, or for a reconstruction its target) when given."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    emotion = np.asarray(emotion, dtype=np.float32)
    if emotion.ndim == 2:
        emotion = emotion[None]
    if emotion.ndim != 3 or emotion.shape[-1] != 25:
        raise ValueError(f"reactions must be [K, T, 25], got {emotion.shape}")
    k, t, _ = emotion.shape
    seconds = np.arange(t) / fps
    extent_t = (0, t / fps)
    references = {name: np.asarray(e, np.float32)[:t] for name, e in
                  (("speaker", speaker_emotion), (real_label, real_emotion)) if e is not None}
    sample_colours = plt.get_cmap("tab10" if k <= 10 else "viridis")(
        np.arange(k) % 10 if k <= 10 else np.linspace(0, 1, k))
    reference_style = {"speaker": dict(color="black", lw=1.4, ls="--"), real_label: dict(color="#d62728", lw=1.4)}

    panels = [f"{name} AUs" for name in references] + ["aus", "valence", "arousal", "expressions", "dominant"]
    rows = len(references) + k
    heights = {**{f"{name} AUs": 2.0 for name in references}, "aus": max(3.0, 0.012 * 15 * k + 1.2),
               "valence": 1.4, "arousal": 1.4, "expressions": 1.8, "dominant": 0.5 + 0.12 * rows}
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, sum(heights[p] for p in panels) + 0.8),
                             sharex=True, gridspec_kw={"height_ratios": [heights[p] for p in panels]},
                             layout="constrained")
    ax = dict(zip(panels, axes))
    raster = {"cmap": "Greys", "vmin": 0.0, "vmax": 1.0, "aspect": "auto",
              "interpolation": "nearest", "extent": (*extent_t, None, None)}

    def au_raster(a, rows: np.ndarray, per_au: int, ylabel: str) -> None:
        opts = dict(raster, extent=(*extent_t, rows.shape[0] - 0.5, -0.5))
        a.imshow(np.clip(rows, 0, 1), **opts)
        a.set_yticks(np.arange(15) * per_au + (per_au - 1) / 2, AU_NAMES, fontsize=7)
        for g in range(1, 15):  # separate AU groups so each AU's K sample rows read as a block
            a.axhline(g * per_au - 0.5, color="#d0d0d0", lw=0.5)
        a.set_ylabel(ylabel, fontsize=9)

    for name, e in references.items():
        au_raster(ax[f"{name} AUs"], _fit(e, t)[:, AU_SLICE].T, 1, f"{name} AUs")
    # rows: AU-major, sample-minor → for each AU the K samples are adjacent rows.
    au_rows = emotion[:, :, AU_SLICE].transpose(2, 0, 1).reshape(15 * k, t)
    au_raster(ax["aus"], au_rows, k, f"{label} AUs\n({k} samples per AU)")

    for panel, col in (("valence", VALENCE), ("arousal", AROUSAL)):
        a = ax[panel]
        for i in range(k):
            a.plot(seconds, emotion[i, :, col], color=sample_colours[i], lw=0.8, alpha=0.8)
        for name, e in references.items():
            a.plot(seconds[: len(e)], e[:, col], label=name, **reference_style[name])
        if references:
            a.legend(loc="upper right", fontsize=7)
        a.set_ylim(-1.05, 1.05)
        a.axhline(0, color="#bbbbbb", lw=0.5)
        a.set_ylabel(panel, fontsize=9)

    a = ax["expressions"]
    probs = emotion[:, :, EXPRESSION_SLICE]
    for j, name in enumerate(EXPRESSION_NAMES):
        a.fill_between(seconds, probs[:, :, j].min(0), probs[:, :, j].max(0),
                       color=EXPRESSION_COLOURS[j], alpha=0.15, lw=0)
        a.plot(seconds, probs[:, :, j].mean(0), color=EXPRESSION_COLOURS[j], lw=1.0, label=name)
    a.set_ylim(0, 1)
    a.set_ylabel("expression\nprobability", fontsize=9)
    a.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=8, fontsize=7, frameon=False,
             borderaxespad=0.1)

    a = ax["dominant"]
    dominant = np.concatenate([np.stack([_fit(e, t)[:, EXPRESSION_SLICE].argmax(-1) for e in references.values()])
                               if references else np.zeros((0, t), np.int64), probs.argmax(-1)])   # [rows, T]
    labels = list(references) + [f"#{i}" for i in range(k)]
    a.imshow(dominant, cmap=ListedColormap(EXPRESSION_COLOURS), vmin=-0.5, vmax=7.5,
             aspect="auto", interpolation="nearest",
             extent=(*extent_t, dominant.shape[0] - 0.5, -0.5))
    a.set_yticks(np.arange(len(labels)), labels, fontsize=6)
    a.set_ylabel("dominant\nexpression", fontsize=9)
    a.set_xlabel("time (s)")
    a.set_xlim(*extent_t)
    fig.suptitle(title or f"{k} generated reactions", fontsize=11)
    return fig


def reaction_plot_png(emotion: np.ndarray, speaker_emotion: np.ndarray | None = None, *,
                      fps: float = FPS, title: str = "", dpi: int = 110) -> bytes:
    """``plot_reactions`` rendered to PNG bytes (write them anywhere with pipeline.storage)."""
    return figure_png(plot_reactions(emotion, speaker_emotion, fps=fps, title=title), dpi=dpi)


def figure_png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _pyplot().close(fig)
    return buf.getvalue()


def loss_curve_figure(history: Sequence[Mapping[str, float]], title: str = ""):
    """Train and validation losses per epoch: one panel per loss family."""
    plt = _pyplot()
    keys = sorted({k for row in history for k in row if k.startswith(("train/", "val/"))
                   and k.split("/", 1)[1] not in ("items", "steps")})
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split("/", 1)[1], []).append(k)
    # losses first, then validation metrics; at most 4 panels a row
    order = sorted(groups, key=lambda g: (not g.startswith("loss"), "loss" not in g, g))
    n = max(1, len(order))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, name in zip(axes.flat, order):
        ks = groups[name]
        for k in ks:
            pts = [(int(r[EPOCH_METRIC]), float(r[k])) for r in history
                   if k in r and r[k] is not None and math.isfinite(float(r[k]))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=k.split("/", 1)[0])
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
