"""Feature extraction as a Ray Data job: REACT clips -> per-frame features -> a snapshot.

The job reads top to bottom as the data flows, one person clip per row, streaming (a clip's
751 frames are decoded 64 at a time and reduced to 224 crops at once; nothing holds a split):

    clip manifest (pipeline.data.react)      driver: one small row per person clip
    -> prepare        task per clip    fingerprint the source files (sizes + mtimes/ETags);
                                       unchanged since --incremental-from: copy its file over;
                                       else decode (decord / soundfile) and run the CPU
                                       extractors (pixels, mfcc, logmel, labels)
    -> facial networks   actor pool    TorchScript networks on the 224 crops (GPU if present)
    -> acoustic networks actor pool    wav2vec2 on 16 kHz audio (GPU if present)
    -> write          task per clip    one Parquet file per clip (float16 + zstd)
    driver: quarantine, items, neighbours, mean face, then ``_manifest.json`` last
                                       (pipeline.data.snapshot.SnapshotWriter)

Why one Parquet file per clip, written by our own task rather than ``Dataset.write_parquet``:
file names are deterministic (``clips/<split>/<clip_id>.parquet``), so a retried task
overwrites instead of appending a duplicate (write_parquet names files with random uuids); an
incremental run carries an unchanged clip over with one server-side copy, without decoding or
re-encoding; ``load_clips`` fetches one clip with one GET; and the writer sees the exact bytes
per clip and per column for the manifest. REACT clips are ~1.6 MB (demo set) to ~40 MB
(paper set) of compressed features, a sensible Parquet file size.

A clip that fails anywhere (corrupt/truncated video, missing file, wrong frame count, NaN
labels, a worker that died) becomes a quarantine row with file and reason; the snapshot is
published (manifest written) unless the quarantined fraction exceeds ``max_failure_fraction``.

The per-clip feature path (decoding, CPU extractors, network stages) is pipeline.data.clip,
which ``reactdiff generate`` runs on a new speaker clip too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline import config as config_mod
from pipeline.config import option
from pipeline import storage
from pipeline import progress, runtime
from pipeline.data import react
from pipeline.data.clip import (CLIP_FIELDS, SUMMARY_DEFAULTS, ClipPlan, clip_row, decode_clip, network_stages,
                                peak_rss_mb, to_batch, to_row)
from pipeline.data.features import FeatureSet, load_feature_set
from pipeline.data.media import ClipError, _short
from pipeline.data.snapshot import (MEAN_FACE_MISSING, Bytes, ClipEntry, ColumnEntry, Counts, FeatureSetRecord, Manifest, Problem,
                                    QuarantineEntry, Resources, Snapshot, SnapshotError, SnapshotWriter, Source,
                                    SplitCounts, SplitEntry, Timings)

log = logging.getLogger(__name__)

# Ray Data retries a map task whose worker died forever by default (max_retries=-1, and
# max_task_retries=-1 for actor pools): a clip that kills its worker on every attempt (a decoder
# segfault, out of memory) would hang the job. After this many retries the block fails, the job
# goes on (max_errored_blocks=-1) and the driver quarantines the clip with stage "worker".
# The caps reach Ray only through map_batches(**ray_remote_args), deprecated in Ray 2.60 for
# removal in 2.64 without a named replacement: pyproject.toml caps ray below 2.64.
TASK_RETRIES = 3


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ExtractConfig:
    """``reactdiff extract`` settings (jobs/configs/extract.yaml; every key can be ``--set``)."""
    data: str | None = option(None, "REACT dataset root: local path or s3://bucket/prefix (required)",
                              flag="--data")
    out: str | None = option(None, "snapshots root (default: <workdir>/snapshots)", flag="--out")
    feature_set: str = option("demo", "demo | paper | path to a feature-set YAML", flag="--feature-set")
    models: dict[str, str] = option({}, "model file of extractor NAME (repeatable), e.g. au=s3://models/au.pt",
                                    flag="--model", metavar="NAME=URI")
    splits: list[str] = option([], "only these splits (train val test; default: every split with a csv)",
                               flag="--splits", metavar="SPLIT")
    incremental_from: str | None = option(None, "carry unchanged clips over from this snapshot (URI, id, or "
                                          "'latest' under out)", flag="--incremental-from", metavar="SNAPSHOT")
    fps: float = option(25.0, "REACT video rate; audio frames are rate / fps samples")
    frames: int | None = option(None, "crop/pad every clip to this many frames (REACT: 751); "
                                      "null: each clip's own video frame count")
    frame_tolerance: int = option(2, "frames the modalities of one clip may differ by (padded/cropped) "
                                     "before quarantine")
    max_pad_fraction: float = option(0.02, "a video at most this fraction of the labels' frames short is padded "
                                           "by repeating its last frame (with a warning); beyond: quarantined")
    face_crop: bool = option(False, "the videos are not face crops (REACT's are): detect, track and crop the "
                                    "face of every frame (pipeline.data.face_crop)")
    decode_chunk: int = option(64, "frames decoded at once (bounds memory per task)")
    compression_level: int = option(3, "zstd level of the Parquet files")
    max_failure_fraction: float = option(0.05, "quarantined fraction above which nothing is published (exit 1)")
    device: str = option("auto", "where networks run: auto (GPU when the cluster has one) | cpu | cuda")
    network_actors: int | None = option(None, "max actors per network stage (default: number of GPUs, or 1)")
    cpus_per_actor: float = option(1.0, "CPUs per network actor")
    limit: int | None = option(None, "only the first N clips (smoke runs)", flag="--limit")
    ray_address: str | None = option(None, "Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray "
                                           "on 127.0.0.1)", flag="--ray-address")

    def validate(self) -> None:
        if not self.data:
            raise config_mod.ConfigError("data: the REACT dataset root is required (--data URI)")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise config_mod.ConfigError("max_failure_fraction must be in [0, 1]")
        if self.fps <= 0:
            raise config_mod.ConfigError("fps must be > 0")
        if self.frames is not None and self.frames < 1:
            raise config_mod.ConfigError("frames must be >= 1 (or null)")
        if not 0.0 <= self.max_pad_fraction < 1.0:
            raise config_mod.ConfigError("max_pad_fraction must be in [0, 1)")
        if self.frame_tolerance < 0 or self.decode_chunk < 1:
            raise config_mod.ConfigError("frame_tolerance must be >= 0 and decode_chunk >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise config_mod.ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 1 <= self.compression_level <= 22:
            raise config_mod.ConfigError("compression_level must be in 1..22 (zstd)")
        unknown = sorted(set(self.splits) - {"train", "val", "test"})
        if unknown:
            raise config_mod.ConfigError(f"splits: unknown split {unknown[0]!r} (train, val, test)")


@dataclass
class Plan:
    """What every task needs (pickled into Ray tasks; extractors carry no weights yet)."""

    clip: ClipPlan               # how a clip becomes features
    writer: SnapshotWriter       # where its file goes


@dataclass
class ExtractResult:
    snapshot: Snapshot | None       # None when not published (failure fraction above the limit)
    uri: str
    manifest: Manifest
    published: bool
    report: str

    @property
    def exit_code(self) -> int:
        return 0 if self.published else 1


# ---------------------------------------------------------------------------------------------
# Stage 1: prepare (fingerprint, carry over, decode, CPU features)


def fingerprint(row: dict[str, Any], root: str, modalities: list[str]) -> str:
    """sha256 over path, size and mtime (local) or ETag (S3) of the clip's source files.

    Cheap (one stat/HEAD per file, one listing per PNG folder) and changes whenever a file is
    replaced; a copy of the dataset elsewhere gets new mtimes and is re-extracted.
    """
    h = hashlib.sha256()
    for modality in modalities:
        uri = row.get(f"{modality}_uri") or ""
        if not uri:
            h.update(f"{modality}:missing\n".encode())
            continue
        fs, path = storage.filesystem(uri)
        rel = uri[len(root):] if uri.startswith(root) else uri
        if modality == "video" and row.get("video_format") == "png":
            entries = sorted(fs.ls(path, detail=True), key=lambda e: e["name"])
        else:
            entries = [fs.info(path)]
        for e in entries:
            token = e.get("ETag") or e.get("etag") or e.get("mtime") or e.get("LastModified") or ""
            h.update(f"{modality}:{rel}:{e['name'].rsplit('/', 1)[-1]}:{e.get('size')}:{token}\n".encode())
    return h.hexdigest()


def prepare_clip(row: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Stage 1 for one clip; never raises (a failure becomes status=error with stage and reason)."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {**SUMMARY_DEFAULTS, **{k: row.get(k) or "" for k in CLIP_FIELDS}}
    try:
        out["content_hash"] = fingerprint(row, plan.clip.root, plan.clip.features.modalities())
        if row.get("base_hash") and row["base_hash"] == out["content_hash"]:
            try:
                copied = plan.writer.copy_clip(row["base_file"], row["split"], row["clip_id"])
                out.update(status="carried", file=copied.file, bytes=copied.bytes, num_frames=int(row["base_frames"]),
                           column_bytes=row.get("base_column_bytes") or "{}")
            except Exception as exc:  # the previous snapshot lost the file: extract it again
                log.warning("cannot carry %s over from the previous snapshot (%s); extracting it",
                            row["clip_id"], _short(exc))
        if out["status"] != "carried":
            out.update(decode_clip(row, plan.clip))
    except ClipError as exc:
        out.update(status="error", stage=exc.stage, error_uri=exc.uri, reason=exc.reason)
    except Exception as exc:  # anything unexpected in one clip must not stop the job
        out.update(status="error", stage="prepare", error_uri=row.get("video_uri") or row.get("audio_uri") or "",
                   reason=_short(exc))
    out["prepare_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ---------------------------------------------------------------------------------------------
# Stage 4: write one Parquet file per clip (stages 2 and 3, the networks: pipeline.data.clip)


def write_stage(row: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Stage 4 for one clip: write it (if ok) and return its small summary row."""
    summary = {k: row.get(k, v) for k, v in SUMMARY_DEFAULTS.items()}
    if row["status"] == "ok":
        t0 = time.perf_counter()
        try:
            written = plan.writer.write_clip(row)
            summary.update(file=written.file, bytes=written.bytes, column_bytes=json.dumps(written.column_bytes))
        except ClipError as exc:
            summary.update(status="error", stage=exc.stage, error_uri=exc.uri, reason=exc.reason)
        except Exception as exc:
            summary.update(status="error", stage="write", error_uri=plan.writer.uri, reason=_short(exc))
        summary["write_s"] = time.perf_counter() - t0
    summary["peak_rss_mb"] = max(float(summary["peak_rss_mb"]), peak_rss_mb())
    return {k: type(SUMMARY_DEFAULTS[k])(summary[k]) for k in SUMMARY_DEFAULTS}


def _prepare_batch(batch, plan: Plan):
    return to_batch(prepare_clip(to_row(batch), plan))


def _write_batch(batch, plan: Plan):
    return to_batch(write_stage(to_row(batch), plan))


def _prepare_and_write_batch(batch, plan: Plan):
    # Feature sets without networks: decode, extract and write in one task, so a clip's
    # features never pass through the object store.
    return to_batch(write_stage(prepare_clip(to_row(batch), plan), plan))


# ---------------------------------------------------------------------------------------------
# The job


def build_pipeline(rows: list[dict[str, Any]], plan: Plan, cfg: ExtractConfig):
    """The Ray Dataset of summary rows: manifest rows -> prepare -> networks -> write."""
    import ray
    import ray.data

    # One row per block: a clip is the unit of parallelism, of retry and of failure.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    stages = network_stages(plan.clip.features)
    task_args = dict(batch_size=1, num_cpus=1, max_retries=TASK_RETRIES, fn_kwargs={"plan": plan})
    if not stages:
        with runtime.remote_args_of_map_batches():
            ds = ds.map_batches(_prepare_and_write_batch, **task_args)
    else:
        ds = ds.map_batches(_prepare_batch, **task_args)
        resources = ray.cluster_resources()
        gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        # device=cuda asks for GPUs even when none is up yet (an autoscaler adds GPU nodes);
        # two network stages share each GPU (one actor of each per GPU).
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus >= 1)
        gpu_share = 1.0 / len(stages) if use_gpu else 0.0
        actors = cfg.network_actors or (max(1, int(gpus)) if use_gpu else max(1, int(cpus // (4 * len(stages)))))
        for cls, kwargs in stages:
            ds = ds.map_batches(cls, batch_size=1, fn_constructor_kwargs={**kwargs, "device": cfg.device},
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                                num_cpus=cfg.cpus_per_actor, num_gpus=gpu_share or None,
                                # a dead actor is restarted, but its clip is not retried forever
                                max_task_retries=TASK_RETRIES)
        with runtime.remote_args_of_map_batches():
            ds = ds.map_batches(_write_batch, **task_args)
    # Every per-clip error is caught in the UDFs; should Ray still drop a block (an error outside
    # them), the job goes on and the driver quarantines the clip that has no summary row.
    ds.context.max_errored_blocks = -1
    return ds


def feature_policy(cfg: ExtractConfig) -> dict[str, Any]:
    """The job settings that change the numbers, hashed with the feature set: a face-cropped
    snapshot never carries clips over from an uncropped one (off adds nothing: old hashes hold)."""
    policy: dict[str, Any] = {"fps": cfg.fps, "frames": cfg.frames}
    if cfg.face_crop:
        policy["face_crop"] = True
    return policy


def new_snapshot_id(feature_set_hash: str, out_root: str) -> str:
    now = datetime.now(timezone.utc)
    # Millisecond UTC stamps: ids sort by start time, so `latest` is right even for quick re-runs.
    stamp = now.strftime("%Y%m%dT%H%M%S") + f".{now.microsecond // 1000:03d}Z"
    base = f"{stamp}-{feature_set_hash[:8]}"
    candidate, n = base, 1
    while storage.exists(storage.join(out_root, candidate)):
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def _base_rows(base: Snapshot | None, fs_hash: str, root: str) -> dict[str, dict[str, Any]]:
    """clip_id -> what the previous snapshot knows about it, if its features are reusable."""
    if base is None:
        return {}
    if base.feature_set_hash != fs_hash:
        log.warning("incremental: snapshot %s has feature-set hash %s, this run %s: extracting every clip",
                    base.id, base.feature_set_hash[:8], fs_hash[:8])
        return {}
    if base.manifest.source.uri != storage.redact(root):
        log.warning("incremental: snapshot %s came from %s, this run reads %s: extracting every clip",
                    base.id, base.manifest.source.uri, storage.redact(root))
        return {}
    return {cid: {"base_hash": info.content_hash, "base_split": info.split,
                  "base_file": storage.join(base.uri, info.file), "base_frames": int(info.num_frames),
                  "base_column_bytes": json.dumps(info.column_bytes)}
            for cid, info in base.manifest.clips.items()}


@dataclass
class _Inputs:
    """What an extraction reads, resolved before anything is written."""

    out_root: str
    features: FeatureSet
    dataset: react.ReactDataset
    splits: list[str]
    clips: list
    fs_hash: str
    base: Snapshot | None
    base_rows: dict[str, dict[str, Any]]


def _inputs(cfg: ExtractConfig) -> _Inputs:
    out_root = cfg.out or runtime.workspace().snapshots
    features = load_feature_set(cfg.feature_set, cfg.models)
    dataset = react.open_dataset(cfg.data)
    splits = list(cfg.splits) or dataset.splits
    missing = [s for s in splits if s not in dataset.splits]
    if missing:
        raise config_mod.ConfigError(f"splits: the dataset has no {missing[0]}.csv (splits: {', '.join(dataset.splits)})")
    clips = [c for s in splits for c in dataset.clips(s)]
    if cfg.limit is not None:
        clips = clips[:cfg.limit]
    features.resolve()
    fs_hash = features.hash(**feature_policy(cfg))

    base = None
    if cfg.incremental_from:
        try:
            base = Snapshot.resolve(cfg.incremental_from, out_root)
        except SnapshotError:
            if cfg.incremental_from != "latest":
                raise
            log.info("incremental: no complete snapshot under %s yet: extracting every clip", storage.redact(out_root))
    return _Inputs(out_root, features, dataset, splits, clips, fs_hash, base, _base_rows(base, fs_hash, dataset.root))


def dry_run(cfg: ExtractConfig) -> str:
    """The plan of ``extract(cfg)`` without writing anything: which clips would be decoded and
    which carried over (same fingerprint as in the base snapshot), and where the snapshot goes."""
    i = _inputs(cfg)
    carried = [c for c in i.clips if (prev := i.base_rows.get(c.clip_id)) and prev["base_split"] == c.split
               and prev["base_hash"] == fingerprint(clip_row(c), i.dataset.root, i.features.modalities())]
    per_split = Counter(c.split for c in i.clips)
    lines = [f"extract (dry run): {len(i.clips)} clips of {storage.redact(i.dataset.root)} "
             f"({', '.join(f'{s} {per_split[s]}' for s in i.splits)})",
             f"  feature set {i.features.name} ({i.fs_hash[:8]}), columns {', '.join(e.column for e in i.features.extractors)}",
             f"  decode {len(i.clips) - len(carried)}, carry over {len(carried)}"
             + (f" from snapshot {i.base.id}" if i.base is not None else " (no base snapshot)"),
             f"  would write {storage.redact(storage.join(i.out_root, '<UTC time>-' + i.fs_hash[:8]))}/"]
    return "\n".join(lines)


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run the extraction job; publishes ``<out>/<snapshot id>/`` unless too many clips failed."""
    started = time.time()
    t_plan = time.perf_counter()
    i = _inputs(cfg)
    out_root, features, dataset, splits, clips, fs_hash, base, base_rows = (
        i.out_root, i.features, i.dataset, i.splits, i.clips, i.fs_hash, i.base, i.base_rows)

    snapshot_id = new_snapshot_id(fs_hash, out_root)
    snapshot_uri = storage.join(out_root, snapshot_id)
    storage.makedirs(snapshot_uri)
    writer = SnapshotWriter(snapshot_uri, features.extractors, cfg.fps, cfg.compression_level)
    plan = Plan(ClipPlan(features, cfg.fps, cfg.frames, cfg.frame_tolerance, cfg.decode_chunk, dataset.root,
                         cfg.max_pad_fraction, cfg.face_crop), writer)
    rows = []
    for c in clips:
        row = clip_row(c)
        prev = base_rows.get(c.clip_id)
        if prev and prev["base_split"] == c.split:
            row.update({k: v for k, v in prev.items() if k != "base_split"})
        else:
            row.update(base_hash="", base_file="", base_frames=0, base_column_bytes="{}")
        rows.append(row)
    plan_s = time.perf_counter() - t_plan
    log.info("extract: %d clips (%s) -> %s, feature set %s (%s), %d candidates to carry over",
             len(rows), ", ".join(splits), storage.redact(snapshot_uri), features.name, fs_hash[:8],
             sum(1 for r in rows if r["base_hash"]))

    t_pipe = time.perf_counter()
    summaries: dict[str, dict[str, Any]] = {}
    if rows:
        runtime.init_ray(cfg.ray_address)
        with progress.bar(total=len(rows), desc="extract", unit="clip") as bar:
            for s in build_pipeline(rows, plan, cfg).iter_rows():
                summaries[s["clip_id"]] = s
                bar.update()
                bar.set_postfix(quarantined=sum(v["status"] == "error" for v in summaries.values()), refresh=False)
    pipeline_s = time.perf_counter() - t_pipe

    # A clip without a summary was in a block Ray dropped after its worker died on every retry.
    for row in rows:
        if row["clip_id"] not in summaries:
            summaries[row["clip_id"]] = {**SUMMARY_DEFAULTS, "clip_id": row["clip_id"], "split": row["split"],
                                         "status": "error", "stage": "worker",
                                         "error_uri": row["video_uri"] or row["audio_uri"],
                                         "reason": "no result: the worker died on every retry (a decoder "
                                                   "crash or out of memory); see the Ray worker logs"}
    t_fin = time.perf_counter()
    ok = {cid: summaries[cid] for cid in sorted(summaries) if summaries[cid]["status"] in ("ok", "carried")}
    quarantine = [QuarantineEntry(s["clip_id"], s["split"], storage.redact(s["error_uri"]), s["stage"], s["reason"])
                  for s in (summaries[r["clip_id"]] for r in rows) if s["status"] == "error"]
    split_entries, problems, mean_face = write_tables(writer, dataset, splits, ok, quarantine)
    manifest = Manifest(
        id=snapshot_id, created_at=datetime.fromtimestamp(started, timezone.utc).isoformat(),
        source=Source(storage.redact(dataset.root), dataset.release, splits),
        feature_set=FeatureSetRecord(features.name, fs_hash, features.source, features.raw,
                                     features.describe(**feature_policy(cfg)), features.models()),
        features={e.column: ColumnEntry(e.width, e.dtype, e.kind, e.name, e.type, e.needs_gpu)
                  for e in features.extractors},
        code=code_version(),
        config={k: (storage.redact(v) if isinstance(v, str) else v) for k, v in asdict(cfg).items() if k != "models"},
        incremental_from=base.id if base is not None else None,
        splits=split_entries, quarantine=quarantine, problems=problems, mean_face=mean_face,
        clips={cid: ClipEntry(s["split"], s["file"], int(s["bytes"]), int(s["num_frames"]), s["content_hash"],
                              s["status"] == "carried", json.loads(s["column_bytes"] or "{}"),
                              s["warnings"].splitlines())
               for cid, s in ok.items()},
    )
    fill_statistics(manifest, summaries, considered=len(rows), plan_s=plan_s, pipeline_s=pipeline_s)
    fraction = manifest.counts.quarantined / max(1, len(rows))
    published = fraction <= cfg.max_failure_fraction
    manifest.timings.finalize_s = time.perf_counter() - t_fin
    manifest.timings.total_s = time.time() - started
    if published:
        snapshot = writer.publish(manifest)            # the manifest last
    else:
        snapshot = None                                # no manifest: never read
        writer.write_report(manifest)
    report = format_report(manifest, published, cfg.max_failure_fraction)
    return ExtractResult(snapshot, snapshot_uri, manifest, published, report)


# ---------------------------------------------------------------------------------------------
# Publishing: the driver's tables, statistics, the report


def write_tables(writer: SnapshotWriter, dataset: react.ReactDataset, splits: list[str], ok: dict[str, dict],
                 quarantine: list[QuarantineEntry]) -> tuple[dict[str, SplitEntry], list[Problem], bool]:
    """Quarantine, items, neighbours and mean face; (split entries, dataset problems, has mean face)."""
    writer.write_quarantine(quarantine)
    entries: dict[str, SplitEntry] = {}
    problems = []
    for split in splits:
        items = dataset.items(split)
        available = [s.speaker in ok and s.listener in ok for s in items]
        writer.write_items(split, items, available)
        try:
            matrix = dataset.neighbours(split)
        except react.ReactLayoutError as exc:
            problems.append(Problem(storage.redact(exc.uri), exc.reason))
            matrix = None
        if matrix is not None:
            writer.write_neighbours(split, matrix)
        entries[split] = SplitEntry(sorted(cid for cid, s in ok.items() if s["split"] == split), len(items),
                                    int(sum(available)), matrix is not None,
                                    sum(1 for q in quarantine if q.split == split))
    mean_face = None
    try:
        mean_face = dataset.mean_face()
    except react.ReactLayoutError as exc:
        problems.append(Problem(storage.redact(exc.uri), exc.reason))
    if mean_face is not None:
        writer.write_mean_face(mean_face)
    else:
        log.warning(MEAN_FACE_MISSING)
    return entries, problems, mean_face is not None


def fill_statistics(manifest: Manifest, summaries: dict[str, dict[str, Any]], *, considered: int,
                    plan_s: float, pipeline_s: float) -> None:
    """Counts, bytes, timings and resources of the manifest, from its clips and every summary row."""
    clips = list(manifest.clips.values())
    carried = sum(1 for c in clips if c.carried)
    frames_processed = sum(c.num_frames for c in clips if not c.carried)
    total_frames = sum(c.num_frames for c in clips)
    manifest.counts = Counts(
        clips=len(clips), processed=len(clips) - carried, carried=carried, quarantined=len(manifest.quarantine),
        considered=considered, frames=total_frames, frames_processed=frames_processed,
        per_split={s: SplitCounts(len(v.clips), v.quarantined) for s, v in manifest.splits.items()})
    sizes = [c.bytes for c in clips]
    column_bytes: dict[str, list[int]] = {}
    for c in clips:
        for col, n in c.column_bytes.items():
            column_bytes.setdefault(col, []).append(int(n))
    manifest.bytes = Bytes(total=sum(sizes), per_clip_mean=(sum(sizes) / len(sizes)) if sizes else 0,
                           per_clip_max=max(sizes) if sizes else 0,
                           per_frame_mean=(sum(sizes) / total_frames) if total_frames else 0,
                           per_column_per_clip_mean={c: sum(v) / len(v) for c, v in column_bytes.items()})
    rows = summaries.values()
    manifest.timings = Timings(
        plan_s=plan_s, pipeline_s=pipeline_s,
        frames_per_s=frames_processed / pipeline_s if pipeline_s > 0 and manifest.counts.processed else 0.0,
        **{f"{stage}_s_sum": sum(float(s[f"{stage}_s"]) for s in rows)
           for stage in ("prepare", "video", "audio", "network", "write")})
    manifest.resources = Resources(max((float(s["peak_rss_mb"]) for s in rows), default=0.0))


def code_version() -> dict[str, Any]:
    import reactdiff

    commit = None
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
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


def format_report(manifest: Manifest, published: bool, max_failure_fraction: float) -> str:
    """The summary table printed at the end of the job."""
    c, t, b = manifest.counts, manifest.timings, manifest.bytes
    lines = [f"snapshot {manifest.id}  feature set {manifest.feature_set.name} ({manifest.feature_set.hash[:8]})"]
    lines.append(f"  {'split':<8}{'clips':>8}{'processed':>11}{'carried':>9}{'quarantined':>13}")
    carried_by_split = Counter(info.split for info in manifest.clips.values() if info.carried)
    for split, info in manifest.splits.items():
        n, car = len(info.clips), carried_by_split.get(split, 0)
        lines.append(f"  {split:<8}{n:>8}{n - car:>11}{car:>9}{info.quarantined:>13}")
    lines.append(f"  {'total':<8}{c.clips:>8}{c.processed:>11}{c.carried:>9}{c.quarantined:>13}")
    lines += [f"  warning: {w}" for w in manifest.warnings]
    lines.append(f"  time {t.total_s:.1f} s (pipeline {t.pipeline_s:.1f} s), "
                 f"{t.frames_per_s:.0f} frames/s extracted, {b.per_clip_mean / 1e6:.2f} MB per clip "
                 f"({b.total / 1e6:.1f} MB in all), peak worker RSS {manifest.resources.peak_worker_rss_mb:.0f} MB")
    if manifest.quarantine:
        lines.append("  quarantined clips:")
        for q in manifest.quarantine[:20]:
            lines.append(f"    {q.clip_id} [{q.split}] {q.stage}: {q.reason}  ({q.uri})")
        if len(manifest.quarantine) > 20:
            lines.append(f"    ... {len(manifest.quarantine) - 20} more in quarantine/quarantine.parquet")
    fraction = c.quarantined / max(1, c.considered)
    if published:
        lines.append(f"  published (manifest written); {fraction:.1%} quarantined "
                     f"(limit {max_failure_fraction:.1%})")
    else:
        lines.append(f"  NOT published: {fraction:.1%} of clips quarantined, above max_failure_fraction "
                     f"{max_failure_fraction:.1%}. Fix the inputs (see _report.json) or raise the limit "
                     "with --set max_failure_fraction=...")
    return "\n".join(lines)
