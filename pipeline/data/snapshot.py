"""Reading a feature snapshot: the immutable output of ``reactdiff extract``.

Layout (docs/contracts.md), one folder per snapshot id::

    clips/<split>/<clip_id>.parquet   one file (one row, one row group) per person clip
    items/<split>.parquet             item, speaker, listener, mirrored (+ available)
    neighbours/<split>.npy            [2L, 2L] uint8 appropriateness matrix, item order
    quarantine/quarantine.parquet     clip_id, split, uri, stage, reason
    mean_face.npy                     when the dataset has one
    _manifest.json                    written last: a folder without it is incomplete

Per-frame features are Parquet ``list<fixed_size_list<float16|float32, D>>`` columns: one list
entry per frame, each a fixed-width vector, so the width is in the schema, the float leaves
are stored contiguously (byte-stream-split + zstd compresses float16 features ~35 % better than
raw bytes) and reading is a zero-copy view reshaped to [T, D]. The manifest, not a directory
listing, says which files belong to the snapshot, so a stray file never becomes a row.

    snap = Snapshot.latest(".reactdiff/snapshots")
    ds = snap.clips_dataset(["video_pixels", "audio_mfcc26", "emotion"], splits=["train"])
    tensors = ds.drop_columns(["clip_id", "split"])              # ids are strings
    for batch in tensors.iter_torch_batches(batch_size=8): ...   # [B, T, D] tensors
    arrays = snap.load_clips(["NoXI/.../1"], ["emotion"])        # float32 numpy, no Ray
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipeline import storage
from pipeline.data.media import ClipError
from pipeline.data.react import Item
from pipeline.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.data.features import Extractor

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
FORMAT = "reactdiff-snapshot/1"
ID_COLUMNS = ("clip_id", "split", "site", "session", "role", "index")
META_COLUMNS = ID_COLUMNS + ("num_frames", "fps", "video_uri", "video_format", "audio_uri",
                             "emotion_uri", "tdmm_uri", "content_hash")


class SnapshotError(UserError, RuntimeError):
    """The snapshot is missing, incomplete (no manifest) or does not hold what was asked."""


class FeatureSpec(NamedTuple):
    """A per-frame feature column: [T, width] of ``dtype``; kind facial | acoustic | label."""

    width: int
    dtype: str
    kind: str


MEAN_FACE_MISSING = ("the dataset root has no mean_face.npy: 3DMM targets stay absolute FaceVerse coefficients "
                     "(the reference subtracts the REACT baseline's mean face); copy mean_face.npy into the "
                     "dataset root and re-extract to train as the paper does")


# ---------------------------------------------------------------------------------------------
# The manifest: what the snapshot holds, typed. On disk it is ``_manifest.json`` with exactly
# these keys (nested dataclasses are nested JSON objects); reading takes the known keys of a
# mapping and leaves missing ones at their defaults, so older and hand-written manifests open.


def _record(cls, data: dict[str, Any] | None):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass
class Source:
    uri: str = ""               # the REACT dataset root (redacted)
    release: str = ""           # 2023 | 2024
    splits: list[str] = field(default_factory=list)


@dataclass
class FeatureSetRecord:
    """The feature set the snapshot was extracted with: its YAML, resolved description and hash."""

    name: str = ""
    hash: str = ""              # FeatureSet.hash(fps, frames): equal hashes, equal numbers
    source: str = ""            # the YAML it was loaded from
    config: dict[str, Any] = field(default_factory=dict)       # the YAML as read
    resolved: dict[str, Any] = field(default_factory=dict)     # FeatureSet.describe(fps, frames)
    models: dict[str, dict[str, str]] = field(default_factory=dict)   # extractor -> {uri, sha256}


@dataclass
class ColumnEntry:
    """One per-frame feature column: [T, width] of dtype."""

    width: int
    dtype: str
    kind: str                   # facial | acoustic | label
    extractor: str = ""
    type: str = ""
    needs_gpu: bool = False


@dataclass
class SplitCounts:
    clips: int = 0
    quarantined: int = 0


@dataclass
class Counts:
    clips: int = 0              # in the snapshot (processed + carried)
    processed: int = 0          # extracted by this run
    carried: int = 0            # copied over unchanged from --incremental-from
    quarantined: int = 0
    considered: int = 0
    frames: int = 0
    frames_processed: int = 0
    per_split: dict[str, SplitCounts] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Counts":
        counts = _record(cls, data)
        counts.per_split = {s: _record(SplitCounts, v) for s, v in (counts.per_split or {}).items()}
        return counts


@dataclass
class SplitEntry:
    clips: list[str] = field(default_factory=list)    # extracted clip ids, sorted
    items: int = 0
    items_available: int = 0    # items whose speaker and listener were both extracted
    neighbours: bool = False    # neighbours/<split>.npy exists
    quarantined: int = 0


@dataclass
class ClipEntry:
    split: str
    file: str                   # clips/<split>/<clip_id>.parquet
    bytes: int = 0
    num_frames: int = 0
    content_hash: str = ""      # fingerprint of the source files: --incremental-from reuses the clip if equal
    carried: bool = False       # copied from the base snapshot, not extracted again
    column_bytes: dict[str, int] = field(default_factory=dict)   # compressed bytes per feature column
    warnings: list[str] = field(default_factory=list)   # repairs: resampled to the rate, padded video frames


@dataclass
class QuarantineEntry:
    clip_id: str
    split: str
    uri: str                    # the file at fault (redacted)
    stage: str                  # decode_video, decode_audio, labels, frames, extract:<name>, write, worker
    reason: str


@dataclass
class Problem:
    uri: str
    reason: str


@dataclass
class Bytes:
    total: int = 0
    per_clip_mean: float = 0
    per_clip_max: int = 0
    per_frame_mean: float = 0
    per_column_per_clip_mean: dict[str, float] = field(default_factory=dict)


@dataclass
class Timings:
    """Seconds: the driver's phases, frames/s of the pipeline, and the clips' stage times summed."""

    plan_s: float = 0.0
    pipeline_s: float = 0.0
    finalize_s: float = 0.0
    total_s: float = 0.0
    frames_per_s: float = 0.0
    prepare_s_sum: float = 0.0
    video_s_sum: float = 0.0
    audio_s_sum: float = 0.0
    network_s_sum: float = 0.0
    write_s_sum: float = 0.0


@dataclass
class Resources:
    peak_worker_rss_mb: float = 0.0


@dataclass
class Manifest:
    """``_manifest.json``: written last, so a snapshot folder without it is never read."""

    id: str
    format: str = FORMAT
    created_at: str = ""        # ISO UTC time the extraction started
    source: Source = field(default_factory=Source)
    feature_set: FeatureSetRecord = field(default_factory=FeatureSetRecord)
    features: dict[str, ColumnEntry] = field(default_factory=dict)   # in feature-set order
    code: dict[str, Any] = field(default_factory=dict)       # package versions and git commit
    config: dict[str, Any] = field(default_factory=dict)     # the ExtractConfig (redacted)
    incremental_from: str | None = None                       # id of the base snapshot
    counts: Counts = field(default_factory=Counts)
    splits: dict[str, SplitEntry] = field(default_factory=dict)
    clips: dict[str, ClipEntry] = field(default_factory=dict)          # by clip id, sorted
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)    # dataset files that could not be used
    mean_face: bool = False     # mean_face.npy is in the snapshot
    bytes: Bytes = field(default_factory=Bytes)
    timings: Timings = field(default_factory=Timings)
    resources: Resources = field(default_factory=Resources)

    @property
    def warnings(self) -> list[str]:
        """What a user of the snapshot should know: a missing mean face, clips that were repaired."""
        out = [] if self.mean_face else [MEAN_FACE_MISSING]
        repaired = {cid: c.warnings for cid, c in self.clips.items() if c.warnings}
        if repaired:
            first = next(iter(repaired))
            out.append(f"{len(repaired)} clip(s) repaired during extraction (clips.<id>.warnings), e.g. {first}: "
                       f"{repaired[first][0]}")
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        get = data.get
        m = _record(cls, {k: v for k, v in data.items() if not isinstance(v, (dict, list))})
        m.source = _record(Source, get("source"))
        m.feature_set = _record(FeatureSetRecord, get("feature_set"))
        m.features = {c: _record(ColumnEntry, f) for c, f in (get("features") or {}).items()}
        m.code, m.config = dict(get("code") or {}), dict(get("config") or {})
        m.counts = Counts.from_json(get("counts"))
        m.splits = {s: _record(SplitEntry, v) for s, v in (get("splits") or {}).items()}
        m.clips = {c: _record(ClipEntry, v) for c, v in (get("clips") or {}).items()}
        m.quarantine = [_record(QuarantineEntry, q) for q in get("quarantine") or []]
        m.problems = [_record(Problem, p) for p in get("problems") or []]
        m.bytes = _record(Bytes, get("bytes"))
        m.timings = _record(Timings, get("timings"))
        m.resources = _record(Resources, get("resources"))
        return m


# ---------------------------------------------------------------------------------------------
# Parquet representation


def tensor_array(values: np.ndarray):
    """[T, D] numpy -> one Parquet cell ``list<fixed_size_list<dtype, D>>`` (pyarrow array of length 1)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    frames, width = values.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)
    return pa.ListArray.from_arrays(pa.array([0, frames], pa.int32()), inner)


def cell_to_numpy(column, row: int, dtype=None) -> np.ndarray:
    """Row ``row`` of a ``list<fixed_size_list<..., D>>`` column (pyarrow Array/ChunkedArray) -> [T, D]."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        for chunk in column.chunks:
            if row < len(chunk):
                column = chunk
                break
            row -= len(chunk)
    width = column.type.value_type.list_size
    cell = column[row].values                      # FixedSizeListArray of T frames (a zero-copy slice)
    flat = cell.flatten().to_numpy(zero_copy_only=False)
    out = flat.reshape(len(cell), width)
    return out if dtype is None else out.astype(dtype, copy=False)


def tensor_columns_to_numpy(table, columns, dtype=None) -> dict[str, Any]:
    """A pyarrow table -> {column: [B, T, D] ndarray, or a list of [T, D] if T differs}."""
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        if name in columns:
            cells = [cell_to_numpy(col, i, dtype) for i in range(table.num_rows)]
            if len({c.shape for c in cells}) <= 1:
                out[name] = np.stack(cells) if cells else np.zeros((0, 0, 0), dtype or np.float32)
            else:
                arr = np.empty(len(cells), dtype=object)
                arr[:] = cells
                out[name] = arr
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


# ---------------------------------------------------------------------------------------------
# The reader


class Snapshot:
    """A complete (manifest-bearing) feature snapshot. Build with :meth:`open` or :meth:`latest`."""

    def __init__(self, uri: str, manifest: Manifest):
        self.uri = uri.rstrip("/") if storage.is_remote(uri) else uri
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Snapshot({self.id!r}, clips={len(self.manifest.clips)}, uri={storage.redact(self.uri)!r})"

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str) -> "Snapshot":
        """Open a published snapshot; raises :class:`SnapshotError` if it has no manifest."""
        manifest_uri = storage.join(uri, MANIFEST)
        try:
            data = storage.read_json(manifest_uri)
        except FileNotFoundError:
            if storage.exists(uri):
                raise SnapshotError(f"{storage.redact(uri)} has no {MANIFEST}: the snapshot is incomplete "
                                    "(an extraction still running, failed or stopped above its failure "
                                    "limit) and is never read; re-run `reactdiff extract`") from None
            raise SnapshotError(f"snapshot {storage.redact(uri)} not found") from None
        except json.JSONDecodeError as exc:
            raise SnapshotError(f"{storage.redact(manifest_uri)} is not valid JSON ({exc})") from None
        if data.get("format") != FORMAT:
            raise SnapshotError(f"{storage.redact(manifest_uri)}: unknown snapshot format "
                                f"{data.get('format')!r} (this code reads {FORMAT})")
        return cls(uri, Manifest.from_json(data))

    @classmethod
    def list_ids(cls, root: str) -> list[str]:
        """Ids of the complete snapshots under ``root``, oldest first (ids start with a UTC time)."""
        ids = []
        for name in storage.listdir(root):
            if not name.startswith(("_", ".")) and storage.exists(storage.join(root, name, MANIFEST)):
                ids.append(name)
        return sorted(ids)

    @classmethod
    def latest(cls, root: str) -> "Snapshot | None":
        """The newest complete snapshot under ``root`` (incomplete folders are skipped), or None."""
        ids = cls.list_ids(root)
        return cls.open(storage.join(root, ids[-1])) if ids else None

    @classmethod
    def resolve(cls, ref: str, root: str | None = None) -> "Snapshot":
        """A snapshot URI, an id under ``root``, or ``latest`` (newest complete one under ``root``)."""
        if ref == "latest":
            if not root:
                raise SnapshotError("'latest' needs a snapshots root")
            snap = cls.latest(root)
            if snap is None:
                raise SnapshotError(f"no complete snapshot under {storage.redact(root)}")
            return snap
        if root and "/" not in ref and not storage.exists(storage.join(ref, MANIFEST)):
            return cls.open(storage.join(root, ref))
        return cls.open(ref)

    # -- what it holds ------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def feature_set_hash(self) -> str:
        return self.manifest.feature_set.hash

    @property
    def features(self) -> dict[str, FeatureSpec]:
        """column -> FeatureSpec(width, dtype, kind), in feature-set order."""
        return {name: FeatureSpec(int(f.width), f.dtype, f.kind) for name, f in self.manifest.features.items()}

    def _of_kind(self, kind: str) -> dict[str, int]:
        return {name: spec.width for name, spec in self.features.items() if spec.kind == kind}

    @property
    def facial(self) -> dict[str, int]:
        return self._of_kind("facial")

    @property
    def acoustic(self) -> dict[str, int]:
        return self._of_kind("acoustic")

    @property
    def labels(self) -> dict[str, int]:
        return self._of_kind("label")

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.splits)

    def clip_ids(self, split: str | None = None) -> list[str]:
        """Extracted (non-quarantined) clip ids, sorted."""
        if split is None:
            return sorted(self.manifest.clips)
        self._check_split(split)
        return list(self.manifest.splits[split].clips)

    def quarantine(self) -> list[QuarantineEntry]:
        """One record per rejected clip: clip_id, split, uri, stage, reason."""
        return list(self.manifest.quarantine)

    def _check_split(self, split: str) -> None:
        if split not in self.manifest.splits:
            raise SnapshotError(f"snapshot {self.id} has no split {split!r} (splits: {', '.join(self.splits)})")

    def _columns(self, columns) -> list[str]:
        features = self.features
        if columns is None:
            return list(features)
        columns = [columns] if isinstance(columns, str) else list(columns)
        unknown = [c for c in columns if c not in features]
        if unknown:
            raise SnapshotError(f"snapshot {self.id} has no feature column {unknown[0]!r} "
                                f"(columns: {', '.join(features)})")
        return columns

    def _file(self, clip_id: str) -> str:
        try:
            return storage.join(self.uri, self.manifest.clips[clip_id].file)
        except KeyError:
            quarantined = {q.clip_id: q for q in self.quarantine()}
            if clip_id in quarantined:
                q = quarantined[clip_id]
                raise SnapshotError(f"clip {clip_id} was quarantined in snapshot {self.id}: "
                                    f"{q.stage}: {q.reason}") from None
            raise SnapshotError(f"snapshot {self.id} has no clip {clip_id!r}") from None

    # -- reading ------------------------------------------------------------------------------

    def clips_dataset(self, columns=None, splits=None, *, dtype: str | None = "float32",
                      with_meta: bool = False, ordered: bool = True, clips_per_block: int = 1):
        """Ray Dataset, one row per clip, sorted by clip_id: ``clip_id``, ``split``, ``num_frames``
        and each requested feature column as an ndarray [T, D].

        Only the requested columns are read (Parquet column projection). ``dtype`` float32
        (default; what the model consumes) or None to keep the stored dtype (float16 for large
        features: half the object-store traffic). ``with_meta`` adds ids and source URIs. For
        ``iter_torch_batches`` select the tensor columns first (ids are strings).

        The files to read come from the manifest, so this is ``from_items(files)`` + a pyarrow
        read per block rather than ``ray.data.read_parquet``: no listing, exact clip order, and
        none of the 32 footer-reading actors that Ray 2.60's Parquet reader starts per call
        (10-20 s on a small machine).
        """
        import ray.data

        columns = self._columns(columns)
        splits = self.splits if splits is None else ([splits] if isinstance(splits, str) else list(splits))
        for s in splits:
            self._check_split(s)
        ids = sorted(c for s in splits for c in self.manifest.splits[s].clips)
        if not ids:
            raise SnapshotError(f"snapshot {self.id} has no clips in {', '.join(splits)}")
        meta = list(META_COLUMNS) if with_meta else ["clip_id", "split", "num_frames"]
        files = [{"file": self.manifest.clips[c].file} for c in ids]
        per_block = max(1, int(clips_per_block))
        ds = ray.data.from_items(files, override_num_blocks=max(1, -(-len(files) // per_block)))
        if ordered:
            ds.context.execution_options.preserve_order = True
        return ds.map_batches(_read_clip_files, batch_size=per_block, batch_format="pyarrow",
                              fn_kwargs={"root": self.uri, "columns": meta + columns,
                                         "tensors": tuple(columns), "dtype": dtype})

    def load_clips(self, clip_ids, columns=None, *, max_workers: int = 8) -> dict[str, dict[str, np.ndarray]]:
        """{clip_id: {column: float32 [T, D]}} read with pyarrow (no Ray), in the given order."""
        import pyarrow.parquet as pq

        columns = self._columns(columns)
        clip_ids = [clip_ids] if isinstance(clip_ids, str) else list(clip_ids)
        fs, _ = storage.arrow_filesystem(self.uri)
        files = {c: storage.arrow_filesystem(self._file(c))[1] for c in clip_ids}

        def read(clip_id):
            with fs.open_input_file(files[clip_id]) as f:
                table = pq.ParquetFile(f).read(columns=columns)
            return clip_id, {c: cell_to_numpy(table.column(c), 0, np.float32) for c in columns}

        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(clip_ids)))) as pool:
            loaded = dict(pool.map(read, clip_ids))
        return {c: loaded[c] for c in clip_ids}

    def items(self, split: str):
        """The split's directed items in the official order (pipeline.data.react.Item)."""
        import pyarrow.parquet as pq

        self._check_split(split)
        fs, path = storage.arrow_filesystem(storage.join(self.uri, "items", f"{split}.parquet"))
        table = pq.read_table(path, filesystem=fs)
        cols = table.to_pydict()
        return [Item(int(i), split, s, l, bool(m)) for i, s, l, m in
                zip(cols["item"], cols["speaker"], cols["listener"], cols["mirrored"])]

    def neighbours(self, split: str) -> np.ndarray:
        """[2L, 2L] uint8 appropriate-neighbour matrix in item order."""
        self._check_split(split)
        if not self.manifest.splits[split].neighbours:
            raise SnapshotError(f"snapshot {self.id} has no neighbour matrix for {split} (the dataset had "
                                "neither neighbour_emotion_<split>.npy nor data_indices.csv + "
                                "Approprirate_facial_reaction.npy)")
        return storage.read_npy(storage.join(self.uri, "neighbours", f"{split}.npy"))

    def mean_face(self) -> np.ndarray | None:
        """[58] float32 mean 3DMM face, when the dataset had ``mean_face.npy``."""
        if not self.manifest.mean_face:
            return None
        return storage.read_npy(storage.join(self.uri, "mean_face.npy")).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The writer


def clip_file(split: str, clip_id: str) -> str:
    """Path of a clip's Parquet file inside the snapshot (mirrors the dataset layout)."""
    return f"clips/{split}/{clip_id}.parquet"


@dataclass
class ClipFile:
    """What writing one clip file produced (for its ClipEntry)."""

    file: str
    bytes: int
    column_bytes: dict[str, int]


@dataclass
class SnapshotWriter:
    """Writes one snapshot folder: clip files (in Ray tasks: it pickles), then quarantine,
    items, neighbours and mean face, and :meth:`publish` writes the manifest last."""

    uri: str
    extractors: list[Extractor]     # the feature set's, in column order
    fps: float
    compression_level: int = 3      # zstd level of the Parquet files

    def _path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def _arrow_path(self, *parts: str):
        fs, path = storage.arrow_filesystem(self._path(*parts))
        if not storage.is_remote(self.uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return fs, path

    # -- clips (one task per clip) -------------------------------------------------------------

    def clip_table(self, row: dict[str, Any]):
        """The one-row Arrow table of a clip (ids, frame count, sources, per-frame features)."""
        import pyarrow as pa

        frames = int(row["num_frames"])
        cols: dict[str, Any] = {k: pa.array([str(row.get(k) or "")]) for k in ID_COLUMNS}
        cols["num_frames"] = pa.array([frames], pa.int32())
        cols["fps"] = pa.array([self.fps], pa.float32())
        for name in META_COLUMNS[len(ID_COLUMNS) + 2:]:
            cols[name] = pa.array([storage.redact(str(row.get(name) or ""))])
        for e in self.extractors:
            values = np.asarray(row[e.column])
            if values.shape != (frames, e.width):
                raise ValueError(f"{e.column} has shape {values.shape}; expected ({frames}, {e.width})")
            values = values.astype(e.dtype, copy=False)
            if not np.isfinite(values).all():
                raise ClipError(f"extract:{e.name}", row.get("video_uri") if e.kind == "facial" else row.get("audio_uri"),
                                f"{e.column} has NaN or infinite values"
                                + (" (outside the float16 range?)" if e.dtype == "float16" else ""))
            cols[e.column] = tensor_array(values)
        meta = {"reactdiff": json.dumps({"format": FORMAT, "features": {e.column: list(e.spec) for e in self.extractors}})}
        return pa.table(cols).replace_schema_metadata(meta)

    def write_clip(self, row: dict[str, Any]) -> ClipFile:
        """Write a clip's file (a retry overwrites it: the name is the clip's)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self.clip_table(row)
        features = [e.column for e in self.extractors]
        sink = pa.BufferOutputStream()
        pq.write_table(
            table, sink, compression="zstd", compression_level=self.compression_level,
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
        storage.write_bytes(self._path(rel), data.to_pybytes())
        return ClipFile(rel, len(data), per_column)

    def copy_clip(self, src: str, split: str, clip_id: str) -> ClipFile:
        """Carry a clip file over from another snapshot (server-side on the same object store);
        its column sizes are the base snapshot's, so they are left empty here."""
        rel = clip_file(split, clip_id)
        dst = self._path(rel)
        src_fs, src_path = storage.filesystem(src)
        dst_fs, dst_path = storage.filesystem(dst)
        if type(src_fs) is type(dst_fs) and storage.is_remote(src) == storage.is_remote(dst):
            if not storage.is_remote(dst):
                os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            src_fs.copy(src_path, dst_path)
        else:
            storage.write_bytes(dst, storage.read_bytes(src))
        return ClipFile(rel, storage.size(dst), {})

    # -- the driver's tables, then the manifest ------------------------------------------------

    def write_quarantine(self, entries: list[QuarantineEntry]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, path = self._arrow_path("quarantine", "quarantine.parquet")
        names = [f.name for f in fields(QuarantineEntry)]
        schema = pa.schema([(k, pa.string()) for k in names])
        pq.write_table(pa.Table.from_pylist([asdict(q) for q in entries], schema=schema), path, filesystem=fs)

    def write_items(self, split: str, items: list[Item], available: list[bool]) -> None:
        """The split's directed items in the official order; ``available``: both clips extracted."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"item": pa.array([i.index for i in items], pa.int32()),
                          "speaker": [i.speaker for i in items], "listener": [i.listener for i in items],
                          "mirrored": [i.mirrored for i in items], "available": available})
        fs, path = self._arrow_path("items", f"{split}.parquet")
        pq.write_table(table, path, filesystem=fs)

    def write_neighbours(self, split: str, matrix: np.ndarray) -> None:
        storage.write_npy(self._path("neighbours", f"{split}.npy"), matrix.astype(np.uint8))

    def write_mean_face(self, mean_face: np.ndarray) -> None:
        storage.write_npy(self._path("mean_face.npy"), mean_face.astype(np.float32))

    def publish(self, manifest: Manifest) -> Snapshot:
        """Write ``_manifest.json``, the last file: from now on the snapshot exists."""
        storage.write_json(self._path(MANIFEST), manifest.to_json())
        return Snapshot.open(self.uri)

    def write_report(self, manifest: Manifest) -> None:
        """Not published: the same record as ``_report.json``, so neither ``latest`` nor training
        ever reads the folder."""
        storage.write_json(self._path("_report.json"), manifest.to_json())



def _read_clip_files(batch, root: str, columns: list[str], tensors: tuple[str, ...], dtype):
    """Ray Data UDF: read the batch's clip files (projected columns) -> numpy rows [T, D]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, base = storage.arrow_filesystem(root)
    tables = [pq.read_table(f"{base.rstrip('/')}/{rel}", columns=columns, filesystem=fs)
              for rel in batch.column("file").to_pylist()]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return tensor_columns_to_numpy(table, set(tensors), np.dtype(dtype) if dtype else None)
