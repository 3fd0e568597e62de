"""The REACT 2023/2024 on-disk layout: person clips, directed items, appropriate-neighbour matrices.

A dataset root (local path or ``s3://``) holds, exactly as the organisers distribute it::

    train.csv val.csv test.csv            header + rows "idx, speaker_path, listener_path"
    <split>/Video_files/<path>.mp4        2024 release (face-cropped mp4, 25 fps)
    <split>/Video_files/<path>/1.png ...  2023 release (one folder of 751 PNG frames per clip)
    <split>/Audio_files/<path>.wav        44.1 kHz
    <split>/Emotion/<path'>.csv           header + T rows x 25 (15 AUs, valence, arousal, 8 expressions)
    <split>/3D_FV_files/<path>.npy        T x 58 or T x 1 x 58 FaceVerse v2 (52 exp, 3 rot, 3 trans)
    data_indices.csv + Approprirate_facial_reaction.npy   (sic) appropriateness over all dyads
    neighbour_emotion_<split>.npy         optional, ready per-split matrix (preferred when present)
    mean_face.npy                         58 values subtracted from every 3DMM frame

``<path>`` is the csv string ``<site>/<session>/<role>/<clip>`` (2023 UDIVA rows have five parts,
``UDIVA/<task>/<session>/<role>/<clip>``). ``<path'>`` is the same string after the 2024 Emotion
role renaming (NoXI Expert_video/Novice_video -> P1/P2, RECOLA P25/P41/P45 -> P1,
P26/P42/P46 -> P2); the reader detects per clip which naming the Emotion tree uses.

Items follow the official order that the metrics index by position: the L csv rows in csv order,
then the same L rows with speaker and listener swapped (N = 2L). Neighbour matrices are cut from
the organisers' 2M x 2M matrix exactly as ``tool/matrix_split.py`` does.

    ds = open_dataset("s3://bucket/REACT2024")
    ds.items("val")[0]            # Item(index=0, split="val", speaker=..., listener=..., mirrored=False)
    ds.neighbours("val").shape    # (2L, 2L)
    ds.problems(contents=True)    # [Problem(uri, reason), ...] for quarantine / `reactdiff inspect`
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from pipeline import storage
from pipeline.data.media import ClipError, group_pngs, mp4_info, png_frame_numbers, png_size, wav_info
from pipeline.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VIDEO, AUDIO, EMOTION, TDMM = "Video_files", "Audio_files", "Emotion", "3D_FV_files"
MODALITIES = (VIDEO, AUDIO, EMOTION, TDMM)

FRAMES = 751          # frames per REACT clip (30.04 s)
FPS = 25
SAMPLE_RATE = 44100
TDMM_DIM = 58         # 52 expression + 3 rotation + 3 translation (FaceVerse v2)
EMOTION_COLUMNS = (
    "AU1", "AU2", "AU4", "AU6", "AU7", "AU9", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23",
    "AU24", "AU25", "AU26", "valence", "arousal",
    "Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt",
)
EMOTION_DIM = len(EMOTION_COLUMNS)

# 2024 release: the Emotion tree names roles P1/P2 (the person of csv column 1 / column 2).
EMOTION_ROLE_RENAME = {
    "Expert_video": "P1", "Novice_video": "P2",                      # NoXI
    "P25": "P1", "P41": "P1", "P45": "P1", "P26": "P2", "P42": "P2", "P46": "P2",  # RECOLA
}

DATA_INDICES = "data_indices.csv"
ALL_NEIGHBOURS = "Approprirate_facial_reaction.npy"   # spelling as shipped by the organisers
MEAN_FACE = "mean_face.npy"


def split_neighbours_file(split: str) -> str:
    return f"neighbour_emotion_{split}.npy"


class ReactLayoutError(UserError, ValueError):
    """The dataset layout is unusable; ``uri`` names the file at fault, ``reason`` says why."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason = uri, reason


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Clip:
    """One person clip."""

    clip_id: str            # the csv path string, e.g. "NoXI/065_2016-04-14_Nottingham/Expert_video/1"
    split: str              # "train" | "val" | "test"
    site: str
    session: str            # UDIVA: "<session>_<task>", the organisers' data_indices key
    role: str
    index: str
    video: str | None       # URI of <clip>.mp4 (2024) or of the <clip>/ folder of 1.png..751.png (2023)
    video_format: str       # "mp4" | "png"
    audio: str | None       # URI of the wav
    emotion: str | None     # URI of the Emotion csv (after 2024 role renaming when that file exists)
    tdmm: str | None        # URI of the 3D_FV_files npy


@dataclass(frozen=True)
class Item:
    """One directed evaluation item."""

    index: int              # position in the official order (csv rows, then the same rows mirrored)
    split: str
    speaker: str            # clip_id
    listener: str           # clip_id
    mirrored: bool


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file (or folder); per-clip problems mean quarantine, not abort."""

    uri: str
    reason: str
    clip_id: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}"


@dataclass(frozen=True)
class ClipProbe:
    """What a clip's files contain (frame counts, rates) and what is wrong with them."""

    clip_id: str
    split: str
    video_frames: int | None = None
    video_fps: float | None = None
    video_size: tuple[int, int] | None = None     # (height, width)
    audio_seconds: float | None = None
    audio_rate: int | None = None
    emotion_frames: int | None = None
    tdmm_frames: int | None = None
    problems: tuple[Problem, ...] = ()

    @property
    def frames(self) -> dict[str, int]:
        """Per-frame modality -> frame count, for those that could be read."""
        counts = {VIDEO: self.video_frames, EMOTION: self.emotion_frames, TDMM: self.tdmm_frames}
        return {k: v for k, v in counts.items() if v is not None}

    @property
    def num_frames(self) -> int | None:
        """The clip's frame count: the one most of its files agree on (ties: the video's)."""
        counts = self.frames
        if not counts:
            return None
        votes = Counter(counts.values())
        return max(votes, key=lambda n: (votes[n], n == counts.get(VIDEO)))


# ---------------------------------------------------------------------------------------------
# Paths and keys


def parse_clip_path(path: str, where: str) -> tuple[str, str, str, str]:
    """(site, session, role, clip) of a csv path string; rejects anything outside the root.

    ``where`` names the csv and line for the error message. UDIVA's five-part paths
    ``UDIVA/<task>/<session>/<role>/<clip>`` get the session ``<session>_<task>`` (the key the
    organisers' ``data_indices.csv`` and ``matrix_split.py`` use).
    """
    if not path:
        raise ReactLayoutError(where, "empty clip path")
    # Security: a split csv comes with the data; it must not make us read (or, through the
    # snapshot's source URIs, expose) anything outside the dataset root.
    if (path.startswith(("/", "~")) or "\\" in path or ":" in path or "\x00" in path):
        raise ReactLayoutError(where, f"clip path {path!r} is absolute or not a plain relative "
                               "path; it would escape the dataset root (rejected)")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ReactLayoutError(where, f"clip path {path!r} contains an empty, '.' or '..' "
                               "component; it would escape the dataset root (rejected)")
    if len(parts) == 4:
        return parts[0], parts[1], parts[2], parts[3]
    if len(parts) == 5:
        site, task, session, role, clip = parts
        return site, f"{session}_{task}", role, clip
    raise ReactLayoutError(where, f"clip path {path!r} should look like <site>/<session>/<role>/<clip> "
                           "(or UDIVA/<task>/<session>/<role>/<clip>)")


def emotion_clip_path(path: str) -> str:
    """The 2024 Emotion-tree path of a csv clip path (role folder renamed to P1/P2)."""
    parts = path.split("/")
    parts[-2] = EMOTION_ROLE_RENAME.get(parts[-2], parts[-2])
    return "/".join(parts)


def neighbour_key(path: str) -> tuple[str, str, str]:
    """Key of a clip path in ``data_indices.csv``: (SITE, session, clip) as matrix_split.py builds it."""
    parts = path.split("/")
    if len(parts) > 4:
        return parts[0].upper(), f"{parts[2]}_{parts[1]}", parts[4]
    return parts[0].upper(), parts[1], parts[3]


def _read_csv_rows(uri: str, what: str) -> list[list[str]]:
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise ReactLayoutError(uri, f"{what} not found") from None
    except UnicodeDecodeError as exc:
        raise ReactLayoutError(uri, f"{what} is not UTF-8 text ({exc})") from None
    return [[c.strip() for c in row] for row in csv.reader(io.StringIO(text))]


def read_split_csv(uri: str) -> list[tuple[str, str]]:
    """(speaker_path, listener_path) per row of a split csv, in csv order.

    Like the official loaders, the first row is a header and is skipped; rows are
    ``idx, speaker_path, listener_path`` (column 1 speaks in the csv-order items).
    """
    rows = _read_csv_rows(uri, "split csv")
    if not rows:
        raise ReactLayoutError(uri, "split csv is empty (expected a header and rows idx, speaker_path, listener_path)")
    header = rows[0]
    if len(header) >= 2 and "/" in header[-1]:
        log.warning("%s: the first row %s looks like data, but REACT split csvs start with a header "
                    "row, which is skipped (as the official loaders do)", uri, header)
    pairs: list[tuple[str, str]] = []
    for lineno, cells in enumerate(rows[1:], start=2):
        if not any(cells):
            continue
        where = f"{uri} line {lineno}"
        if len(cells) < 3:
            raise ReactLayoutError(where, f"expected idx, speaker_path, listener_path; got {cells}")
        speaker, listener = cells[1], cells[2]
        parse_clip_path(speaker, where)
        parse_clip_path(listener, where)
        pairs.append((speaker, listener))
    return pairs


def read_data_indices(uri: str) -> list[tuple[str, str, str]]:
    """Keys (SITE, chat_index, clip_index) of the organisers' ``data_indices.csv``, in row order.

    The first row is a header, skipped as ``matrix_split.py`` does (``drop(0)``).
    """
    rows = _read_csv_rows(uri, "data_indices.csv")
    keys = []
    for lineno, cells in enumerate(rows[1:], start=2):
        if not any(cells):
            continue
        if len(cells) < 3:
            raise ReactLayoutError(f"{uri} line {lineno}", f"expected site, chat_index, clip_index; got {cells}")
        keys.append((cells[0].upper(), cells[1], cells[2]))
    return keys


def split_neighbours(all_neighbours: np.ndarray, index_keys: list[tuple[str, str, str]],
                     pairs: list[tuple[str, str]], where: str = "split csv",
                     indices_uri: str = DATA_INDICES, matrix_uri: str = ALL_NEIGHBOURS) -> np.ndarray:
    """The split's [2L, 2L] matrix cut from the organisers' [2M, 2M] one (``matrix_split.py``).

    Row k of the split is mapped to its ``data_indices`` row i_k by its speaker path; with
    half = 2M // 2, the four blocks are [i, j], [i, j + half], [i + half, j], [i + half, j + half],
    so rows and columns follow the official item order (csv rows, then mirrored).
    """
    n = all_neighbours.shape[0]
    if all_neighbours.ndim != 2 or all_neighbours.shape[1] != n or n % 2:
        raise ReactLayoutError(matrix_uri, "expected a square 2M x 2M matrix, got shape "
                               f"{tuple(all_neighbours.shape)}")
    half = n // 2
    if half != len(index_keys):
        log.warning("%s has %d rows but %s is %dx%d (expected 2M = %d); using offset %d as matrix_split.py does",
                    indices_uri, len(index_keys), ALL_NEIGHBOURS, n, n, 2 * len(index_keys), half)
    lookup: dict[tuple[str, str, str], int] = {}
    for i, key in enumerate(index_keys):
        lookup.setdefault(key, i)
    rows = []
    for k, (speaker, _) in enumerate(pairs):
        key = neighbour_key(speaker)
        if key not in lookup:
            raise ReactLayoutError(f"{where} row {k + 1}", f"speaker {speaker!r} (key {'/'.join(key)}) "
                                   f"has no row in {indices_uri}")
        if lookup[key] >= half:
            raise ReactLayoutError(indices_uri, f"row {lookup[key]} for {speaker!r} is outside "
                                   f"{ALL_NEIGHBOURS} ({n}x{n})")
        rows.append(lookup[key])
    idx = np.asarray(rows, dtype=np.int64)
    order = np.concatenate([idx, idx + half])
    block = np.asarray(all_neighbours[np.ix_(order, order)])
    return (block != 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# File readers (raise ReactLayoutError naming the file)


def read_emotion(uri: str) -> np.ndarray:
    """[T, 25] float32 from an Emotion csv (header row skipped, as the official loaders do)."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise ReactLayoutError(uri, "Emotion csv not found") from None
    except UnicodeDecodeError as exc:
        raise ReactLayoutError(uri, f"Emotion csv is not text ({exc})") from None
    lines = [ln for ln in text.splitlines()[1:] if ln.strip()]
    if not lines:
        raise ReactLayoutError(uri, "Emotion csv has no frame rows after the header")
    widths = {len(ln.split(",")) for ln in lines}
    if widths != {EMOTION_DIM}:
        raise ReactLayoutError(uri, f"Emotion csv rows have {sorted(widths)} columns; expected "
                               f"{EMOTION_DIM} (15 AUs, valence, arousal, 8 expression probabilities)")
    try:
        values = np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise ReactLayoutError(uri, f"Emotion csv has a non-numeric value ({exc})") from None
    if not np.isfinite(values).all():
        raise ReactLayoutError(uri, "Emotion csv contains NaN or infinite values")
    return values


def read_tdmm(uri: str) -> np.ndarray:
    """[T, 58] float32 from a 3D_FV_files npy stored as T x 58 or T x 1 x 58."""
    try:
        arr = read_npy(uri)
    except FileNotFoundError:
        raise ReactLayoutError(uri, "3DMM npy not found") from None
    if arr.ndim == 3 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 2 or arr.shape[1] != TDMM_DIM or arr.shape[0] == 0:
        raise ReactLayoutError(uri, f"3DMM array has shape {tuple(arr.shape)}; expected "
                               f"(T, {TDMM_DIM}) or (T, 1, {TDMM_DIM}) (REACT: T = {FRAMES})")
    if not np.issubdtype(arr.dtype, np.number):
        raise ReactLayoutError(uri, f"3DMM array has dtype {arr.dtype}; expected floats")
    if not np.isfinite(arr).all():
        raise ReactLayoutError(uri, "3DMM array contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The dataset


@dataclass
class _SplitIndex:
    """What one split's modality trees hold, listed once (one listing per tree, not per clip)."""

    video_format: str | None                     # "mp4" | "png" | None (nothing found)
    folders: dict[str, bool]                     # modality -> folder exists
    files: dict[str, set[str]]                   # modality -> relative paths (mp4/wav/csv/npy)
    png_frames: dict[str, list[int]] = field(default_factory=dict)  # clip path -> sorted frame numbers


class ReactDataset:
    """A REACT dataset root (local or s3://). Build with :func:`open_dataset`."""

    def __init__(self, root: str, pairs: dict[str, list[tuple[str, str]]]):
        # Local roots become absolute: clip URIs must resolve the same on every Ray worker.
        self.root = root.rstrip("/") if "://" in root else os.path.abspath(root)
        self._pairs = pairs
        self._index: dict[str, _SplitIndex] = {}
        self._clips: dict[str, list[Clip]] = {}
        self._neighbours: dict[str, np.ndarray | None] = {}
        self._neighbour_source: dict[str, str | None] = {}

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={len(p)}" for s, p in self._pairs.items())
        return f"ReactDataset({self.root!r}, dyads: {counts})"

    # -- splits, items ------------------------------------------------------------------------

    @property
    def splits(self) -> list[str]:
        """Splits that have a csv at the root, in the order train, val, test."""
        return list(self._pairs)

    def csv_uri(self, split: str) -> str:
        return storage.join(self.root, f"{split}.csv")

    def dyads(self, split: str) -> list[tuple[str, str]]:
        """(speaker, listener) clip ids of the split csv rows, in csv order."""
        self._check_split(split)
        return list(self._pairs[split])

    def items(self, split: str) -> list[Item]:
        """The 2L directed items in the official order: csv rows, then the same rows mirrored."""
        pairs = self.dyads(split)
        items = [Item(k, split, s, l, False) for k, (s, l) in enumerate(pairs)]
        items += [Item(len(pairs) + k, split, l, s, True) for k, (s, l) in enumerate(pairs)]
        return items

    def _check_split(self, split: str) -> None:
        if split not in self._pairs:
            known = ", ".join(self._pairs) or "none"
            raise ReactLayoutError(self.csv_uri(split), f"no {split} split (split csvs found: {known})")

    # -- clips ----------------------------------------------------------------------------------

    def clips(self, split: str | None = None) -> list[Clip]:
        """Person clips in a deterministic order: split order, then first appearance in the csv
        (row 1 speaker, row 1 listener, row 2 speaker, ...). Missing files are ``None``."""
        if split is None:
            return [c for s in self.splits for c in self.clips(s)]
        self._check_split(split)
        if split not in self._clips:
            self._clips[split] = self._build_clips(split)
        return list(self._clips[split])

    def clip(self, clip_id: str, split: str | None = None) -> Clip:
        for c in self.clips(split):
            if c.clip_id == clip_id:
                return c
        raise KeyError(clip_id)

    @property
    def release(self) -> str:
        """"2024" (mp4 video) or "2023" (PNG frame folders); without videos, by Emotion naming."""
        formats = [self._split_index(s).video_format for s in self.splits]
        if "mp4" in formats:
            return "2024"
        if "png" in formats:
            return "2023"
        return "2024" if self.emotion_naming == "P1/P2" else "2023"

    @property
    def emotion_naming(self) -> str:
        """"P1/P2" when the Emotion tree uses the 2024 role renaming, "original" otherwise."""
        renamed = original = 0
        for split in self.splits:
            files = self._split_index(split).files[EMOTION]
            for clip_id in self._clip_ids(split):
                rel = emotion_clip_path(clip_id)
                if rel != clip_id and rel + ".csv" in files:
                    renamed += 1
                elif clip_id + ".csv" in files:
                    original += 1
        return "P1/P2" if renamed > original else "original"

    def _clip_ids(self, split: str) -> list[str]:
        seen: dict[str, None] = {}
        for speaker, listener in self._pairs[split]:
            seen.setdefault(speaker)
            seen.setdefault(listener)
        return list(seen)

    def modality_uri(self, split: str, modality: str) -> str:
        return storage.join(self.root, split, modality)

    def _split_index(self, split: str) -> _SplitIndex:
        if split in self._index:
            return self._index[split]
        folders, files = {}, {}
        for modality, suffix in ((AUDIO, ".wav"), (EMOTION, ".csv"), (TDMM, ".npy")):
            uri = self.modality_uri(split, modality)
            folders[modality] = storage.exists(uri)
            files[modality] = set(storage.walk_files(uri, suffix)) if folders[modality] else set()
        video_uri = self.modality_uri(split, VIDEO)
        folders[VIDEO] = storage.exists(video_uri)
        video_format, mp4s, pngs = None, set(), {}
        if folders[VIDEO]:
            video_format = self._detect_video_format(split, video_uri)
            if video_format == "png":
                pngs = png_frame_numbers(video_uri)
            elif video_format == "mp4":
                mp4s = set(storage.walk_files(video_uri, ".mp4"))
            else:  # nothing at the expected places: list everything once and classify
                rels = list(storage.walk_files(video_uri))
                mp4s = {r for r in rels if r.endswith(".mp4")}
                pngs = group_pngs(rels)
                video_format = "mp4" if mp4s else ("png" if pngs else None)
        files[VIDEO] = mp4s
        index = _SplitIndex(video_format, folders, files, pngs)
        self._index[split] = index
        return index

    def _detect_video_format(self, split: str, video_uri: str) -> str | None:
        # One or two existence checks on the first clips decide how to list the tree: a flat
        # listing for mp4 (one object per clip), a per-folder walk for the 2023 PNG release
        # (751 objects per clip, millions in all: never held in one list).
        for clip_id in self._clip_ids(split)[:5]:
            if storage.exists(storage.join(video_uri, clip_id + ".mp4")):
                return "mp4"
            if storage.exists(storage.join(video_uri, clip_id, "1.png")):
                return "png"
        return None

    def _build_clips(self, split: str) -> list[Clip]:
        index = self._split_index(split)
        clips = []
        for clip_id in self._clip_ids(split):
            site, session, role, clip_index = parse_clip_path(clip_id, self.csv_uri(split))
            video, video_format = None, index.video_format or "mp4"
            if clip_id + ".mp4" in index.files[VIDEO]:
                video, video_format = storage.join(self.modality_uri(split, VIDEO), clip_id + ".mp4"), "mp4"
            elif clip_id in index.png_frames:
                video, video_format = storage.join(self.modality_uri(split, VIDEO), clip_id), "png"
            audio = self._file(split, AUDIO, clip_id + ".wav")
            renamed = emotion_clip_path(clip_id) + ".csv"
            emotion = self._file(split, EMOTION, renamed) or self._file(split, EMOTION, clip_id + ".csv")
            tdmm = self._file(split, TDMM, clip_id + ".npy")
            clips.append(Clip(clip_id, split, site, session, role, clip_index, video, video_format,
                              audio, emotion, tdmm))
        return clips

    def _file(self, split: str, modality: str, rel: str) -> str | None:
        if rel in self._split_index(split).files[modality]:
            return storage.join(self.modality_uri(split, modality), rel)
        return None

    def png_frame_numbers(self, clip: Clip) -> list[int]:
        """Sorted frame numbers N of the N.png files of a 2023 clip folder."""
        return list(self._split_index(clip.split).png_frames.get(clip.clip_id, []))

    # -- neighbours, mean face ------------------------------------------------------------------

    def neighbours(self, split: str) -> np.ndarray | None:
        """[2L, 2L] uint8 appropriate-neighbour matrix in item order, or None if the dataset has none.

        ``neighbour_emotion_<split>.npy`` at the root is used when present; otherwise the matrix
        is cut from ``data_indices.csv`` + ``Approprirate_facial_reaction.npy``.
        """
        self._check_split(split)
        if split not in self._neighbours:
            self._neighbours[split], self._neighbour_source[split] = self._load_neighbours(split)
        return self._neighbours[split]

    def neighbour_source(self, split: str) -> str | None:
        """Which file(s) :meth:`neighbours` came from (None: no matrix)."""
        self.neighbours(split)
        return self._neighbour_source[split]

    def _load_neighbours(self, split: str) -> tuple[np.ndarray | None, str | None]:
        n = 2 * len(self._pairs[split])
        ready = storage.join(self.root, split_neighbours_file(split))
        if storage.exists(ready):
            matrix = read_npy(ready)
            if matrix.shape != (n, n):
                raise ReactLayoutError(ready, f"shape {tuple(matrix.shape)} does not match {split}.csv "
                                       f"({n // 2} rows -> {n} x {n} items); regenerate it for this csv")
            return (matrix != 0).astype(np.uint8), split_neighbours_file(split)
        big_uri = storage.join(self.root, ALL_NEIGHBOURS)
        indices_uri = self._data_indices_uri()
        if indices_uri is None or not storage.exists(big_uri):
            return None, None
        keys = read_data_indices(indices_uri)
        big = read_npy(big_uri, large=True)
        matrix = split_neighbours(big, keys, self._pairs[split], where=self.csv_uri(split),
                                  indices_uri=indices_uri, matrix_uri=big_uri)
        rel_indices = indices_uri[len(self.root):].lstrip("/")
        return matrix, f"{rel_indices} + {ALL_NEIGHBOURS}"

    def _data_indices_uri(self) -> str | None:
        for rel in (DATA_INDICES, f"tool/{DATA_INDICES}"):   # the 2023 repo keeps it in tool/
            uri = storage.join(self.root, rel)
            if storage.exists(uri):
                return uri
        return None

    def mean_face(self) -> np.ndarray | None:
        """[58] float32 from ``mean_face.npy`` at the root, or None."""
        uri = storage.join(self.root, MEAN_FACE)
        if not storage.exists(uri):
            return None
        arr = read_npy(uri).astype(np.float32).reshape(-1)
        if arr.size != TDMM_DIM:
            raise ReactLayoutError(uri, f"expected {TDMM_DIM} values, got {arr.size}")
        return arr

    # -- validation -----------------------------------------------------------------------------

    def probe(self, clip: Clip) -> ClipProbe:
        """Read a clip's headers/arrays: frame counts, rates, and every problem found (never raises)."""
        problems: list[Problem] = []

        def add(uri, reason):
            problems.append(Problem(uri, reason, clip.clip_id, clip.split))

        info: dict = {}
        for modality, uri in ((VIDEO, clip.video), (AUDIO, clip.audio), (EMOTION, clip.emotion), (TDMM, clip.tdmm)):
            if uri is None:
                add(self._expected_uri(clip, modality), f"missing {modality} file")
                continue
            try:
                if modality == VIDEO and clip.video_format == "png":
                    numbers = self.png_frame_numbers(clip)
                    info["video_frames"] = len(numbers)
                    info["video_size"] = png_size(storage.join(uri, f"{numbers[0]}.png"))
                    if numbers != list(range(1, len(numbers) + 1)):
                        add(uri, f"PNG frames are not numbered 1..{len(numbers)} (gaps or extra files)")
                elif modality == VIDEO:
                    frames, fps, size = mp4_info(uri)
                    info.update(video_frames=frames, video_fps=fps, video_size=size)
                    if abs(fps - FPS) > 0.01:
                        add(uri, f"video is {fps:g} fps; REACT clips are {FPS} fps")
                elif modality == AUDIO:
                    info["audio_seconds"], info["audio_rate"] = wav_info(uri)
                elif modality == EMOTION:
                    info["emotion_frames"] = len(read_emotion(uri))
                else:
                    info["tdmm_frames"] = len(read_tdmm(uri))
            except (ReactLayoutError, ClipError) as exc:
                problems.append(Problem(exc.uri, exc.reason, clip.clip_id, clip.split))
            except Exception as exc:  # a corrupt file must become a problem row, not a crash
                add(uri, f"unreadable ({type(exc).__name__}: {exc})")

        probe = ClipProbe(clip.clip_id, clip.split, **info)
        # Frame counts must agree across the per-frame modalities of one clip: files disagreeing
        # with the count most of them share are reported.
        counts, reference = probe.frames, probe.num_frames
        if counts:
            uris = {VIDEO: clip.video, EMOTION: clip.emotion, TDMM: clip.tdmm}
            for modality, n in counts.items():
                if n != reference:
                    add(uris[modality], f"{n} frames, but the clip's other files have {reference} "
                                        f"({', '.join(f'{m} {c}' for m, c in counts.items())})")
            if probe.audio_seconds is not None and abs(probe.audio_seconds - reference / FPS) > 0.2:
                add(clip.audio, f"audio lasts {probe.audio_seconds:.2f} s but the clip has {reference} "
                                f"frames ({reference / FPS:.2f} s at {FPS} fps)")
        return ClipProbe(**{**probe.__dict__, "problems": tuple(problems)})

    def _expected_uri(self, clip: Clip, modality: str) -> str:
        base = self.modality_uri(clip.split, modality)
        if modality == VIDEO:
            fmt = self._split_index(clip.split).video_format
            return storage.join(base, clip.clip_id if fmt == "png" else clip.clip_id + ".mp4")
        if modality == EMOTION:
            return storage.join(base, emotion_clip_path(clip.clip_id) + ".csv")
        return storage.join(base, clip.clip_id + (".wav" if modality == AUDIO else ".npy"))

    def probe_all(self, clips: Iterable[Clip] | None = None, workers: int = 16,
                  progress: Callable[[int, int], None] | None = None) -> list[ClipProbe]:
        """:meth:`probe` over many clips with a thread pool (I/O bound), in input order."""
        clips = list(self.clips() if clips is None else clips)
        for split in {c.split for c in clips}:
            self._split_index(split)        # list once, before the threads share the index
        out: list[ClipProbe] = []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, probe in enumerate(pool.map(self.probe, clips)):
                out.append(probe)
                if progress:
                    progress(i + 1, len(clips))
        return out

    def layout_problems(self, split: str | None = None) -> list[Problem]:
        """Missing folders/files and clips listed in two splits, from the listings alone (cheap)."""
        problems: list[Problem] = []
        splits = self.splits if split is None else [split]
        owner: dict[str, str] = {}
        for s in splits:
            index = self._split_index(s)
            absent = [m for m in MODALITIES if not index.folders[m]]
            for m in absent:
                problems.append(Problem(self.modality_uri(s, m), f"missing {m} folder "
                                        f"({len(self._clip_ids(s))} clips of {s}.csv have no {m} file)", split=s))
            for clip in self.clips(s):
                if clip.clip_id in owner and owner[clip.clip_id] != s:
                    problems.append(Problem(self.csv_uri(s), f"clip {clip.clip_id} is also listed in "
                                            f"{owner[clip.clip_id]}.csv (splits must not share clips)",
                                            clip.clip_id, s))
                owner.setdefault(clip.clip_id, s)
                for m, uri in ((VIDEO, clip.video), (AUDIO, clip.audio), (EMOTION, clip.emotion), (TDMM, clip.tdmm)):
                    if uri is None and m not in absent:
                        problems.append(Problem(self._expected_uri(clip, m), f"missing {m} file",
                                                clip.clip_id, s))
        return problems

    def problems(self, split: str | None = None, contents: bool = False, expected_frames: int | None = None,
                 workers: int = 16, probes: list[ClipProbe] | None = None) -> list[Problem]:
        """Every problem found, one per file and reason; never raises for per-clip issues.

        ``contents=False`` checks the listings only; ``contents=True`` also reads every file
        (shapes, column counts, frame counts, fps, audio length; pass ``probes`` from
        :meth:`probe_all` to reuse them). Clips whose frame count differs from ``expected_frames``
        (default: the most common count in the dataset) are reported too.
        """
        problems = self.layout_problems(split)
        for s in self.splits if split is None else [split]:
            try:
                self.neighbours(s)
            except ReactLayoutError as exc:
                problems.append(Problem(exc.uri, exc.reason, split=s))
        if not contents and probes is None:
            return problems
        if probes is None:
            probes = self.probe_all(self.clips(split), workers=workers)
        # A missing folder is one problem, not one "missing file" per clip.
        absent = {f"missing {m} file": {s for s in self.splits if not self._split_index(s).folders[m]}
                  for m in MODALITIES}
        per_clip = [p for probe in probes for p in probe.problems if p.split not in absent.get(p.reason, ())]
        return _dedupe(problems + frame_count_problems(self, probes, expected_frames) + per_clip)

    def complete_dyads(self, problems: Iterable[Problem] = ()) -> dict[str, int]:
        """Per split, the dyads whose two clips have all four files and no per-clip problem."""
        bad = {(p.split, p.clip_id) for p in problems if p.clip_id}
        out = {}
        for split in self.splits:
            ok = {c.clip_id for c in self.clips(split)
                  if (split, c.clip_id) not in bad and None not in (c.video, c.audio, c.emotion, c.tdmm)}
            out[split] = sum(1 for s, l in self._pairs[split] if s in ok and l in ok)
        return out

    def validate(self, contents: bool = False, expected_frames: int | None = None) -> list[Problem]:
        """The problems (for quarantine), or :class:`ReactLayoutError` if no dyad is usable at all."""
        problems = self.problems(contents=contents, expected_frames=expected_frames)
        if not sum(self.complete_dyads(problems).values()):
            rows = sum(len(p) for p in self._pairs.values())
            first = "; ".join(str(p) for p in problems[:3]) or "no clips listed"
            raise ReactLayoutError(self.root, f"no usable dyad among {rows} csv rows ({len(problems)} "
                                   f"problems, first: {first})")
        return problems


def frame_count_problems(ds: ReactDataset, probes: list[ClipProbe], expected: int | None = None) -> list[Problem]:
    """Clips whose frame count differs from ``expected`` (default: the dataset's most common count)."""
    counts = Counter(p.num_frames for p in probes if p.num_frames is not None)
    if expected is None:
        if not counts:
            return []
        expected = counts.most_common(1)[0][0]
    clips = {(c.split, c.clip_id): c for c in ds.clips()}
    out = []
    for p in probes:
        values = set(p.frames.values())
        if len(values) == 1 and values != {expected}:   # disagreeing files are reported by probe()
            clip = clips[(p.split, p.clip_id)]
            uri = clip.video or clip.tdmm or clip.emotion or ds.csv_uri(p.split)
            out.append(Problem(uri, f"clip has {values.pop()} frames; expected {expected}",
                               p.clip_id, p.split))
    return out


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        key = (p.uri, p.reason)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def read_npy(uri: str, large: bool = False) -> np.ndarray:
    """An array of the dataset (never unpickled); ReactLayoutError naming the file when unreadable.

    ``large``: the organisers' 2M x 2M matrix (8 614^2 entries for REACT2023): a local file is
    memory-mapped instead of read whole, a remote one streamed (one copy in memory, not two).
    """
    try:
        if not large:
            return storage.read_npy(uri)
        fs, path = storage.filesystem(uri)
        if not storage.is_remote(uri):
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with fs.open(path, "rb") as f:
            return np.load(f, allow_pickle=False)
    except ValueError as exc:
        raise ReactLayoutError(uri, f"not a readable .npy array ({exc})") from None


def open_dataset(root: str) -> ReactDataset:
    """Open a REACT dataset root (local path or s3://); reads the split csvs, lists lazily.

    Raises :class:`ReactLayoutError` (naming the file) when the root or every split csv is
    missing, or a csv row is malformed or points outside the root.
    """
    if not storage.exists(root):
        raise ReactLayoutError(root, "dataset root not found")
    pairs = {}
    for split in SPLITS:
        uri = storage.join(root, f"{split}.csv")
        if storage.exists(uri):
            pairs[split] = read_split_csv(uri)
    if not pairs:
        raise ReactLayoutError(root, "no split csv (expected train.csv, val.csv and/or test.csv at the "
                               "dataset root, each with rows idx, speaker_path, listener_path)")
    return ReactDataset(root, pairs)
