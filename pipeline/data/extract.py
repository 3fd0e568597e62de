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
    driver: quarantine, items, neighbours, mean face, then ``_manifest.json`` last (pipeline.data.publish)

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import config as config_mod
from pipeline import storage
from pipeline.data import media as decode
from pipeline.data.media import ClipError, audio_at, fit_frames, open_video, read_audio
from pipeline.data.features import FeatureSet, load_feature_set
from pipeline.data.publish import finalize, format_report
from pipeline.data.snapshot import FORMAT, MANIFEST, Snapshot, SnapshotError, tensor_array

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.data import react

log = logging.getLogger(__name__)

# Row keys of a clip in the pipeline (the Clip's URIs get a _uri suffix: "emotion" and "tdmm"
# are also the label feature columns).
CLIP_FIELDS = {"clip_id": "clip_id", "split": "split", "site": "site", "session": "session", "role": "role",
               "index": "index", "video_uri": "video", "video_format": "video_format",
               "audio_uri": "audio", "emotion_uri": "emotion", "tdmm_uri": "tdmm"}
# What every clip reports back to the driver (small: no features).
SUMMARY_DEFAULTS: dict[str, Any] = {
    "clip_id": "", "split": "", "status": "ok", "stage": "", "error_uri": "", "reason": "",
    "content_hash": "", "num_frames": 0, "file": "", "bytes": 0, "column_bytes": "{}",
    "prepare_s": 0.0, "video_s": 0.0, "audio_s": 0.0, "network_s": 0.0, "write_s": 0.0, "peak_rss_mb": 0.0,
}
MODALITY_FOLDERS = {"video": "Video_files", "audio": "Audio_files", "emotion": "Emotion", "tdmm": "3D_FV_files"}
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

    data: str | None = None                 # REACT dataset root (local path or s3://)
    out: str | None = None                  # snapshots root; default <workdir>/snapshots
    feature_set: str = "demo"               # bundled name (demo, paper) or a YAML path
    models: dict[str, str] = field(default_factory=dict)   # extractor name -> model URI
    splits: list[str] = field(default_factory=list)        # empty: every split with a csv
    incremental_from: str | None = None     # snapshot URI or id, or "latest" (under out)
    fps: float = 25.0                       # REACT video rate; audio frames are rate / fps samples
    frames: int | None = None               # crop/pad every clip to this many frames (REACT: 751);
                                            # null: each clip's own video frame count
    frame_tolerance: int = 2                # modalities may differ by this many frames (pad/crop)
    decode_chunk: int = 64                  # frames decoded at once (memory per task)
    compression_level: int = 3              # zstd level of the Parquet files
    max_failure_fraction: float = 0.05      # above this quarantined fraction: no publish, exit 1
    device: str = "auto"                    # networks on: auto (GPU if the cluster has one) | cpu | cuda
    network_actors: int | None = None       # max actors per network stage (default: GPUs, or 1 on CPU)
    cpus_per_actor: float = 1.0             # CPUs per network actor
    limit: int | None = None                # only the first N clips (smoke runs)
    ray_address: str | None = None          # attach to a cluster (default: $RAY_ADDRESS or local)

    def validate(self) -> None:
        if not self.data:
            raise config_mod.ConfigError("data: the REACT dataset root is required (--data URI)")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise config_mod.ConfigError("max_failure_fraction must be in [0, 1]")
        if self.fps <= 0:
            raise config_mod.ConfigError("fps must be > 0")
        if self.frames is not None and self.frames < 1:
            raise config_mod.ConfigError("frames must be >= 1 (or null)")
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

    snapshot_uri: str
    root: str
    features: FeatureSet
    fps: float
    frames: int | None
    frame_tolerance: int
    decode_chunk: int
    compression_level: int


@dataclass
class ExtractResult:
    snapshot: Snapshot | None       # None when not published (failure fraction above the limit)
    uri: str
    manifest: dict[str, Any]
    published: bool
    report: str

    @property
    def exit_code(self) -> int:
        return 0 if self.published else 1


# ---------------------------------------------------------------------------------------------
# Stage 1: prepare (fingerprint, carry over, decode, CPU features)


def peak_rss_mb() -> float:
    """Peak resident memory of this worker process so far (MB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def clip_file(split: str, clip_id: str) -> str:
    """Path of a clip's Parquet file inside the snapshot (mirrors the dataset layout)."""
    return f"clips/{split}/{clip_id}.parquet"


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


def _copy(src: str, dst: str) -> int:
    """Copy one file (server-side on the same object store); returns its size."""
    src_fs, src_path = storage.filesystem(src)
    dst_fs, dst_path = storage.filesystem(dst)
    if type(src_fs) is type(dst_fs) and storage.is_remote(src) == storage.is_remote(dst):
        if not storage.is_remote(dst):
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        src_fs.copy(src_path, dst_path)
    else:
        storage.write_bytes(dst, storage.read_bytes(src))
    return storage.size(dst)


def clip_row(clip: react.Clip) -> dict[str, Any]:
    """A clip's row in the pipeline: its CLIP_FIELDS, a missing URI as ""."""
    return {k: (getattr(clip, attr) or "") for k, attr in CLIP_FIELDS.items()}


def _missing(plan: Plan, row: dict, modality: str) -> ClipError:
    folder = MODALITY_FOLDERS[modality]
    suffix = {"video": "" if row.get("video_format") == "png" else ".mp4", "audio": ".wav",
              "emotion": ".csv", "tdmm": ".npy"}[modality]
    expected = storage.join(plan.root, row["split"], folder, row["clip_id"] + suffix)
    stage = {"video": "decode_video", "audio": "decode_audio"}.get(modality, "labels")
    return ClipError(stage, expected, f"missing {modality} file (no {folder}/{row['clip_id']}{suffix} "
                     "in the dataset)")


def decode_clip(row: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Decode one clip and run the CPU extractors -> {column: [T, D]} plus network inputs.

    Network inputs travel to the actor stages as ``_crops`` (uint8 [T, 224, 224, 3], only when
    a facial network is in the set) and ``_audio_<rate>`` (float32 waveform).
    """
    opened: list = []
    try:
        return _decode_clip(row, plan, opened)
    finally:
        for video in opened:   # one reader per task, released even when a check fails
            video.close()


def _decode_clip(row: dict[str, Any], plan: Plan, opened: list) -> dict[str, Any]:
    fs = plan.features
    counts: dict[str, tuple[float, str]] = {}       # modality -> (frames, uri)
    labels = {}
    for e in fs.labels:
        uri = row.get(f"{e.type}_uri")
        if not uri:
            raise _missing(plan, row, e.type)
        arr = decode.read_emotion(uri) if e.type == "emotion" else decode.read_tdmm(uri)
        labels[e] = e.label_features(arr)
        counts[e.type] = (len(arr), uri)
    video = audio = None
    if fs.facial:
        if not row.get("video_uri"):
            raise _missing(plan, row, "video")
        video = open_video(row["video_uri"], row.get("video_format") or "mp4")
        opened.append(video)
        if video.fps is not None and abs(video.fps - plan.fps) > 0.01 * plan.fps:
            raise ClipError("decode_video", row["video_uri"], f"video is {video.fps:g} fps; expected "
                            f"{plan.fps:g} (set fps, or re-encode the clip)")
        counts["video"] = (video.num_frames, row["video_uri"])
    if fs.acoustic:
        if not row.get("audio_uri"):
            raise _missing(plan, row, "audio")
        audio = read_audio(row["audio_uri"])
        counts["audio"] = (audio.seconds * plan.fps, row["audio_uri"])

    # Frame count T: the configured one, else the video's, else the labels', else the audio's.
    order = ("video", "emotion", "tdmm", "audio")
    frames = plan.frames or next(int(round(counts[m][0])) for m in order if m in counts)
    off = [m for m, (n, _) in counts.items()
           if abs(n - frames) > plan.frame_tolerance + (0.5 if m == "audio" else 0)]
    if off:
        listing = ", ".join(f"{m} {c:.0f}" for m, (c, _) in counts.items())
        # Name the odd file out: the only file whose count the clip's other files disagree on.
        votes = Counter(int(round(c)) for c, _ in counts.values())
        majority, agree = votes.most_common(1)[0]
        odd = [m for m, (c, _) in counts.items() if int(round(c)) != majority]
        modality = odd[0] if agree > 1 and len(odd) == 1 and not plan.frames else off[0]
        n, uri = counts[modality]
        have = f"{n:.1f}" if modality == "audio" else str(int(n))
        if modality in odd and modality not in off:      # T came from this file: the others are off
            reason = f"{modality} has {have} frames but the clip's other files have {majority}"
        else:
            reason = f"{modality} has {have} frames but the clip has {frames}"
        raise ClipError("frames", uri, f"{reason} (tolerance {plan.frame_tolerance}; {listing})")

    out: dict[str, Any] = {"num_frames": frames}
    for e, arr in labels.items():
        out[e.column] = fit_frames(arr, frames)
    t_audio = time.perf_counter()
    if audio is not None:
        rates = {e.sample_rate(fs.sample_rate) for e in fs.acoustic}
        # Resample from the file's own rate once per target rate (16 kHz for wav2vec2).
        at_rate = {r: audio_at(audio, r) for r in rates}
        for e in fs.acoustic:
            rate = e.sample_rate(fs.sample_rate)
            if e.network:
                out[f"_audio_{rate}"] = at_rate[rate].samples
            else:
                out[e.column] = e.audio_features(at_rate[rate], frames, plan.fps)
    out["audio_s"] = time.perf_counter() - t_audio
    t_video = time.perf_counter()
    if video is not None:
        with video:
            cpu = [e for e in fs.facial if not e.network]
            parts: dict[Any, list] = {e: [] for e in cpu}
            nets = [e for e in fs.facial if e.network]
            crops_all = np.empty((video.num_frames, decode.CROP, decode.CROP, 3), np.uint8) if nets else None
            start = 0
            for crops in video.crops(plan.decode_chunk):
                for e in cpu:
                    parts[e].append(e.frame_features(crops))
                if crops_all is not None:
                    crops_all[start:start + len(crops)] = crops
                start += len(crops)
            for e in cpu:
                out[e.column] = fit_frames(np.concatenate(parts[e]), frames)
            if crops_all is not None:
                out["_crops"] = fit_frames(crops_all, frames)
    out["video_s"] = time.perf_counter() - t_video
    return out


def _one_thread_per_task() -> None:
    # Ray runs one task per CPU; torch's own thread pool on top would oversubscribe the cores.
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def prepare_clip(row: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Stage 1 for one clip; never raises (a failure becomes status=error with stage and reason)."""
    _one_thread_per_task()
    t0 = time.perf_counter()
    out: dict[str, Any] = {**SUMMARY_DEFAULTS, **{k: row.get(k) or "" for k in CLIP_FIELDS}}
    try:
        out["content_hash"] = fingerprint(row, plan.root, plan.features.modalities())
        if row.get("base_hash") and row["base_hash"] == out["content_hash"]:
            rel = clip_file(row["split"], row["clip_id"])
            try:
                size = _copy(row["base_file"], storage.join(plan.snapshot_uri, rel))
                out.update(status="carried", file=rel, bytes=size, num_frames=int(row["base_frames"]),
                           column_bytes=row.get("base_column_bytes") or "{}")
            except Exception as exc:  # the previous snapshot lost the file: extract it again
                log.warning("cannot carry %s over from the previous snapshot (%s); extracting it",
                            row["clip_id"], decode._short(exc))
        if out["status"] != "carried":
            out.update(decode_clip(row, plan))
    except ClipError as exc:
        out.update(status="error", stage=exc.stage, error_uri=exc.uri, reason=exc.reason)
    except Exception as exc:  # anything unexpected in one clip must not stop the job
        out.update(status="error", stage="prepare", error_uri=row.get("video_uri") or row.get("audio_uri") or "",
                   reason=decode._short(exc))
    out["prepare_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ---------------------------------------------------------------------------------------------
# Stages 2 and 3: networks in actor pools


def pick_device(preference: str) -> str:
    import torch

    if preference == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if preference == "cuda":
        raise RuntimeError("device: cuda but this worker has no CUDA device")
    return "cpu"


class NetworkStage:
    """Actor: loads its networks once, then runs them on each clip's network inputs."""

    def __init__(self, extractors, device: str, input_key: str):
        import torch

        self.device = pick_device(device)
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.extractors, self.input_key = extractors, input_key
        for e in extractors:
            e.load(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        row = _unbatch(batch)
        inputs = row.pop(self.input_key, None)
        if row["status"] != "ok" or inputs is None:
            return _batch(row)
        t0 = time.perf_counter()
        self.current = self.extractors[0]
        try:
            self.apply(row, inputs)
        except Exception as exc:
            current = self.current
            row.update(status="error", stage=f"extract:{current.name}",
                       error_uri=row.get("video_uri") if current.kind == "facial" else row.get("audio_uri"),
                       reason=decode._short(exc))
        row["network_s"] = float(row.get("network_s", 0.0)) + time.perf_counter() - t0
        row["peak_rss_mb"] = max(float(row.get("peak_rss_mb", 0.0)), peak_rss_mb())
        return _batch(row)

    def apply(self, row: dict[str, Any], inputs) -> None:
        """Run the networks on one clip's inputs; their feature columns go into ``row``."""
        for e, values in self.run(inputs, int(row["num_frames"])):
            row[e.column] = values

    def run(self, inputs, frames):
        raise NotImplementedError


class FacialNetworks(NetworkStage):
    """TorchScript networks on 224 crops; the crops go to the device once for all networks."""

    def __init__(self, extractors, device: str):
        super().__init__(extractors, device, "_crops")

    def run(self, crops, frames):
        import torch

        step = min(e.options.frame_batch for e in self.extractors)
        outs: dict[Any, list] = {e: [] for e in self.extractors}
        with torch.inference_mode():
            for start in range(0, len(crops), step):
                x01 = torch.from_numpy(np.ascontiguousarray(crops[start:start + step])).to(self.device)
                x01 = x01.permute(0, 3, 1, 2).float().div_(255.0)
                for e in self.extractors:
                    self.current = e
                    outs[e].append(e.forward(x01))
        for e in self.extractors:
            yield e, np.concatenate(outs[e])


class AcousticNetworks(NetworkStage):
    """wav2vec2 on the 16 kHz waveform."""

    def __init__(self, extractors, device: str, rate: int):
        super().__init__(extractors, device, f"_audio_{rate}")
        self.rate = rate

    def run(self, samples, frames):
        audio = decode.Audio(np.asarray(samples, np.float32), self.rate, self.rate, 1)
        for e in self.extractors:
            self.current = e
            yield e, e.audio_features(audio, frames, 0.0)


def network_stages(features: FeatureSet) -> list[tuple[type[NetworkStage], dict[str, Any]]]:
    """The network stages of a feature set in pipeline order, as (stage class, constructor
    kwargs without ``device``); empty when no extractor of the set is a network."""
    stages: list[tuple[type[NetworkStage], dict[str, Any]]] = []
    facial = [e for e in features.facial if e.network]
    if facial:
        stages.append((FacialNetworks, {"extractors": facial}))
    acoustic = [e for e in features.acoustic if e.network]
    if acoustic:
        stages.append((AcousticNetworks, {"extractors": acoustic,
                                          "rate": acoustic[0].sample_rate(features.sample_rate)}))
    return stages


def extract_clip(clip: react.Clip, features: FeatureSet, *, fps: float = 25.0, frames: int | None = None,
                 frame_tolerance: int = 2, decode_chunk: int = 64, device: str = "cpu") -> dict[str, np.ndarray]:
    """One clip's features, in this process, by the job's own code path: ``decode_clip``
    (decoding and CPU extractors), then each network stage. No snapshot is written.

    Returns ``{column: [T, D]}`` for every extractor of ``features`` and ``"num_frames"`` (T,
    an int). A bad clip raises :class:`ClipError` (stage, file, reason), the error the job
    quarantines it with. Resolve the feature set (``FeatureSet.resolve``) beforehand, as the job
    does; ``device`` is the network stages' (auto, cpu or cuda).
    """
    plan = Plan(snapshot_uri="", root="", features=features, fps=fps, frames=frames,
                frame_tolerance=frame_tolerance, decode_chunk=decode_chunk, compression_level=3)
    out = decode_clip(clip_row(clip), plan)
    for cls, kwargs in network_stages(features):
        stage = cls(**kwargs, device=device)
        stage.apply(out, out.pop(stage.input_key))
    return {**{e.column: out[e.column] for e in features.extractors}, "num_frames": int(out["num_frames"])}


# ---------------------------------------------------------------------------------------------
# Stage 4: write one Parquet file per clip


def clip_table(row: dict[str, Any], plan: Plan):
    """The one-row Arrow table of a clip (ids, frame count, sources, per-frame features)."""
    import pyarrow as pa

    frames = int(row["num_frames"])
    cols: dict[str, Any] = {k: pa.array([str(row.get(k) or "")]) for k in ("clip_id", "split", "site",
                                                                         "session", "role", "index")}
    cols["num_frames"] = pa.array([frames], pa.int32())
    cols["fps"] = pa.array([plan.fps], pa.float32())
    for name in ("video_uri", "video_format", "audio_uri", "emotion_uri", "tdmm_uri", "content_hash"):
        cols[name] = pa.array([storage.redact(str(row.get(name) or ""))])
    for e in plan.features.extractors:
        values = np.asarray(row[e.column])
        if values.shape != (frames, e.width):
            raise ValueError(f"{e.column} has shape {values.shape}; expected ({frames}, {e.width})")
        values = values.astype(e.dtype, copy=False)
        if not np.isfinite(values).all():
            raise ClipError(f"extract:{e.name}", row.get("video_uri") if e.kind == "facial" else row.get("audio_uri"),
                            f"{e.column} has NaN or infinite values"
                            + (" (outside the float16 range?)" if e.dtype == "float16" else ""))
        cols[e.column] = tensor_array(values)
    meta = {"reactdiff": json.dumps({"format": FORMAT, "features": {c: list(s) for c, s in plan.features.specs.items()}})}
    return pa.table(cols).replace_schema_metadata(meta)


def write_clip(row: dict[str, Any], plan: Plan) -> tuple[str, int, dict[str, int]]:
    """Write a clip's file; returns (relative path, bytes, compressed bytes per feature column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = clip_table(row, plan)
    features = [e.column for e in plan.features.extractors]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink, compression="zstd", compression_level=plan.compression_level,
        # Byte-stream split puts the exponent bytes of neighbouring floats together: float16
        # features compress ~35 % better than plain zstd. No dictionary/statistics on floats.
        use_byte_stream_split=[f"{c}.list.element.list.element" for c in features],
        use_dictionary=False, write_statistics=["clip_id", "split"],
    )
    data = sink.getvalue()
    md = pq.read_metadata(pa.BufferReader(data))
    per_column = {c: 0 for c in features}
    rg = md.row_group(0)
    for i in range(rg.num_columns):
        top = rg.column(i).path_in_schema.split(".", 1)[0]
        if top in per_column:
            per_column[top] += rg.column(i).total_compressed_size
    rel = clip_file(row["split"], row["clip_id"])
    storage.write_bytes(storage.join(plan.snapshot_uri, rel), data.to_pybytes())
    return rel, len(data), per_column


def write_stage(row: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Stage 4 for one clip: write it (if ok) and return its small summary row."""
    summary = {k: row.get(k, v) for k, v in SUMMARY_DEFAULTS.items()}
    if row["status"] == "ok":
        t0 = time.perf_counter()
        try:
            rel, nbytes, per_column = write_clip(row, plan)
            summary.update(file=rel, bytes=nbytes, column_bytes=json.dumps(per_column))
        except ClipError as exc:
            summary.update(status="error", stage=exc.stage, error_uri=exc.uri, reason=exc.reason)
        except Exception as exc:
            summary.update(status="error", stage="write", error_uri=plan.snapshot_uri, reason=decode._short(exc))
        summary["write_s"] = time.perf_counter() - t0
    summary["peak_rss_mb"] = max(float(summary["peak_rss_mb"]), peak_rss_mb())
    return {k: type(SUMMARY_DEFAULTS[k])(summary[k]) for k in SUMMARY_DEFAULTS}


# Ray Data UDF adapters: batch_size=1, numpy batches <-> one row dict.

def _unbatch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    row = {}
    for k, v in batch.items():
        item = v[0]
        row[k] = item.item() if isinstance(item, np.generic) else item
    return row


def _batch(row: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            out[k] = v[np.newaxis]
        else:
            out[k] = np.array([v])
    return out


def _prepare_batch(batch, plan: Plan):
    return _batch(prepare_clip(_unbatch(batch), plan))


def _write_batch(batch, plan: Plan):
    return _batch(write_stage(_unbatch(batch), plan))


def _prepare_and_write_batch(batch, plan: Plan):
    # Feature sets without networks: decode, extract and write in one task, so a clip's
    # features never pass through the object store.
    return _batch(write_stage(prepare_clip(_unbatch(batch), plan), plan))


# ---------------------------------------------------------------------------------------------
# The job


def build_pipeline(rows: list[dict[str, Any]], plan: Plan, cfg: ExtractConfig):
    """The Ray Dataset of summary rows: manifest rows -> prepare -> networks -> write."""
    import ray
    import ray.data

    # One row per block: a clip is the unit of parallelism, of retry and of failure.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    stages = network_stages(plan.features)
    task_args = dict(batch_size=1, num_cpus=1, max_retries=TASK_RETRIES, fn_kwargs={"plan": plan})
    if not stages:
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
        ds = ds.map_batches(_write_batch, **task_args)
    # Every per-clip error is caught in the UDFs; should Ray still drop a block (an error outside
    # them), the job goes on and the driver quarantines the clip that has no summary row.
    ds.context.max_errored_blocks = -1
    return ds


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
    if base.manifest["source"]["uri"] != storage.redact(root):
        log.warning("incremental: snapshot %s came from %s, this run reads %s: extracting every clip",
                    base.id, base.manifest["source"]["uri"], storage.redact(root))
        return {}
    return {cid: {"base_hash": info["content_hash"], "base_split": info["split"],
                  "base_file": storage.join(base.uri, info["file"]), "base_frames": int(info["num_frames"]),
                  "base_column_bytes": json.dumps(info.get("column_bytes", {}))}
            for cid, info in base.manifest["clips"].items()}


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run the extraction job; publishes ``<out>/<snapshot id>/`` unless too many clips failed."""
    from pipeline import runtime
    from pipeline.data import react

    started = time.time()
    t_plan = time.perf_counter()
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
    policy = {"fps": cfg.fps, "frames": cfg.frames}
    fs_hash = features.hash(**policy)

    base = None
    if cfg.incremental_from:
        try:
            base = Snapshot.resolve(cfg.incremental_from, out_root)
        except SnapshotError:
            if cfg.incremental_from != "latest":
                raise
            log.info("incremental: no complete snapshot under %s yet: extracting every clip", storage.redact(out_root))
    base_rows = _base_rows(base, fs_hash, dataset.root)

    snapshot_id = new_snapshot_id(fs_hash, out_root)
    snapshot_uri = storage.join(out_root, snapshot_id)
    storage.makedirs(snapshot_uri)
    plan = Plan(snapshot_uri, dataset.root, features, cfg.fps, cfg.frames, cfg.frame_tolerance,
                cfg.decode_chunk, cfg.compression_level)
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
        for s in build_pipeline(rows, plan, cfg).iter_rows():
            summaries[s["clip_id"]] = s
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
    manifest = finalize(cfg, plan, dataset, splits, rows, summaries, features, fs_hash, base, snapshot_id,
                        started, {"plan_s": plan_s, "pipeline_s": pipeline_s})
    quarantined = manifest["counts"]["quarantined"]
    fraction = quarantined / max(1, len(rows))
    published = fraction <= cfg.max_failure_fraction
    manifest["timings"]["finalize_s"] = time.perf_counter() - t_fin
    manifest["timings"]["total_s"] = time.time() - started
    if published:
        storage.write_json(storage.join(snapshot_uri, MANIFEST), manifest)   # publish: manifest last
    else:
        # Not published: no manifest, so neither `latest` nor training will ever read it.
        storage.write_json(storage.join(snapshot_uri, "_report.json"), manifest)
    report = format_report(manifest, published, cfg.max_failure_fraction)
    snapshot = Snapshot.open(snapshot_uri) if published else None
    return ExtractResult(snapshot, snapshot_uri, manifest, published, report)
