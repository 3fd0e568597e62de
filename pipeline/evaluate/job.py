"""Evaluation: K generated reactions per directed item, the official REACT metrics, baseline rows.

The flow (``reactdiff evaluate``)::

    snapshot split ─ items (official order) ─┬─ Ray Data actor pool: load the generator once per
                                             │  actor (GPU when the cluster has one), read each
                                             │  speaker's features, generate K reactions with a
                                             │  per-item seed → predictions [N, K, T, 25]
                    listener / speaker emotion ┤   (or: read them from --predictions Parquet)
                    neighbour matrix A [N, N] ─┴─ metrics: FRCorr, FRDiv, FRVar, FRDvs, FRSyn on
                                                  the driver; FRDist's DTW rows over Ray tasks
                                                → the same metrics for the baseline rows
                                                → JSON report, MLflow, a table

Order contract: row ``n`` of every array (predictions, listener, speaker, A) is the n-th item
of ``split_items`` — ``Snapshot.items(split)`` in official order, i.e. the csv dyads followed by
the same dyads mirrored (metrics.md §1), less items whose clips were quarantined. Any reordering
silently breaks FRCorr/FRDist, so predictions are placed by their official ``item`` index, never
by arrival order, and a missing or duplicated item is an error.

Determinism: item ``k`` is generated with seed ``item_seed(seed, k)``, so the predictions do not
depend on how items are batched or spread over actors.

Predictions Parquet contract (written by the batch generation job, read by ``--predictions``)::

    one file or a folder of ``*.parquet`` files, one row per directed item:
      item     int64                         index in Snapshot.items(split) (0 … N−1)
      emotion  float32 tensor [K, T, 25]     K reactions, T ≥ 750 frames (first 750 are scored)
    ``emotion`` is a fixed-shape tensor column: Ray Data's tensor extension (what
    ``Dataset.write_parquet`` writes for an ndarray column), Arrow's canonical
    ``fixed_shape_tensor`` (what :func:`write_predictions` writes), or nested lists.
    Other columns (speaker, listener, tdmm, ...) are ignored. Also accepted: one row per
    (item, sample) with an int ``sample`` column and ``emotion`` [T, 25].
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from pipeline import storage
from pipeline.registry import runs as tracking

if TYPE_CHECKING:  # pragma: no cover
    import ray.data
    from mlflow.entities.model_registry import ModelVersion

    from pipeline.data.snapshot import Snapshot
    from reactdiff.generator import ReactDiffGenerator

log = logging.getLogger(__name__)

# Metric → greater is better. Printed in this order (the official evaluate.py order).
METRIC_DIRECTIONS: dict[str, bool] = {
    "FRCorr": True, "FRDist": False, "FRDiv": True, "FRVar": True, "FRDvs": True, "FRSyn": False,
}
BASELINES = ("gt", "mime", "random", "mean")
BASELINE_LABELS = {"gt": "Ground truth", "mime": "Mime (copy speaker)", "random": "Random", "mean": "Mean"}
EVAL_EXPERIMENT = "reactdiff-eval"
EMOTION_DIM = 25
FRAMES = 750        # the official evaluate.py scores frames 0..749 of every 751-frame clip


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class EvalOptions:
    """How a model is evaluated; shared by ``evaluate`` and ``promote``."""

    samples: int = 10                    # reactions per item (official: 10)
    seed: int = 0                        # base seed; item k uses item_seed(seed, k)
    steps: int | None = None             # sampler steps (None: the generator's default)
    decoder_dropout: bool = False        # sample with the frozen decoder's dropout on (the reference does)
    max_items: int | None = None         # first N items only (smoke runs; not comparable)
    binarize: bool = False               # round AU dims 0–14 of predictions before all metrics
    batch_size: int = 8                  # items per generator call
    actors: int | None = None            # generation actors (None: one per GPU, else 2 on CPU)
    frdist_tasks: int | None = None      # Ray tasks for FRDist (None: 4 per CPU, ≤ items)

    def validate(self) -> None:
        from pipeline.config import ConfigError

        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        if self.max_items is not None and self.max_items < 2:
            raise ConfigError(f"max_items must be >= 2 (FRDvs compares items), got {self.max_items}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"actors must be >= 1, got {self.actors}")


@dataclass
class EvaluateConfig(EvalOptions):
    model: str | None = None             # MODEL_URI (models:/reactdiff@champion, a file, ...)
    features: str | None = None          # snapshot URI (default: the model's snapshot tag, else latest)
    split: str = "val"
    predictions: str | None = None       # score this Parquet instead of generating
    save_predictions: str | None = None  # write the generated predictions here (Parquet contract)
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    out: str | None = None               # JSON report (default: <workspace>/outputs/eval-<split>-….json)
    mlflow: bool = True                  # log metrics to MLflow
    experiment: str = EVAL_EXPERIMENT    # used when the model is not a registry version
    ray_address: str | None = None

    def validate(self) -> None:
        from pipeline.config import ConfigError

        super().validate()
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"split must be train, val or test, got {self.split!r}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ConfigError(f"baselines: unknown {unknown[0]!r} (known: {', '.join(BASELINES)})")
        if not self.model and not self.predictions:
            raise ConfigError("pass --model MODEL_URI or --predictions URI")

    def options(self) -> EvalOptions:
        return EvalOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EvalOptions)})


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
    latent_normalisation: str | None = None                     # "exact" or "reference" (its non-inverse bug)
    architecture: str | None = None                             # stage-2 design of the model
    snapshot_id: str | None = None
    snapshot_uri: str | None = None
    model_uri: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    predictions_uri: str | None = None
    metrics_version: str | None = None                          # reactdiff.__version__

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "EvaluationReport":
        return cls(**json.loads(text))

    def table(self) -> str:
        """The model row and the baseline rows side by side, plus per-metric timings."""
        names = [m for m in METRIC_DIRECTIONS if m in self.metrics or any(m in b for b in self.baselines.values())]
        head = f"{'':<22}" + "".join(f"{m + (' ↑' if METRIC_DIRECTIONS[m] else ' ↓'):>11}" for m in names)
        label = f"model {self.model_name} v{self.model_version}" if self.model_version else "model"
        rows = [(label, self.metrics)] + [(BASELINE_LABELS.get(k, k), v) for k, v in self.baselines.items()]
        lines = [f"REACT metrics on {self.snapshot_id}/{self.split}: {self.counts.get('items', '?')} items × "
                 f"{self.samples} samples, seed {self.seed}, binarize {self.binarize}, decoder dropout "
                 f"{'on' if self.decoder_dropout else 'off'}"
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
# Seeds, ground truth, predictions I/O
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


def write_predictions(uri: str, predictions: np.ndarray, items: Sequence[int] | None = None) -> None:
    """Write predictions [N, K, T, 25] as one Parquet file following the contract above."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pred = np.ascontiguousarray(predictions, dtype=np.float32)
    if pred.ndim != 4 or pred.shape[-1] != EMOTION_DIM:
        raise ValueError(f"predictions must be [N, K, T, {EMOTION_DIM}], got {pred.shape}")
    index = np.arange(len(pred)) if items is None else np.asarray(items, dtype=np.int64)
    table = pa.table({"item": pa.array(index, pa.int64()),
                      "emotion": pa.FixedShapeTensorArray.from_numpy_ndarray(pred)})
    fs, path = storage.arrow_filesystem(uri)
    if not storage.is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(table, path, filesystem=fs)


def _tensor_rows(column) -> np.ndarray:
    """A Parquet tensor column (Ray tensor extension, Arrow fixed_shape_tensor, nested lists) → ndarray."""
    import pyarrow as pa

    parts = []
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        if isinstance(chunk, pa.FixedShapeTensorArray):
            parts.append(chunk.to_numpy_ndarray())
        elif hasattr(chunk, "to_numpy") and "tensor" in str(chunk.type).lower():
            parts.append(np.asarray(chunk.to_numpy()))          # Ray's ArrowTensorArray
        else:
            parts.append(np.asarray(chunk.to_pylist(), dtype=np.float32))
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0,), np.float32)


def read_predictions(uri: str, items: Sequence[int] | None = None, frames: int | None = None) -> np.ndarray:
    """Predictions [N, K, T, 25] from Parquet (contract in the module doc), row n = ``items[n]``.

    ``items``: the official item indices wanted, in order (default: 0 … max+1). Rows of other items
    are ignored (a ``max_items`` subset); a missing or duplicated item is an error.
    """
    import pyarrow.dataset as pds
    import ray.data  # noqa: F401  registers Ray's tensor extension type with pyarrow

    frames = frames or FRAMES
    fs, path = storage.arrow_filesystem(uri)
    try:
        table = pds.dataset(path, filesystem=fs, format="parquet").to_table()
    except FileNotFoundError:
        raise FileNotFoundError(f"predictions not found: {uri}") from None
    missing = {"item", "emotion"} - set(table.column_names)
    if missing:
        raise ValueError(f"{uri}: predictions need columns item and emotion (missing {sorted(missing)}; "
                         f"have {table.column_names})")
    item = np.asarray(table.column("item").to_numpy(), dtype=np.int64)
    emotion = _tensor_rows(table.column("emotion"))
    if "sample" in table.column_names:                   # one row per (item, sample): regroup
        sample = np.asarray(table.column("sample").to_numpy(), dtype=np.int64)
        order = np.lexsort((sample, item))
        item, sample, emotion = item[order], sample[order], emotion[order]
        if len(set(zip(item.tolist(), sample.tolist()))) != len(item):
            raise ValueError(f"{uri}: duplicated (item, sample) rows (a re-run appended instead of replacing?)")
        ids, counts = np.unique(item, return_counts=True)
        if len(set(counts.tolist())) != 1:
            raise ValueError(f"{uri}: items have different numbers of samples ({sorted(set(counts.tolist()))})")
        emotion = emotion.reshape(len(ids), int(counts[0]), *emotion.shape[1:])
        item = ids
    if emotion.ndim != 4 or emotion.shape[-1] != EMOTION_DIM:
        raise ValueError(f"{uri}: emotion must be [K, T, {EMOTION_DIM}] per item, got {emotion.shape[1:]}")
    if emotion.shape[2] < frames:
        raise ValueError(f"{uri}: predictions have {emotion.shape[2]} frames; the metrics need {frames}")
    ids, counts = np.unique(item, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{uri}: item {int(ids[counts > 1][0])} appears {int(counts.max())} times "
                         "(a re-run appended instead of replacing?)")
    wanted = np.arange(int(item.max()) + 1 if len(item) else 0) if items is None else np.asarray(items, np.int64)
    row = {int(i): r for r, i in enumerate(item)}
    absent = [int(i) for i in wanted if int(i) not in row]
    if absent:
        raise ValueError(f"{uri}: predictions for {len(absent)} of {len(wanted)} items are missing "
                         f"(first: {absent[:5]})")
    return np.ascontiguousarray(emotion[[row[int(i)] for i in wanted]][:, :, :frames])


# ---------------------------------------------------------------------------------------------
# Generation (Ray Data actor pool)
# ---------------------------------------------------------------------------------------------

class ReactionGenerator:
    """Ray Data actor: holds one generator (loaded once), turns item batches into reactions.

    Speaker features are read from the snapshot inside the actor, by clip id, so the object store
    carries item ids in and reactions out — never the (large) per-frame input features.
    """

    def __init__(self, generator, snapshot_uri: str, samples: int, steps: int | None, seed: int,
                 frames: int, threads: int | None = None, decoder_dropout: bool = False):
        import torch

        from pipeline.data.snapshot import Snapshot

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(generator, str):                 # a model URI: each actor loads it
            from pipeline.registry.models import load_generator

            generator, _ = load_generator(generator, map_location=self.device)
        else:                                          # generator file bytes (weights only)
            import ray

            from reactdiff.generator import ReactDiffGenerator

            # Ray Data hands constructor kwargs over as they are: resolve the object ref here.
            data = ray.get(generator) if isinstance(generator, ray.ObjectRef) else generator
            generator = ReactDiffGenerator.from_bytes(data, map_location=self.device)
        self.generator = generator.eval()
        self.features = list(model_features(self.generator))
        self.snapshot = Snapshot.open(snapshot_uri)
        missing = [f for f in self.features if f not in self.snapshot.features]
        if missing:
            raise ValueError(f"the generator needs features {missing} that snapshot {self.snapshot.id} lacks "
                             f"(it has {sorted(self.snapshot.features)}); evaluate on a snapshot "
                             "extracted with the model's feature set")
        self.samples, self.steps, self.seed, self.frames = samples, steps, seed, frames
        self.decoder_dropout = decoder_dropout

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [int(i) for i in batch["item"]]
        speakers = [str(s) for s in batch["speaker"]]
        clips = self.snapshot.load_clips(sorted(set(speakers)), self.features)
        inputs = {f: np.stack([np.asarray(clips[s][f], dtype=np.float32) for s in speakers])
                  for f in self.features}
        seeds = [item_seed(self.seed, i) for i in items]
        emotion = generate_reactions(self.generator, inputs, seeds, self.samples, self.steps, self.device,
                                     decoder_dropout=self.decoder_dropout)
        return {"item": np.asarray(items, dtype=np.int64), "emotion": emotion[:, :, :self.frames]}


def model_description(generator) -> dict[str, Any]:
    """What a report records about how the model samples, beside the options (issue #15 f)."""
    config = getattr(generator, "config", None)
    if config is None:                                  # a URI: the actors loaded it
        return {}
    return {"latent_normalisation": "reference" if config.reference_normalisation_bug else "exact",
            "architecture": config.architecture}


def model_features(generator) -> dict[str, int]:
    """The named per-frame inputs a generator consumes (name → width)."""
    return dict(generator.feature_widths)


def generate_reactions(generator, inputs: Mapping[str, np.ndarray], seeds: Sequence[int], samples: int,
                       steps: int | None, device: str = "cpu", *, decoder_dropout: bool = False) -> np.ndarray:
    """Reactions [B, K, T, 25] for a batch of speakers, row b generated with ``seeds[b]``.

    One generator call per row: a batched call with a single seed would draw row b's noise from a
    stream shared with the other rows, making results depend on batch composition.
    """
    import torch

    out = []
    with torch.inference_mode():
        for b, seed in enumerate(seeds):
            row = {k: torch.as_tensor(v[b:b + 1], device=device) for k, v in inputs.items()}
            kwargs = {"num_samples": samples, "seed": int(seed), "decoder_dropout": decoder_dropout}
            if steps is not None:
                kwargs["steps"] = steps
            reaction = generator.generate(row, **kwargs)
            emotion = reaction.emotion if hasattr(reaction, "emotion") else reaction["emotion"]
            out.append(torch.as_tensor(emotion).float().cpu().numpy()[0])
    return np.stack(out)


def actor_pool(actors: int | None, items: int, batch_size: int) -> tuple[int, float, float]:
    """(pool size, GPUs per actor, CPUs per actor) for generating ``items`` in batches.

    One actor per GPU when the cluster has GPUs; on CPU two actors (each with a share of the
    cores as torch threads, one core left for Ray Data's own tasks). Never more actors than
    batches: each actor loads the whole generator.
    """
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    batches = max(1, math.ceil(items / batch_size))
    if gpus:
        return max(1, min(actors or gpus, batches)), 1.0, 1.0
    size = max(1, min(actors or max(1, min(2, cpus // 2)), batches))
    return size, 0.0, max(1.0, float(cpus // (size + 1)))


def predictions_dataset(generator: "ReactDiffGenerator | str", snapshot: "Snapshot", items: Sequence, *,
                        samples: int = 10, seed: int = 0, steps: int | None = None, batch_size: int = 8,
                        actors: int | None = None, frames: int = FRAMES,
                        decoder_dropout: bool = False) -> "ray.data.Dataset":
    """The (lazy) Ray Dataset of reactions for ``items``: one row per item, ``item`` int64 and
    ``emotion`` float32 [K, frames, 25] (the raw generator output), in no particular order.

    Generated by a :class:`ReactionGenerator` actor pool sized by :func:`actor_pool`, item ``k``
    with seed ``item_seed(seed, k)``. ``generator`` is a loaded generator (shipped to the actors
    through the object store) or a model URI each actor loads itself (better for big models on a
    cluster).
    """
    import ray
    import ray.data

    size, gpus, cpus = actor_pool(actors, len(items), batch_size)
    # A model URI is loaded by each actor; a loaded generator travels as its weights-only file
    # bytes (ReactDiffGenerator.save), put once in the object store.
    model = generator if isinstance(generator, str) else ray.put(generator.to_bytes())
    rows = [{"item": int(i.index), "speaker": i.speaker} for i in items]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    return ds.map_batches(
        ReactionGenerator,
        fn_constructor_kwargs=dict(generator=model, snapshot_uri=snapshot.uri, samples=samples,
                                   steps=steps, seed=seed, frames=frames, threads=int(cpus),
                                   decoder_dropout=decoder_dropout),
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size), num_gpus=gpus, num_cpus=cpus)


def generate_predictions(generator: "ReactDiffGenerator | str", snapshot: "Snapshot", items: Sequence, *,
                         samples: int = 10, seed: int = 0, steps: int | None = None, batch_size: int = 8,
                         actors: int | None = None, decoder_dropout: bool = False) -> np.ndarray:
    """Predictions [N, K, T, 25] in item order (:func:`predictions_dataset`, T = 750 frames)."""
    ds = predictions_dataset(generator, snapshot, items, samples=samples, seed=seed, steps=steps,
                             batch_size=batch_size, actors=actors, decoder_dropout=decoder_dropout)
    out: np.ndarray | None = None
    seen = np.zeros(len(items), dtype=bool)
    position = {int(i.index): k for k, i in enumerate(items)}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        emotion = np.asarray(batch["emotion"], dtype=np.float32)
        if out is None:
            out = np.empty((len(items), *emotion.shape[1:]), dtype=np.float32)
        for idx, e in zip(batch["item"], emotion):
            k = position[int(idx)]
            out[k] = e
            seen[k] = True
    if out is None or not seen.all():
        raise RuntimeError(f"generation returned {int(seen.sum())} of {len(items)} items")
    return out


# ---------------------------------------------------------------------------------------------
# Metrics (FRDist distributed over Ray tasks)
# ---------------------------------------------------------------------------------------------

def _frdist_chunk(pred, samples: int, listener, neighbours, start: int, stop: int) -> np.ndarray:
    """Ray task: ``reactdiff.metrics.frdist_rows`` for items [start, stop), one numba thread."""
    from reactdiff import metrics as M

    if pred.shape[1] != samples:   # a repeated-sample baseline travels as one sample: re-broadcast
        pred = np.broadcast_to(pred, (pred.shape[0], samples, *pred.shape[2:]))
    return M.frdist_rows(pred, listener, neighbours, np.arange(start, stop), num_threads=1)


def frdist_distributed(pred: np.ndarray, listener: np.ndarray, neighbours: np.ndarray,
                       tasks: int | None = None) -> float:
    """FRDist with its DTW rows split over Ray tasks (contiguous chunks of items).

    FRDist is the mean of the per-item values of ``frdist_rows``, so concatenating the chunks in
    item order and taking the mean gives the single-process ``frdist`` bit for bit. A baseline
    that repeats one reaction K times (a broadcast view) is shipped as one sample.
    """
    import ray

    n, samples = pred.shape[:2]
    if tasks is None:
        tasks = 4 * int(ray.cluster_resources().get("CPU", 1))
    tasks = max(1, min(int(tasks), n))
    compact = pred[:, :1] if pred.strides[1] == 0 else pred
    refs = [ray.put(np.ascontiguousarray(compact)), samples, ray.put(listener), ray.put(neighbours)]
    remote = ray.remote(num_cpus=1)(_frdist_chunk)
    bounds = np.linspace(0, n, tasks + 1).astype(int)
    futures = [remote.remote(*refs, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    pending, step, t0 = list(futures), max(1, len(futures) // 10), time.perf_counter()
    last = t0
    while pending:   # progress for long runs (the official val set is hours of DTW on one core)
        done, pending = ray.wait(pending, num_returns=min(step, len(pending)))
        now = time.perf_counter()
        if now - last >= 30 or (not pending and now - t0 >= 30):   # quiet for short runs
            last = now
            log.info("FRDist: %d/%d row chunks done (%.0fs)", len(futures) - len(pending), len(futures), now - t0)
    return float(np.mean(np.concatenate(ray.get(futures))))


def score(pred: np.ndarray, listener: np.ndarray, speaker: np.ndarray, neighbours: np.ndarray, *,
          binarize: bool = False, frdist_tasks: int | None = None, distributed: bool = True,
          prefix: str = "") -> tuple[dict[str, float], dict[str, float]]:
    """The six REACT metrics of predictions [N, K, T, 25], each timed.

    The functions ``reactdiff.metrics.compute_all`` calls, on the same inputs; only FRDist's rows
    are spread over Ray tasks when ``distributed``.
    """
    from reactdiff import metrics as M

    if binarize:
        pred = M.binarize_action_units(pred)
    frdist = ((lambda: frdist_distributed(pred, listener, neighbours, frdist_tasks)) if distributed
              else (lambda: M.frdist(pred, listener, neighbours)))
    metrics_fns = {
        "FRCorr": lambda: M.frcorr(pred, listener, neighbours),
        "FRDist": frdist,
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
                   samples: int, seed: int, binarize: bool = False, frdist_tasks: int | None = None,
                   train_mean: np.ndarray | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """One baseline row (``reactdiff.metrics.baseline_predictions``) scored like the model row.

    GT, Mime and Mean repeat one sequence K times (broadcast views): the metric code computes
    their DTWs once per item, so a baseline row costs about one sample's worth of FRDist.
    """
    from reactdiff import metrics as M

    pred = M.baseline_predictions(kind, listener, speaker, num_samples=samples, seed=seed, train_mean=train_mean)
    return score(pred, listener, speaker, neighbours, binarize=binarize, frdist_tasks=frdist_tasks,
                 prefix=f"{kind}.")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def evaluate_predictions(pred: np.ndarray, snapshot: "Snapshot", split: str, *, seed: int = 0,
                         max_items: int | None = None, baselines: Iterable[str] = BASELINES,
                         binarize: bool = False, frdist_tasks: int | None = None,
                         timings: Mapping[str, float] | None = None, **info: Any) -> EvaluationReport:
    """Score predictions [N, K, T, 25] (row n = the n-th item of ``split_items``, see the order
    contract) and the baseline rows. ``seed`` seeds the Random baseline; ``info`` fills the
    report's descriptive fields (model_uri, model_name, model_version, steps, predictions_uri)."""
    import reactdiff

    t0 = time.perf_counter()
    items, neighbours, dropped = split_items(snapshot, split, max_items)
    pred = np.asarray(pred, dtype=np.float32)
    if pred.ndim != 4 or pred.shape[-1] != EMOTION_DIM:
        raise ValueError(f"predictions must be [N, K, T, {EMOTION_DIM}], got {pred.shape}")
    if len(pred) != len(items):
        raise ValueError(f"{len(pred)} predictions for {len(items)} items of {snapshot.id}/{split}")
    frames = FRAMES
    if pred.shape[2] < frames:
        raise ValueError(f"predictions have {pred.shape[2]} frames; the metrics need {frames}")
    pred = pred[:, :, :frames]
    listener, speaker = ground_truth(snapshot, items, frames)
    all_timings = dict(timings or {})
    all_timings["ground_truth"] = time.perf_counter() - t0
    metrics, t = score(pred, listener, speaker, neighbours, binarize=binarize, frdist_tasks=frdist_tasks)
    all_timings.update(t)
    rows = {}
    train_mean = train_mean_emotion(snapshot, frames) if "mean" in baselines else None
    for kind in baselines:
        rows[kind], t = score_baseline(kind, listener, speaker, neighbours, samples=pred.shape[1], seed=seed,
                                       binarize=binarize, frdist_tasks=frdist_tasks, train_mean=train_mean)
        all_timings.update(t)
    info = {k: v for k, v in info.items() if k in {f.name for f in dataclasses.fields(EvaluationReport)}}
    return EvaluationReport(
        split=split, metrics=metrics, baselines=rows, timings=all_timings,
        counts={"items": len(items), "samples": int(pred.shape[1]), "frames": frames,
                "appropriate_pairs": int(np.count_nonzero(neighbours)),
                "items_left_out": dropped,
                "full_split": int(not dropped and (max_items is None or max_items >= len(snapshot.items(split))))},
        samples=int(pred.shape[1]), seed=seed, binarize=binarize,
        snapshot_id=snapshot.id, snapshot_uri=snapshot.uri, metrics_version=reactdiff.__version__, **info)


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


def evaluate_generator(generator: "ReactDiffGenerator | str", snapshot: "Snapshot", split: str, *,
                       samples: int = 10, seed: int = 0, steps: int | None = None,
                       decoder_dropout: bool = False, max_items: int | None = None, baselines: Iterable[str] = BASELINES,
                       binarize: bool = False, batch_size: int = 8, actors: int | None = None,
                       frdist_tasks: int | None = None, model_uri: str | None = None,
                       model_version: "ModelVersion | None" = None,
                       save_predictions: str | None = None) -> EvaluationReport:
    """Generate K reactions per item of ``split`` over Ray, then score them (see the module doc).

    ``save_predictions``: also write them as Parquet (the contract above) to re-score later.
    """
    items, _, _ = split_items(snapshot, split, max_items)
    t0 = time.perf_counter()
    pred = generate_predictions(generator, snapshot, items, samples=samples, seed=seed, steps=steps,
                                batch_size=batch_size, actors=actors, decoder_dropout=decoder_dropout)
    timings = {"generate": time.perf_counter() - t0}
    if save_predictions:
        write_predictions(save_predictions, pred, [i.index for i in items])
    if model_uri is None and isinstance(generator, str):
        model_uri = generator
    return evaluate_predictions(
        pred, snapshot, split, seed=seed, max_items=max_items, baselines=baselines,
        binarize=binarize, frdist_tasks=frdist_tasks, timings=timings, steps=steps, model_uri=model_uri,
        predictions_uri=save_predictions, decoder_dropout=decoder_dropout, **model_description(generator), model_name=model_version.name if model_version else None,
        model_version=str(model_version.version) if model_version else None)


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------

def log_report(report: EvaluationReport, *, version: "ModelVersion | None" = None,
               experiment: str = EVAL_EXPERIMENT) -> str:
    """Log ``report`` to MLflow; returns the run id.

    A registry version's metrics go to the run that produced it (``val_FRCorr`` next to the
    training curves); anything else gets a new run in ``experiment``. The JSON report is an
    artifact of that run either way.
    """
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    c = tracking.client()
    run_id = getattr(version, "run_id", None) if version is not None else None
    new_run = not run_id
    if new_run:
        run_id = tracking.create_run(
            experiment=experiment,
            run_name=f"eval-{report.split}-{report.model_name or 'model'}"
                     f"{'-v' + report.model_version if report.model_version else ''}",
            tags={"reactdiff.kind": "evaluation", "reactdiff.split": report.split,
                  "reactdiff.snapshot_id": report.snapshot_id, "reactdiff.model_uri": report.model_uri,
                  "reactdiff.model_version": report.model_version,
                  "reactdiff.predictions": report.predictions_uri},
            params={"split": report.split, "samples": report.samples, "seed": report.seed,
                    "binarize": report.binarize, "steps": report.steps, "items": report.counts.get("items"),
                    "decoder_dropout": report.decoder_dropout,
                    "latent_normalisation": report.latent_normalisation,
                    "architecture": report.architecture})
    now = get_current_time_millis()
    values = {f"{report.split}_{k}": v for k, v in report.metrics.items()}
    if new_run:  # baseline rows next to the model row in the evaluation run's table
        for kind, row in report.baselines.items():
            values.update({f"{report.split}_{kind}_{k}": v for k, v in row.items()})
    rows = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None and math.isfinite(v)]
    c.log_batch(run_id, metrics=rows)
    c.log_text(run_id, report.to_json(), f"evaluation/{report.split}_report.json")
    if new_run:
        tracking.finish_run(run_id)
    return run_id


# Metrics of a registry version per evaluation protocol, kept in a version tag so that
# `reactdiff evaluate` followed by `reactdiff promote` (or two promotions) score a version once.
EVAL_TAG = "eval."


def evaluation_tag(split: str, snapshot_id: str, options: EvalOptions) -> str:
    """The version tag for one protocol: same snapshot, split, samples, seed, steps, item limit,
    binarize flag and metric code ⇒ the same predictions and metrics."""
    import hashlib

    import reactdiff

    protocol = {"snapshot": snapshot_id, "split": split, "metrics_version": reactdiff.__version__,
                **dataclasses.asdict(options)}
    for k in ("batch_size", "actors", "frdist_tasks"):   # execution knobs, not the protocol
        protocol.pop(k, None)
    digest = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    return f"{EVAL_TAG}{split}.{digest}"


def record_evaluation(version: "ModelVersion", report: EvaluationReport, options: EvalOptions) -> None:
    tag = evaluation_tag(report.split, report.snapshot_id, options)
    value = json.dumps({"metrics": report.metrics, "snapshot": report.snapshot_id, "split": report.split,
                        "samples": options.samples, "seed": options.seed, "items": report.counts.get("items")},
                       sort_keys=True)
    tracking.client().set_model_version_tag(version.name, str(version.version), tag, value)


def cached_evaluation(version: "ModelVersion", split: str, snapshot_id: str,
                      options: EvalOptions) -> dict[str, float] | None:
    """Metrics recorded by :func:`record_evaluation` for this protocol, or None."""
    tags = tracking.client().get_model_version(version.name, str(version.version)).tags or {}
    value = tags.get(evaluation_tag(split, snapshot_id, options))
    return None if value is None else {k: float(v) for k, v in json.loads(value)["metrics"].items()}


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def open_snapshot(ref: str | None, version: "ModelVersion | None" = None) -> "Snapshot":
    """The snapshot to evaluate on: ``ref`` (URI, id under the workspace's snapshots, or
    ``latest``), else the one the version was trained on (tags ``snapshot_uri``, ``snapshot``,
    ``snapshot_id``), else the newest complete snapshot in the workspace."""
    from pipeline.runtime import workspace
    from pipeline.data.snapshot import Snapshot

    tags = (version.tags or {}) if version is not None else {}
    ref = ref or tags.get("snapshot_uri") or tags.get("snapshot") or tags.get("snapshot_id") or "latest"
    if "/" in ref:                      # a URI or path: no need to touch the workspace
        return Snapshot.open(ref)
    return Snapshot.resolve(ref, workspace().snapshots)


def run_evaluation(cfg: EvaluateConfig) -> EvaluationReport:
    """The ``reactdiff evaluate`` job: generate or read predictions, score, report, log."""
    from pipeline import runtime
    from pipeline.registry.models import resolve_version

    runtime.init_ray(cfg.ray_address)
    version = resolve_version(cfg.model) if cfg.model else None
    snapshot = open_snapshot(cfg.features, version)
    opts = cfg.options()
    if cfg.predictions:
        items, _, _ = split_items(snapshot, cfg.split, cfg.max_items)
        t0 = time.perf_counter()
        pred = read_predictions(cfg.predictions, [i.index for i in items])
        report = evaluate_predictions(
            pred, snapshot, cfg.split, seed=cfg.seed, max_items=cfg.max_items, baselines=cfg.baselines,
            binarize=cfg.binarize, frdist_tasks=cfg.frdist_tasks,
            timings={"read_predictions": time.perf_counter() - t0}, model_uri=cfg.model,
            predictions_uri=cfg.predictions, model_name=version.name if version else None,
            model_version=str(version.version) if version else None)
    else:
        from pipeline.registry.models import load_generator

        generator, _ = load_generator(cfg.model)
        report = evaluate_generator(generator, snapshot, cfg.split, baselines=cfg.baselines,
                                    model_uri=cfg.model, model_version=version,
                                    save_predictions=cfg.save_predictions, **dataclasses.asdict(opts))
    out = cfg.out or storage.join(runtime.workspace().outputs,
                                  f"eval-{cfg.split}-{snapshot.id}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    storage.write_text(out, report.to_json())
    if cfg.mlflow:
        run_id = log_report(report, version=version, experiment=cfg.experiment)
        log.info("metrics logged to MLflow run %s", run_id)
        if version is not None and not cfg.predictions:
            record_evaluation(version, report, opts)
    print(report.table())
    print(f"report: {out}")
    return report
