"""Stage 2's latent pairs: every directed item's (speaker, listener) latents under the frozen
stage 1, encoded once by a Ray Data actor pool and cached as Parquet in the run folder.

Why pre-encoding is exact and what it saves: see the module docstring of pipeline.train.job.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time

import numpy as np

from pipeline import runtime, storage
from pipeline.data.snapshot import Snapshot
from pipeline.registry.models import load_generator_file
from pipeline.train.config import TrainError

log = logging.getLogger(__name__)

PAIRS_MARKER = "_SUCCESS.json"


class LatentPairEncoder:
    """Ray Data actor: directed items → (speaker latent, listener latent) with the frozen stage 1."""

    def __init__(self, snapshot_uri: str, autoencoder_uri: str, batch_size: int):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.snapshot = Snapshot.open(snapshot_uri)
        self.gen = load_generator_file(autoencoder_uri, map_location=self.device).eval()
        self.columns = list(self.gen.feature_widths)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        clip_ids = sorted(set(batch["speaker"].tolist()) | set(batch["listener"].tolist()))
        clips = self.snapshot.load_clips(clip_ids, self.columns)
        latents: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for i in range(0, len(clip_ids), self.batch_size):
                ids = clip_ids[i:i + self.batch_size]
                feats = {c: torch.from_numpy(np.stack([clips[k][c][: self.gen.config.seq_len] for k in ids]))
                         for c in self.columns}
                z = self.gen.encode(feats).float().cpu().numpy()
                latents.update(zip(ids, z))
        return {"item": batch["item"], "speaker": batch["speaker"], "listener": batch["listener"],
                "speaker_latent": np.stack([latents[s] for s in batch["speaker"]]),
                "listener_latent": np.stack([latents[s] for s in batch["listener"]])}


def _file_digest(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]


def prepare_latent_pairs(snapshot, split: str, autoencoder_uri: str, out_uri: str, *,
                         batch_size: int = 8, actors: int = 1, use_gpu: bool = False) -> tuple[str, int]:
    """Encode every directed item of ``split`` once into ``out_uri`` (Parquet); reused when complete.

    Items are ordered by dyad so an item and its mirror share a batch (each clip encoded once).
    Written under ``out_uri`` with the marker last; an incomplete folder is wiped and redone.
    """
    import ray.data

    digest = _file_digest(autoencoder_uri)
    items = snapshot.items(split)
    marker_uri = storage.join(out_uri, PAIRS_MARKER)
    if storage.exists(marker_uri):
        marker = storage.read_json(marker_uri)
        if marker.get("autoencoder_digest") == digest and marker.get("items") == len(items):
            log.info("latent pairs for %s already encoded at %s", split, out_uri)
            return out_uri, len(items)
    storage.remove(out_uri)
    if not items:
        raise TrainError(f"snapshot {snapshot.id} has no {split} items")
    rows = sorted(({"item": int(i.index), "speaker": i.speaker, "listener": i.listener} for i in items),
                  key=lambda r: (min(r["speaker"], r["listener"]), max(r["speaker"], r["listener"]), r["item"]))
    t0 = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / (2 * batch_size))))
    # Idempotent (the marker is written last, an incomplete folder is redone): no actor restarts.
    ds = runtime.map_batches_without_restarts(
        ds, LatentPairEncoder, fn_constructor_args=(snapshot.uri, autoencoder_uri, batch_size),
        batch_size=2 * batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)), num_gpus=1 if use_gpu else 0)
    fs, path = storage.arrow_filesystem(out_uri)
    storage.makedirs(out_uri)
    ds.write_parquet(path, filesystem=fs)
    storage.write_json(marker_uri, {"autoencoder_uri": autoencoder_uri, "autoencoder_digest": digest,
                                    "items": len(items), "split": split, "snapshot": snapshot.id,
                                    "seconds": round(time.perf_counter() - t0, 2)})
    log.info("encoded %d %s items into latent pairs in %.1fs", len(items), split, time.perf_counter() - t0)
    return out_uri, len(items)


def _read_pair_files(batch, root: str):
    """Ray Data UDF: read whole latent-pair Parquet files (the two latent columns only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's tensor extension type with pyarrow)

    fs, base = storage.arrow_filesystem(root)
    tables = [pq.read_table(f"{base.rstrip('/')}/{rel}", columns=["speaker_latent", "listener_latent"],
                            filesystem=fs) for rel in batch.column("file").to_pylist()]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def pairs_dataset(uri: str):
    """The latent pairs as a Ray Dataset, one block per file.

    The file list is taken once here, so each epoch re-reads the files without
    ``read_parquet``'s per-execution listing and footer-reading tasks (seconds per epoch on a
    small machine — more than a small epoch's compute).
    """
    import ray.data

    files = [{"file": f} for f in storage.walk_files(uri, ".parquet")]
    if not files:
        raise TrainError(f"no latent-pair files under {storage.redact(uri)}")
    ds = ray.data.from_items(files, override_num_blocks=len(files))
    return ds.map_batches(_read_pair_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"root": uri})
