"""A tiny feature snapshot for the evaluation tests, and the generator layout that reads it.

The snapshot is written directly in the reader's format (``pipeline.data.snapshot``: one Parquet file
per clip with ``list<fixed_size_list>`` feature cells, items, neighbours, manifest last) with
narrow features, instead of decoding synthetic videos: evaluation only reads speaker features,
labels, items and the neighbour matrix, and this takes milliseconds instead of a minute.
The neighbour matrix is not the identity (each item has 1–3 appropriate neighbours) so that
FRCorr/FRDist's max/min over neighbours is exercised.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.snapshot import FORMAT, MANIFEST, clip_file, tensor_array

SPLIT = "val"
DYADS = 3                 # → 6 directed items
FRAMES = 751              # REACT clips; the metrics use the first 750
FEATURES = {"video_pixels": (8, "float16", "facial"), "audio_mfcc26": (26, "float32", "acoustic"),
            "emotion": (25, "float32", "label")}
# ``tiny_generator(seed, GENERATOR, random_stats=True)`` (tests.helpers.models): the ``small``
# preset with this snapshot's input widths.
GENERATOR = dict(facial={"video_pixels": FEATURES["video_pixels"][0]}, acoustic={"audio_mfcc26": 26}, hidden_dim=32)


def _emotion(rng: np.random.Generator, frames: int) -> np.ndarray:
    """25-d attributes like REACT's: 15 binary AUs (some never fire → constant), VA, 8 probabilities."""
    aus = (rng.random((frames, 15)) < rng.random(15) * 0.3).astype(np.float32)
    aus[:, :3] = 0.0
    va = np.cumsum(rng.normal(0, 0.02, (frames, 2)), axis=0).astype(np.float32)
    logits = rng.normal(0, 1, (frames, 8))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return np.concatenate([aus, va, probs.astype(np.float32)], axis=1)


def write_tiny_snapshot(root: str, snapshot_id: str = "20260101T000000Z-tiny", dyads: int = DYADS,
                        seed: int = 0, quarantined: tuple[str, ...] = ()) -> str:
    """Write a complete snapshot with one split of ``dyads`` dyads; returns its URI."""
    rng = np.random.default_rng(seed)
    uri = storage.join(root, snapshot_id)
    pairs = [(f"NoXI/{d:03d}_session/Expert_video/1", f"NoXI/{d:03d}_session/Novice_video/1") for d in range(dyads)]
    clips = [c for pair in pairs for c in pair]
    manifest_clips = {}
    for clip_id in clips:
        if clip_id in quarantined:
            continue
        cols = {"clip_id": pa.array([clip_id]), "split": pa.array([SPLIT]),
                "num_frames": pa.array([FRAMES], pa.int32())}
        for name, (width, dtype, _) in FEATURES.items():
            values = _emotion(rng, FRAMES) if name == "emotion" else rng.normal(0, 1, (FRAMES, width))
            cols[name] = tensor_array(np.asarray(values, dtype=dtype))
        rel = clip_file(SPLIT, clip_id)
        fs, path = storage.arrow_filesystem(storage.join(uri, rel))
        storage.makedirs(storage.join(uri, "clips", SPLIT, *clip_id.split("/")[:-1]))
        pq.write_table(pa.table(cols), path, filesystem=fs)
        manifest_clips[clip_id] = {"split": SPLIT, "file": rel, "num_frames": FRAMES}

    items = [(s, l, False) for s, l in pairs] + [(l, s, True) for s, l in pairs]
    fs, path = storage.arrow_filesystem(storage.join(uri, "items", f"{SPLIT}.parquet"))
    storage.makedirs(storage.join(uri, "items"))
    pq.write_table(pa.table({"item": pa.array(range(len(items)), pa.int32()),
                             "speaker": [i[0] for i in items], "listener": [i[1] for i in items],
                             "mirrored": [i[2] for i in items]}), path, filesystem=fs)
    n = len(items)
    neighbours = np.eye(n, dtype=np.uint8)
    for k in range(n):
        neighbours[k, rng.choice(n, size=2, replace=False)] = 1
    storage.write_npy(storage.join(uri, "neighbours", f"{SPLIT}.npy"), neighbours)
    manifest = {
        "format": FORMAT, "id": snapshot_id,
        "feature_set": {"name": "tiny", "hash": "tiny0000"},
        "features": {name: {"width": w, "dtype": d, "kind": k} for name, (w, d, k) in FEATURES.items()},
        "splits": {SPLIT: {"clips": sorted(manifest_clips), "items": n, "neighbours": True}},
        "clips": manifest_clips,
        "quarantine": [{"clip_id": c, "split": SPLIT, "uri": c, "stage": "decode", "reason": "broken"}
                       for c in quarantined],
        "mean_face": False,
    }
    storage.write_text(storage.join(uri, MANIFEST), json.dumps(manifest))
    return uri

