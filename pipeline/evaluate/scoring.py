"""Scoring a model or its predictions on a snapshot split, over Ray.

The flow (``reactdiff evaluate``, and each version ``reactdiff promote`` compares)::

    snapshot split ─ items (official order) ─┬─ Ray Data actor pool: load the generator once per
                                             │  actor (GPU when the cluster has one), read each
                                             │  speaker's features, generate K reactions with a
                                             │  per-item seed → predictions [N, K, T, 25]
                    listener / speaker emotion ┤   (or: read them from --predictions Parquet)
                    neighbour matrix A [N, N] ─┴─ metrics: FRCorr, FRDiv, FRVar, FRDvs, FRSyn on
                                                  the driver; FRDist's DTW rows over Ray tasks
                                                → the same metrics for the baseline rows
                                                → EvaluationReport

The rules (item order, seeds, ground truth, metrics) are ``pipeline.evaluate.protocol``; the
predictions pipeline and Parquet contract are ``pipeline.evaluate.predictions``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

import reactdiff
from pipeline import plots, progress
from pipeline.config import ConfigError, option
from pipeline.data.snapshot import Snapshot
from pipeline.evaluate.predictions import generate_predictions, write_predictions
from pipeline.evaluate.protocol import (BASELINES, EMOTION_DIM, FRAMES, EvaluationReport, ground_truth,
                                        model_description, sampling_options, score, score_baseline,
                                        split_items, train_mean_emotion)
from pipeline.runtime import workspace

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities.model_registry import ModelVersion

    from reactdiff.generator import ReactDiffGenerator
    from reactdiff.windows import Sampling



@dataclass
class EvalOptions:
    """How a model is evaluated; shared by ``evaluate`` and ``promote``."""

    samples: int = option(10, "reactions per item (the official protocol draws 10)", flag="--samples")
    seed: int = option(0, "base seed; item k uses item_seed(seed, k)", flag="--seed")
    steps: int | None = option(None, "DDIM steps (default: the generator's schedule)", flag="--steps")
    decoder_dropout: bool = option(False, "sample with the frozen decoder's dropout on, as the reference does "
                                          "(more diverse, less faithful)", flag="--decoder-dropout")
    guidance: float | None = option(None, "classifier-free guidance scale (null: the model's own; 1 = none)",
                                    flag="--guidance")
    max_items: int | None = option(None, "only the first N items (smoke runs; not comparable with full-split "
                                         "numbers)", flag="--max-items")
    binarize: bool = option(False, "round the 15 AU dims of the predictions to {0,1} before all metrics",
                            flag="--binarize")
    batch_size: int = option(8, "items per generator call")
    actors: int | None = option(None, "generation actors (null: one per GPU, else 2 on CPU)")
    frdist_tasks: int | None = option(None, "Ray tasks that split FRDist's DTW rows (null: 16 per cluster CPU, "
                                            "<= items)")

    def sampling(self) -> Sampling:
        """How the reactions are drawn (steps, decoder dropout, guidance); checks them."""
        return sampling_options(self)

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")
        if self.max_items is not None and self.max_items < 2:
            raise ConfigError(f"max_items must be >= 2 (FRDvs compares items), got {self.max_items}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        self.sampling()
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"actors must be >= 1, got {self.actors}")


# ---------------------------------------------------------------------------------------------
# FRDist over Ray tasks
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
        # Many small chunks: a chunk's cost varies with its items' neighbour counts and with how
        # soon each minimum is found, and the last chunks to finish leave cores idle. At 16 per
        # CPU the tail is ~1/16 of a CPU's share (REACT val: 1 s tasks on a 4-slot laptop).
        tasks = 16 * int(ray.cluster_resources().get("CPU", 1))
    tasks = max(1, min(int(tasks), n))
    compact = pred[:, :1] if pred.strides[1] == 0 else pred
    refs = [ray.put(np.ascontiguousarray(compact)), samples, ray.put(listener), ray.put(neighbours)]
    remote = ray.remote(num_cpus=1)(_frdist_chunk)
    bounds = np.linspace(0, n, tasks + 1).astype(int)
    futures = [remote.remote(*refs, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    rows = dict(zip(futures, (b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a)))
    pending = list(futures)
    with progress.bar(total=n, desc="FRDist", unit="item") as bar:
        while pending:   # the official val set is hours of DTW on one core
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(rows[done[0]])
    return float(np.mean(np.concatenate(ray.get(futures))))


# ---------------------------------------------------------------------------------------------
# Scoring predictions, evaluating a generator
# ---------------------------------------------------------------------------------------------

def evaluate_predictions(pred: np.ndarray, snapshot: Snapshot, split: str, options: EvalOptions, *,
                         baselines: Iterable[str] = BASELINES, timings: Mapping[str, float] | None = None,
                         **info: Any) -> EvaluationReport:
    """Score predictions [N, K, T, 25] (row n = the n-th item of ``split_items``, see the order
    contract) and the baseline rows, on the items, seeds (``options.seed`` seeds the Random
    baseline) and metric options of ``options``; ``info`` fills the report's descriptive fields
    (model_uri, model_name, model_version, steps, predictions_uri)."""
    t0 = time.perf_counter()
    items, neighbours, dropped = split_items(snapshot, split, options.max_items)
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
    frdist = functools.partial(frdist_distributed, tasks=options.frdist_tasks)
    metrics, t = score(pred, listener, speaker, neighbours, binarize=options.binarize, frdist=frdist)
    all_timings.update(t)
    rows = {}
    train_mean = train_mean_emotion(snapshot, frames) if "mean" in baselines else None
    for kind in baselines:
        rows[kind], t = score_baseline(kind, listener, speaker, neighbours, samples=pred.shape[1],
                                       seed=options.seed, binarize=options.binarize, frdist=frdist,
                                       train_mean=train_mean)
        all_timings.update(t)
    info = {k: v for k, v in info.items() if k in {f.name for f in dataclasses.fields(EvaluationReport)}}
    max_items = options.max_items
    return EvaluationReport(
        split=split, metrics=metrics, baselines=rows, timings=all_timings,
        counts={"items": len(items), "samples": int(pred.shape[1]), "frames": frames,
                "appropriate_pairs": int(np.count_nonzero(neighbours)),
                "items_left_out": dropped,
                "full_split": int(not dropped and (max_items is None or max_items >= len(snapshot.items(split))))},
        samples=int(pred.shape[1]), seed=options.seed, binarize=options.binarize,
        snapshot_id=snapshot.id, snapshot_uri=snapshot.uri, metrics_version=reactdiff.__version__, **info)


def evaluate_generator(generator: "ReactDiffGenerator | str", snapshot: Snapshot, split: str,
                       options: EvalOptions, *, baselines: Iterable[str] = BASELINES,
                       model_uri: str | None = None, model_version: "ModelVersion | None" = None,
                       save_predictions: str | None = None) -> EvaluationReport:
    """Generate K reactions per item of ``split`` over Ray, then score them (see the module doc).

    ``save_predictions``: also write them as Parquet (``pipeline.evaluate.predictions``) to
    re-score later.
    """
    o = options
    items, _, _ = split_items(snapshot, split, o.max_items)
    t0 = time.perf_counter()
    pred = generate_predictions(generator, snapshot, items, samples=o.samples, seed=o.seed, sampling=o.sampling(),
                                batch_size=o.batch_size, actors=o.actors)
    timings = {"generate": time.perf_counter() - t0}
    if save_predictions:
        write_predictions(save_predictions, pred, [i.index for i in items])
    if model_uri is None and isinstance(generator, str):
        model_uri = generator
    report = evaluate_predictions(
        pred, snapshot, split, o, baselines=baselines, timings=timings, steps=o.steps, model_uri=model_uri,
        predictions_uri=save_predictions, decoder_dropout=o.decoder_dropout,
        **model_description(generator, guidance=o.guidance),
        model_name=model_version.name if model_version else None,
        model_version=str(model_version.version) if model_version else None)
    report.figures = reaction_figures(pred, snapshot, items)
    return report


FIGURE_ITEMS = 2     # reaction plots per evaluation (MLflow artifacts)


def reaction_figures(pred: np.ndarray, snapshot: Snapshot, items, n: int = FIGURE_ITEMS) -> dict[str, bytes]:
    """The K reactions of the first ``n`` items under their speaker's attributes, beside the real
    listener: what a model's numbers look like."""
    items = list(items)[:n]
    listener, speaker = ground_truth(snapshot, items, FRAMES)
    return {f"reaction_item{item.index:04d}.png": plots.figure_png(plots.plot_reactions(
                pred[k][:, :FRAMES], speaker[k], real_emotion=listener[k],
                title=f"{snapshot.id} {item.split} item {item.index}"))
            for k, item in enumerate(items)}


def open_snapshot(ref: str | None, version: "ModelVersion | None" = None) -> Snapshot:
    """The snapshot to evaluate on: ``ref`` (URI, id under the workspace's snapshots, or
    ``latest``), else the one the version was trained on (tags ``snapshot_uri``, ``snapshot``,
    ``snapshot_id``), else the newest complete snapshot in the workspace."""
    tags = (version.tags or {}) if version is not None else {}
    ref = ref or tags.get("snapshot_uri") or tags.get("snapshot") or tags.get("snapshot_id") or "latest"
    if "/" in ref:                      # a URI or path: no need to touch the workspace
        return Snapshot.open(ref)
    return Snapshot.resolve(ref, workspace().snapshots)
