"""The REACT evaluation protocol: which items, in which order, with which seeds, scored how.

Pure numpy and ``reactdiff.metrics`` (no Ray, no MLflow), so the evaluation job, batch
generation and the training loop's validation all score by the same rules.

Order contract: row ``n`` of every array (predictions, listener, speaker, A) is the n-th item
of ``split_items`` — ``Snapshot.items(split)`` in official order, i.e. the csv dyads followed by
the same dyads mirrored (metrics.md §1), less items whose clips were quarantined. Any reordering
silently breaks FRCorr/FRDist, so predictions are placed by their official ``item`` index, never
by arrival order, and a missing or duplicated item is an error.

Determinism: item ``k`` is generated with seed ``item_seed(seed, k)``, so the predictions do not
depend on how items are batched or spread over actors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from reactdiff.windows import Sampling

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.data.snapshot import Snapshot

log = logging.getLogger(__name__)

# Metric → greater is better. Printed in this order (the official evaluate.py order).
METRIC_DIRECTIONS: dict[str, bool] = {
    "FRCorr": True, "FRDist": False, "FRDiv": True, "FRVar": True, "FRDvs": True, "FRSyn": False,
}
BASELINES = ("gt", "mime", "random", "mean")
BASELINE_LABELS = {"gt": "Ground truth", "mime": "Mime (copy speaker)", "random": "Random", "mean": "Mean"}
EMOTION_DIM = 25
FRAMES = 750        # the official evaluate.py scores frames 0..749 of every 751-frame clip

# FRDist over predictions [N, K, T, 25], listener [N, T, 25] and neighbours [N, N]: the
# in-process reactdiff.metrics.frdist, or the same value computed elsewhere (Ray tasks).
FRDist = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

@dataclass
class EvaluationReport:
    split: str
    metrics: dict[str, float]                                   # the model row
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)     # seconds: "generate", "FRDist", "gt.FRDist", ...
    counts: dict[str, int] = field(default_factory=dict)
    samples: int = 10
    seed: int = 0
    binarize: bool = False
    steps: int | None = None
    decoder_dropout: bool = False                               # dropout of the frozen decoder while sampling
    guidance: float | None = None                               # classifier-free guidance scale used
    latent_normalisation: str | None = None                     # "exact" or "reference" (its non-inverse bug)
    architecture: str | None = None                             # stage-2 design of the model
    snapshot_id: str | None = None
    snapshot_uri: str | None = None
    model_uri: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    predictions_uri: str | None = None
    metrics_version: str | None = None                          # reactdiff.__version__
    # Reaction plots of the first items, PNG bytes by file name: MLflow artifacts, not in the JSON.
    figures: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("figures")
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n"

    def table(self) -> str:
        """The model row and the baseline rows side by side, plus per-metric timings."""
        names = [m for m in METRIC_DIRECTIONS if m in self.metrics or any(m in b for b in self.baselines.values())]
        head = f"{'':<22}" + "".join(f"{m + (' ↑' if METRIC_DIRECTIONS[m] else ' ↓'):>11}" for m in names)
        label = f"model {self.model_name} v{self.model_version}" if self.model_version else "model"
        rows = [(label, self.metrics)] + [(BASELINE_LABELS.get(k, k), v) for k, v in self.baselines.items()]
        lines = [f"REACT metrics on {self.snapshot_id}/{self.split}: {self.counts.get('items', '?')} items × "
                 f"{self.samples} samples, seed {self.seed}, binarize {self.binarize}, decoder dropout "
                 f"{'on' if self.decoder_dropout else 'off'}"
                 + (f", guidance {self.guidance:g}" if self.guidance is not None else "")
                 + (f", latent normalisation {self.latent_normalisation}" if self.latent_normalisation else ""),
                 head]
        for name, values in rows:
            lines.append(f"{name[:22]:<22}" + "".join(f"{_fmt(values.get(m)):>11}" for m in names))
        if self.timings:
            own = {k: v for k, v in self.timings.items() if "." not in k}
            per_baseline: dict[str, float] = {}
            for k, v in self.timings.items():
                if "." in k:
                    per_baseline[k.split(".", 1)[0]] = per_baseline.get(k.split(".", 1)[0], 0.0) + v
            lines.append("time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in own.items())
                         + "".join(f"; baseline {k} {v:.1f}" for k, v in per_baseline.items()))
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.2f}"


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


# ---------------------------------------------------------------------------------------------
# Items, seeds, ground truth
# ---------------------------------------------------------------------------------------------

def item_seed(seed: int, item: int) -> int:
    """The seed of item ``item``: a function of (seed, item) only, so partitioning is irrelevant."""
    return int(np.random.SeedSequence([int(seed), int(item)]).generate_state(1, dtype=np.uint32)[0])


def split_items(snapshot: "Snapshot", split: str, max_items: int | None = None):
    """The evaluated items of ``split`` in official order, the matching neighbour matrix, and the
    number of items left out because a clip of theirs was quarantined at extraction.

    ``max_items`` keeps the first N items (a smoke subset, not comparable with full-split
    numbers). Items whose speaker or listener clip is missing from the snapshot are dropped with
    their row and column of the matrix, and counted, so one broken clip does not stop the job.
    """
    items = list(snapshot.items(split))
    neighbours = np.asarray(snapshot.neighbours(split))
    if neighbours.shape != (len(items), len(items)):
        raise ValueError(f"snapshot {snapshot.id}: neighbours/{split}.npy has shape {neighbours.shape} but the "
                         f"split has {len(items)} items; the matrix must follow the item order (metrics.md §1.1)")
    for k, item in enumerate(items):
        if int(item.index) != k:
            raise ValueError(f"snapshot {snapshot.id}: items/{split} row {k} has index {item.index}; "
                             "items must be stored in official order")
    if max_items is not None and max_items < len(items):
        items = items[:max_items]
    keep = available_items(snapshot, split, items)
    dropped = len(items) - len(keep)
    if dropped:
        log.warning("%s/%s: %d of %d items left out (a clip was quarantined at extraction); "
                    "the numbers are not comparable with the full split", snapshot.id, split, dropped, len(items))
    if len(keep) < 2:
        raise ValueError(f"snapshot {snapshot.id}/{split}: only {len(keep)} evaluable items")
    idx = np.asarray(keep)
    return [items[k] for k in keep], neighbours[np.ix_(idx, idx)], dropped


def available_items(snapshot: "Snapshot", split: str, items: Sequence) -> list[int]:
    """Positions in ``items`` of those whose speaker and listener clips are both in the snapshot.

    The one rule for which items are generated and scored: an item with a clip quarantined at
    extraction is left out (by evaluation, and by ``reactdiff generate --split``).
    """
    present = set(snapshot.clip_ids(split))
    return [k for k, i in enumerate(items) if i.speaker in present and i.listener in present]


def ground_truth(snapshot: "Snapshot", items: Sequence, frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Listener and speaker emotion [N, T, 25] float32 for ``items`` (first ``frames`` frames)."""
    frames = frames or FRAMES
    clip_ids = sorted({i.listener for i in items} | {i.speaker for i in items})
    clips = snapshot.load_clips(clip_ids, ["emotion"])

    def emotion(clip_id: str) -> np.ndarray:
        e = np.asarray(clips[clip_id]["emotion"], dtype=np.float32)
        if e.ndim != 2 or e.shape[1] != EMOTION_DIM or e.shape[0] < frames:
            raise ValueError(f"snapshot {snapshot.id}: clip {clip_id} emotion has shape {e.shape}; "
                             f"the metrics need at least [{frames}, {EMOTION_DIM}]")
        return e[:frames]

    listener = np.stack([emotion(i.listener) for i in items])
    speaker = np.stack([emotion(i.speaker) for i in items])
    return listener, speaker


def train_mean_emotion(snapshot: "Snapshot", frames: int = None) -> np.ndarray | None:
    """The mean 25-d frame of the train split's clips (the official "Mean" baseline is a mean over
    training speakers and listeners), or None when the snapshot has no train split (then the
    metric code averages the evaluated listeners)."""
    frames = frames or FRAMES
    if "train" not in snapshot.splits or not snapshot.clip_ids("train"):
        return None
    clips = snapshot.load_clips(snapshot.clip_ids("train"), ["emotion"])
    total, count = np.zeros(EMOTION_DIM, np.float64), 0
    for arrays in clips.values():
        e = arrays["emotion"][:frames]
        total += e.sum(axis=0, dtype=np.float64)
        count += len(e)
    return (total / max(count, 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def score(pred: np.ndarray, listener: np.ndarray, speaker: np.ndarray, neighbours: np.ndarray, *,
          binarize: bool = False, frdist: FRDist | None = None,
          prefix: str = "") -> tuple[dict[str, float], dict[str, float]]:
    """The six REACT metrics of predictions [N, K, T, 25], each timed.

    The functions ``reactdiff.metrics.compute_all`` calls, on the same inputs; ``frdist``
    replaces the in-process FRDist (the evaluation job spreads its DTW rows over Ray tasks).
    """
    from reactdiff import metrics as M      # torch + numba: seconds to import, only when scoring

    if binarize:
        pred = M.binarize_action_units(pred)
    metrics_fns = {
        "FRCorr": lambda: M.frcorr(pred, listener, neighbours),
        "FRDist": lambda: (frdist or M.frdist)(pred, listener, neighbours),
        "FRDiv": lambda: M.frdiv(pred),
        "FRVar": lambda: M.frvar(pred),
        "FRDvs": lambda: M.frdvs(pred),
        "FRSyn": lambda: M.frsyn(pred, speaker),
    }
    metrics, timings = {}, {}
    for name, fn in metrics_fns.items():
        t0 = time.perf_counter()
        metrics[name] = float(fn())
        timings[prefix + name] = time.perf_counter() - t0
    return metrics, timings


def score_baseline(kind: str, listener: np.ndarray, speaker: np.ndarray, neighbours: np.ndarray, *,
                   samples: int, seed: int, binarize: bool = False, frdist: FRDist | None = None,
                   train_mean: np.ndarray | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """One baseline row (``reactdiff.metrics.baseline_predictions``) scored like the model row.

    GT, Mime and Mean repeat one sequence K times (broadcast views): the metric code computes
    their DTWs once per item, so a baseline row costs about one sample's worth of FRDist.
    """
    from reactdiff import metrics as M

    pred = M.baseline_predictions(kind, listener, speaker, num_samples=samples, seed=seed, train_mean=train_mean)
    return score(pred, listener, speaker, neighbours, binarize=binarize, frdist=frdist, prefix=f"{kind}.")


# ---------------------------------------------------------------------------------------------
# What a generator consumes and how it samples
# ---------------------------------------------------------------------------------------------

def sampling_options(options) -> Sampling:
    """The ``Sampling`` of an evaluate/generate config (its steps, decoder_dropout, guidance),
    a ``ConfigError`` naming what is out of range."""
    from pipeline.config import ConfigError

    try:
        return Sampling(steps=options.steps, decoder_dropout=options.decoder_dropout, guidance=options.guidance)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def model_description(generator, guidance: float | None = None) -> dict[str, Any]:
    """What a report records about how the model samples, beside the options (issue #15 f):
    ``guidance`` is the asked scale, else the model's own."""
    config = getattr(generator, "config", None)
    if config is None:                                  # a URI: the actors loaded it
        return {} if guidance is None else {"guidance": float(guidance)}
    return {"latent_normalisation": "reference" if config.reference_normalisation_bug else "exact",
            "architecture": config.architecture,
            "guidance": float(config.diffusion.guidance if guidance is None else guidance)}


def model_features(generator) -> dict[str, int]:
    """The named per-frame inputs a generator consumes (name → width)."""
    return dict(generator.feature_widths)
