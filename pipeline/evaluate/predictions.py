"""Predictions: the Parquet contract, and the Ray Data pipeline that generates them.

Both the evaluation job (``reactdiff evaluate``) and batch generation (``reactdiff generate
--split``) make predictions with :func:`predictions_dataset`: a :class:`ReactionGenerator`
actor pool, item ``k`` generated with ``protocol.item_seed(seed, k)``.

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

import math
import os
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from pipeline import progress, runtime, storage
from pipeline.data.snapshot import Snapshot
from pipeline.evaluate.protocol import EMOTION_DIM, FRAMES, item_seed, model_features
from pipeline.registry.models import load_generator
from reactdiff.windows import Sampling

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from reactdiff.generator import ReactDiffGenerator


# ---------------------------------------------------------------------------------------------
# The Parquet contract
# ---------------------------------------------------------------------------------------------

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

    def __init__(self, generator, snapshot_uri: str, samples: int, seed: int, frames: int,
                 threads: int | None = None, sampling: Sampling = Sampling()):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(generator, str):                 # a model URI: each actor loads it
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
        self.samples, self.seed, self.frames, self.sampling = samples, seed, frames, sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [int(i) for i in batch["item"]]
        speakers = [str(s) for s in batch["speaker"]]
        clips = self.snapshot.load_clips(sorted(set(speakers)), self.features)
        inputs = {f: np.stack([np.asarray(clips[s][f], dtype=np.float32) for s in speakers])
                  for f in self.features}
        seeds = [item_seed(self.seed, i) for i in items]
        emotion = generate_reactions(self.generator, inputs, seeds, self.samples, self.device, self.sampling)
        return {"item": np.asarray(items, dtype=np.int64), "emotion": emotion[:, :, :self.frames]}


def generate_reactions(generator, inputs: Mapping[str, np.ndarray], seeds: Sequence[int], samples: int,
                       device: str = "cpu", sampling: Sampling = Sampling()) -> np.ndarray:
    """Reactions [B, K, T, 25] for a batch of speakers, row b generated with ``seeds[b]``.

    One generator call per row: a batched call with a single seed would draw row b's noise from a
    stream shared with the other rows, making results depend on batch composition.
    """
    import torch

    out = []
    with torch.inference_mode():
        for b, seed in enumerate(seeds):
            row = {k: torch.as_tensor(v[b:b + 1], device=device) for k, v in inputs.items()}
            reaction = generator.generate(row, num_samples=samples, seed=int(seed), **sampling.kwargs())
            out.append(reaction.emotion.float().cpu().numpy()[0])
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


def predictions_dataset(generator: "ReactDiffGenerator | str", snapshot: Snapshot, items: Sequence, *,
                        samples: int = 10, seed: int = 0, sampling: Sampling = Sampling(), batch_size: int = 8,
                        actors: int | None = None, frames: int = FRAMES) -> "ray.data.Dataset":
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
    # Nothing is kept from a partial run, so a lost actor fails the evaluation and a rerun repeats it.
    return runtime.map_batches_without_restarts(
        ds, ReactionGenerator,
        fn_constructor_kwargs=dict(generator=model, snapshot_uri=snapshot.uri, samples=samples, seed=seed,
                                   frames=frames, threads=int(cpus), sampling=sampling),
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size), num_gpus=gpus, num_cpus=cpus)


def generate_predictions(generator: "ReactDiffGenerator | str", snapshot: Snapshot, items: Sequence, *,
                         samples: int = 10, seed: int = 0, sampling: Sampling = Sampling(), batch_size: int = 8,
                         actors: int | None = None) -> np.ndarray:
    """Predictions [N, K, T, 25] in item order (:func:`predictions_dataset`, T = 750 frames)."""
    ds = predictions_dataset(generator, snapshot, items, samples=samples, seed=seed, sampling=sampling,
                             batch_size=batch_size, actors=actors)
    out: np.ndarray | None = None
    seen = np.zeros(len(items), dtype=bool)
    position = {int(i.index): k for k, i in enumerate(items)}
    with progress.bar(total=len(items), desc="generate reactions", unit="item") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            emotion = np.asarray(batch["emotion"], dtype=np.float32)
            if out is None:
                out = np.empty((len(items), *emotion.shape[1:]), dtype=np.float32)
            for idx, e in zip(batch["item"], emotion):
                k = position[int(idx)]
                out[k] = e
                seen[k] = True
            bar.update(len(batch["item"]))
    if out is None or not seen.all():
        raise RuntimeError(f"generation returned {int(seen.sum())} of {len(items)} items")
    return out
