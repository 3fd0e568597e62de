"""Publishing a snapshot, the extraction job's last step: ``finalize`` writes the quarantine, items,
neighbours and mean face and returns the manifest, which ``pipeline.data.extract`` writes as
``_manifest.json`` last (``_report.json`` instead when too many clips failed), so a snapshot
without ``_manifest.json`` is never taken as complete. ``format_report`` formats the printed report.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.snapshot import FORMAT

log = logging.getLogger(__name__)


def code_version() -> dict[str, Any]:
    import reactdiff

    commit = None
    repo = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        if res.returncode == 0:
            commit = res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {"reactdiff": reactdiff.__version__, "git_commit": commit}
    for name in ("ray", "torch", "torchaudio", "pyarrow", "decord"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return versions


def finalize(cfg, plan, dataset, splits, rows, summaries, features, fs_hash, base, snapshot_id, started,
             timings) -> dict[str, Any]:
    """Write quarantine, items, neighbours and mean face; return the manifest (not yet written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import react

    uri = plan.snapshot_uri
    ok = {cid: s for cid, s in summaries.items() if s["status"] in ("ok", "carried")}
    bad = [summaries[r["clip_id"]] for r in rows if summaries[r["clip_id"]]["status"] == "error"]

    quarantine = [{"clip_id": s["clip_id"], "split": s["split"], "uri": storage.redact(s["error_uri"]),
                   "stage": s["stage"], "reason": s["reason"]} for s in bad]
    qfs, qpath = storage.arrow_filesystem(storage.join(uri, "quarantine", "quarantine.parquet"))
    if not storage.is_remote(uri):
        os.makedirs(os.path.dirname(qpath), exist_ok=True)
    schema = pa.schema([(k, pa.string()) for k in ("clip_id", "split", "uri", "stage", "reason")])
    pq.write_table(pa.Table.from_pylist(quarantine, schema=schema), qpath, filesystem=qfs)

    split_info: dict[str, Any] = {}
    problems = []
    for split in splits:
        items = dataset.items(split)
        available = [s.speaker in ok and s.listener in ok for s in items]
        table = pa.table({"item": pa.array([i.index for i in items], pa.int32()),
                          "speaker": [i.speaker for i in items], "listener": [i.listener for i in items],
                          "mirrored": [i.mirrored for i in items], "available": available})
        ifs, ipath = storage.arrow_filesystem(storage.join(uri, "items", f"{split}.parquet"))
        if not storage.is_remote(uri):
            os.makedirs(os.path.dirname(ipath), exist_ok=True)
        pq.write_table(table, ipath, filesystem=ifs)
        try:
            matrix = dataset.neighbours(split)
        except react.ReactLayoutError as exc:
            problems.append({"uri": storage.redact(exc.uri), "reason": exc.reason})
            matrix = None
        if matrix is not None:
            storage.write_npy(storage.join(uri, "neighbours", f"{split}.npy"), matrix.astype(np.uint8))
        split_ids = sorted(cid for cid, s in ok.items() if s["split"] == split)
        split_info[split] = {"clips": split_ids, "items": len(items), "items_available": int(sum(available)),
                             "neighbours": matrix is not None,
                             "quarantined": sum(1 for q in quarantine if q["split"] == split)}
    mean_face = None
    try:
        mean_face = dataset.mean_face()
    except react.ReactLayoutError as exc:
        problems.append({"uri": storage.redact(exc.uri), "reason": exc.reason})
    if mean_face is not None:
        storage.write_npy(storage.join(uri, "mean_face.npy"), mean_face.astype(np.float32))
    else:
        log.warning(MEAN_FACE_MISSING)

    processed = [s for s in ok.values() if s["status"] == "ok"]
    carried = [s for s in ok.values() if s["status"] == "carried"]
    frames_processed = sum(int(s["num_frames"]) for s in processed)
    sizes = [int(s["bytes"]) for s in ok.values()]
    column_bytes: dict[str, list[int]] = {}
    for s in ok.values():
        for col, n in json.loads(s["column_bytes"] or "{}").items():
            column_bytes.setdefault(col, []).append(int(n))
    total_frames = sum(int(s["num_frames"]) for s in ok.values())
    pipeline_s = timings["pipeline_s"]
    return {
        "format": FORMAT,
        "id": snapshot_id,
        "created_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "source": {"uri": storage.redact(dataset.root), "release": dataset.release, "splits": splits},
        "feature_set": {"name": features.name, "hash": fs_hash, "source": features.source,
                        "config": features.raw, "resolved": features.describe(fps=cfg.fps, frames=cfg.frames),
                        "models": features.models()},
        "features": {e.column: {"width": e.width, "dtype": e.dtype, "kind": e.kind, "extractor": e.name,
                                "type": e.type, "needs_gpu": e.needs_gpu} for e in features.extractors},
        "code": code_version(),
        "config": {k: (storage.redact(v) if isinstance(v, str) else v) for k, v in asdict(cfg).items()
                   if k != "models"},
        "incremental_from": base.id if base is not None else None,
        "counts": {"clips": len(ok), "processed": len(processed), "carried": len(carried),
                   "quarantined": len(quarantine), "considered": len(rows), "frames": total_frames,
                   "frames_processed": frames_processed,
                   "per_split": {s: {"clips": len(v["clips"]), "quarantined": v["quarantined"]}
                                 for s, v in split_info.items()}},
        "splits": split_info,
        "clips": {cid: {"split": s["split"], "file": s["file"], "bytes": int(s["bytes"]),
                        "num_frames": int(s["num_frames"]), "content_hash": s["content_hash"],
                        "carried": s["status"] == "carried",
                        "column_bytes": json.loads(s["column_bytes"] or "{}")}
                  for cid, s in sorted(ok.items())},
        "quarantine": quarantine,
        "problems": problems,
        "mean_face": mean_face is not None,
        "bytes": {"total": sum(sizes), "per_clip_mean": (sum(sizes) / len(sizes)) if sizes else 0,
                  "per_clip_max": max(sizes) if sizes else 0,
                  "per_frame_mean": (sum(sizes) / total_frames) if total_frames else 0,
                  "per_column_per_clip_mean": {c: sum(v) / len(v) for c, v in column_bytes.items()}},
        "timings": {**timings,
                    "frames_per_s": frames_processed / pipeline_s if pipeline_s > 0 and processed else 0.0,
                    "prepare_s_sum": sum(float(s["prepare_s"]) for s in summaries.values()),
                    "video_s_sum": sum(float(s["video_s"]) for s in summaries.values()),
                    "audio_s_sum": sum(float(s["audio_s"]) for s in summaries.values()),
                    "network_s_sum": sum(float(s["network_s"]) for s in summaries.values()),
                    "write_s_sum": sum(float(s["write_s"]) for s in summaries.values())},
        "resources": {"peak_worker_rss_mb": max((float(s["peak_rss_mb"]) for s in summaries.values()), default=0.0)},
    }


MEAN_FACE_MISSING = ("the dataset root has no mean_face.npy: 3DMM targets stay absolute FaceVerse coefficients "
                     "(the reference subtracts the REACT baseline's mean face); copy mean_face.npy into the "
                     "dataset root and re-extract to train as the paper does")


def format_report(manifest: dict[str, Any], published: bool, max_failure_fraction: float) -> str:
    """The summary table printed at the end of the job."""
    c, t, b = manifest["counts"], manifest["timings"], manifest["bytes"]
    lines = [f"snapshot {manifest['id']}  feature set {manifest['feature_set']['name']} "
             f"({manifest['feature_set']['hash'][:8]})"]
    header = f"  {'split':<8}{'clips':>8}{'processed':>11}{'carried':>9}{'quarantined':>13}"
    lines.append(header)
    carried_by_split: dict[str, int] = {}
    for info in manifest["clips"].values():
        if info["carried"]:
            carried_by_split[info["split"]] = carried_by_split.get(info["split"], 0) + 1
    for split, info in manifest["splits"].items():
        n, car = len(info["clips"]), carried_by_split.get(split, 0)
        lines.append(f"  {split:<8}{n:>8}{n - car:>11}{car:>9}{info['quarantined']:>13}")
    lines.append(f"  {'total':<8}{c['clips']:>8}{c['processed']:>11}{c['carried']:>9}{c['quarantined']:>13}")
    if not manifest.get("mean_face"):
        lines.append(f"  warning: {MEAN_FACE_MISSING}")
    lines.append(f"  time {t['total_s']:.1f} s (pipeline {t['pipeline_s']:.1f} s), "
                 f"{t['frames_per_s']:.0f} frames/s extracted, {b['per_clip_mean'] / 1e6:.2f} MB per clip "
                 f"({b['total'] / 1e6:.1f} MB in all), peak worker RSS "
                 f"{manifest['resources']['peak_worker_rss_mb']:.0f} MB")
    if manifest["quarantine"]:
        lines.append("  quarantined clips:")
        for q in manifest["quarantine"][:20]:
            lines.append(f"    {q['clip_id']} [{q['split']}] {q['stage']}: {q['reason']}  ({q['uri']})")
        if len(manifest["quarantine"]) > 20:
            lines.append(f"    ... {len(manifest['quarantine']) - 20} more in quarantine/quarantine.parquet")
    fraction = c["quarantined"] / max(1, c["considered"])
    if published:
        lines.append(f"  published (manifest written); {fraction:.1%} quarantined "
                     f"(limit {max_failure_fraction:.1%})")
    else:
        lines.append(f"  NOT published: {fraction:.1%} of clips quarantined, above max_failure_fraction "
                     f"{max_failure_fraction:.1%}. Fix the inputs (see _report.json) or raise the limit "
                     "with --set max_failure_fraction=...")
    return "\n".join(lines)
