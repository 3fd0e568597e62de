"""Decoding one person clip: face video to 224 centre crops, audio to a mono waveform, labels.

Everything here works on one clip at a time and streams: a 751-frame 256x256 clip is ~150 MB
of RGB, so frames are decoded in chunks and reduced to the resolution the extractors need at
once (the reference preprocessing: resize the shorter side to 256, centre-crop 224).

Known traps (DESIGN.md §4), avoided on purpose:
- decord: one ``VideoReader`` per task (never shared across threads), ``num_threads=1`` (Ray
  already runs one task per core), **sorted** indices to ``get_batch``.
- decord's ``AudioReader`` leaks ~2.5 MB per clip: wav goes through soundfile, audio inside a
  container (mp4, m4a) through PyAV.
- torchaudio >= 2.9 has no ``load``: resampling uses ``torchaudio.functional.resample`` only.

A problem with one clip raises :class:`ClipError` (stage, file, reason); the extraction job turns
it into a quarantine row instead of failing.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from pipeline import storage
from pipeline.errors import UserError

# Reference preprocessing (Hunan-Tiger/ReactDiff extract_feature.py): PIL frame -> Resize(256)
# (shorter side) -> CenterCrop(224) -> ToTensor -> Normalize(0.5, 0.5).
RESIZE_SHORTER = 256
CROP = 224


class ClipError(UserError):
    """One clip cannot be used: ``stage`` (decode_video, decode_audio, labels, ...), ``uri``, ``reason``."""

    def __init__(self, stage: str, uri: str | None, reason: str):
        super().__init__(f"{stage}: {uri}: {reason}")
        self.stage, self.uri, self.reason = stage, uri or "", reason


# ---------------------------------------------------------------------------------------------
# Video


def resized_size(height: int, width: int, shorter: int = RESIZE_SHORTER) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``shorter`` (torchvision ``Resize(int)`` rule)."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def center_crop_box(height: int, width: int, size: int = CROP) -> tuple[int, int]:
    """(top, left) of a ``size`` centre crop (torchvision ``CenterCrop`` rounding)."""
    if height < size or width < size:
        raise ValueError(f"frame {height}x{width} is smaller than the {size}x{size} crop")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def face_crops(frames: np.ndarray, shorter: int = RESIZE_SHORTER, size: int = CROP) -> np.ndarray:
    """uint8 [n, h, w, 3] frames -> uint8 [n, size, size, 3] reference crops.

    Frames already ``shorter`` on their short side (REACT videos are 256x256) are only cropped,
    bit-exact with the reference; others are resized with antialiased bilinear interpolation,
    which is what torchvision uses to match PIL's bilinear ``Resize``.
    """
    n, h, w, _ = frames.shape
    rh, rw = resized_size(h, w, shorter)
    if (rh, rw) != (h, w):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True,
                                            align_corners=False)
        frames = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    top, left = center_crop_box(rh, rw, size)
    return np.ascontiguousarray(frames[:, top:top + size, left:left + size])


class FaceVideo:
    """One clip's face video, read chunk by chunk. Use :func:`open_video`."""

    uri: str
    num_frames: int
    fps: float | None          # None: the format carries no rate (PNG frame folders)

    def frames(self, start: int, stop: int) -> np.ndarray:
        """uint8 RGB [stop - start, h, w, 3] of frames ``start..stop-1``."""
        raise NotImplementedError

    def crops(self, chunk: int = 64, size: int = CROP, shorter: int = RESIZE_SHORTER) -> Iterator[np.ndarray]:
        """Consecutive uint8 [<=chunk, size, size, 3] reference crops of every frame, in order."""
        for start in range(0, self.num_frames, chunk):
            stop = min(start + chunk, self.num_frames)
            try:
                block = self.frames(start, stop)
            except ClipError:
                raise
            except Exception as exc:  # decord/PIL errors on a corrupt or truncated stream
                raise ClipError("decode_video", self.uri, f"cannot decode frames {start}..{stop - 1} "
                                f"of {self.num_frames} ({_short(exc)})") from None
            if len(block) != stop - start:
                raise ClipError("decode_video", self.uri, f"decoded {len(block)} frames for "
                                f"{start}..{stop - 1}; the stream is truncated")
            yield face_crops(block, shorter, size)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Mp4Video(FaceVideo):
    """An mp4 (REACT 2024) decoded with decord, one reader per task, ``num_threads=1``."""

    def __init__(self, uri: str):
        import decord

        self.uri = uri
        try:
            if storage.is_remote(uri):
                # decord copies a file-like object into its own buffer: one GET per clip.
                source = io.BytesIO(storage.read_bytes(uri))
            else:
                source = storage.filesystem(uri)[1]
            self._reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except FileNotFoundError:
            raise ClipError("decode_video", uri, "video file not found") from None
        except Exception as exc:
            raise ClipError("decode_video", uri, f"cannot open video ({_short(exc)})") from None
        if self.num_frames <= 0:
            raise ClipError("decode_video", uri, "video has no frames")

    def frames(self, start: int, stop: int) -> np.ndarray:
        # Sorted, contiguous indices: decord decodes forward without seeking back.
        return self._reader.get_batch(list(range(start, stop))).asnumpy()

    def close(self) -> None:
        self._reader = None


class PngFrames(FaceVideo):
    """A folder of ``1.png .. N.png`` (REACT 2023), decoded with Pillow."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fps = None
        fs, path = storage.filesystem(uri)
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            raise ClipError("decode_video", uri, "PNG frame folder not found") from None
        numbers = sorted(n for n in map(png_number, names) if n is not None)
        if not numbers:
            raise ClipError("decode_video", uri, "no N.png frames in the folder")
        if numbers != list(range(1, len(numbers) + 1)):
            missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))[:5]
            raise ClipError("decode_video", uri, f"PNG frames are not numbered 1..{len(numbers)} "
                            f"(missing e.g. {missing})")
        self._fs, self._path = fs, path
        self.num_frames = len(numbers)

    def frames(self, start: int, stop: int) -> np.ndarray:
        from PIL import Image

        paths = [posixpath.join(self._path, f"{i + 1}.png") for i in range(start, stop)]
        blobs = self._fs.cat(paths)  # concurrent GETs on object stores
        out = []
        for p in paths:
            blob = blobs.get(p) if isinstance(blobs, dict) else None
            if blob is None:        # some filesystems key the result differently: fetch directly
                blob = self._fs.cat_file(p)
            with Image.open(io.BytesIO(blob)) as img:
                out.append(np.asarray(img.convert("RGB")))
        shapes = {a.shape for a in out}
        if len(shapes) != 1:
            raise ClipError("decode_video", self.uri, f"PNG frames have different sizes {sorted(shapes)}")
        return np.stack(out)


class Recording(FaceVideo):
    """An ordinary recording (webcam, phone): any frame rate, constant or variable, any size, the
    rotation a phone records honoured — read as ``fps`` frames a second by presentation timestamps
    (output frame i shows the source frame on screen at ``i / fps``), decoded with PyAV in order.

    ``boxes`` (int [num_frames, 3] left, top, side; pipeline.data.face_crop) crop every output
    frame to its square face box, resized to ``size``; without boxes frames are the whole upright
    picture. Frames are read forwards (``crops`` does); going back re-opens the file.
    """

    def __init__(self, uri: str, fps: float, boxes: np.ndarray | None = None, size: int = 256):
        self.uri, self.fps, self.size = uri, float(fps), size
        self.timeline = video_timeline(uri)
        self.index = self.timeline.resample(self.fps)
        self.num_frames = len(self.index)
        self.boxes = boxes
        if boxes is not None and len(boxes) != self.num_frames:
            raise ValueError(f"{len(boxes)} face boxes for {self.num_frames} frames")
        self._reader = None
        self._next = 0

    def upright(self, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(output frame index, uint8 RGB upright frame) for every ``every``-th output frame, in
        order (the others are decoded but not converted to RGB: the face search stays cheap)."""
        import av

        fs, path = storage.filesystem(self.uri)
        rotation = self.timeline.rotation // 90
        j, n = 0, self.num_frames

        def rgb(frame) -> np.ndarray:
            out = frame.to_ndarray(format="rgb24")
            return np.ascontiguousarray(np.rot90(out, k=rotation)) if rotation else out

        with fs.open(path, "rb") as f, av.open(f) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            last = None
            for s, last in enumerate(container.decode(stream)):
                shown = []
                while j < n and self.index[j] <= s:       # several for a slower source, none when dropped
                    shown.append(j)
                    j += 1
                shown = [k for k in shown if k % every == 0]
                if shown:
                    picture = rgb(last)
                    for k in shown:
                        yield k, picture
                if j >= n:
                    return
            held = rgb(last) if last is not None and j < n else None
            for k in range(j, n):                         # fewer decodable frames than packets: hold
                if k % every == 0:
                    yield k, held

    def frames(self, start: int, stop: int) -> np.ndarray:
        if self._reader is None or start < self._next:
            self._reader, self._next = self.upright(), 0
        out = []
        for j, rgb in self._reader:
            self._next = j + 1
            if j < start:
                continue
            out.append(rgb if self.boxes is None else _face_crop(rgb, self.boxes[j], self.size))
            if j + 1 >= stop:
                break
        if not out:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.stack(out)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _face_crop(rgb: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    from pipeline.data.face_crop import crop

    return crop(rgb, box, size)


@dataclass(frozen=True)
class Timeline:
    """A video stream's presentation times, from its packets (no decoding)."""

    pts: np.ndarray            # float64 [frames] seconds, sorted (presentation order)
    end: float                 # seconds: the last frame's time plus its duration
    rotation: int              # degrees counter-clockwise the picture is shown rotated by (0/90/180/270)
    height: int                # of the upright (displayed) picture
    width: int

    @property
    def fps(self) -> float:
        """The mean frame rate (a variable-rate stream has no single one)."""
        return (len(self.pts)) / max(self.end - self.pts[0], 1e-9)

    @property
    def variable(self) -> bool:
        steps = np.diff(self.pts)
        return len(steps) > 1 and float(steps.max() - steps.min()) > 0.25 * float(np.median(steps))

    @property
    def seconds(self) -> float:
        return self.end - float(self.pts[0])

    def resample(self, fps: float) -> np.ndarray:
        """int [round(seconds * fps)]: the source frame on screen at each output time i / fps."""
        n = max(1, int(round(self.seconds * fps)))
        t = self.pts[0] + np.arange(n) / fps
        # 1 ms of slack: a source at exactly ``fps`` maps frame i to frame i despite rounding.
        return np.clip(np.searchsorted(self.pts, t + 1e-3, side="right") - 1, 0, len(self.pts) - 1)


def video_timeline(uri: str) -> Timeline:
    """The :class:`Timeline` of a video file's first video stream; ClipError(stage "probe")."""
    import av

    try:
        with _video_stream(uri) as (container, stream):
            base = float(stream.time_base)
            packets = [(p.pts, p.duration or 0) for p in container.demux(stream) if p.size and p.pts is not None]
            container.seek(0)
            first = next(container.decode(stream), None)
            h, w = stream.codec_context.height, stream.codec_context.width
    except FileNotFoundError:
        raise ClipError("probe", uri, "video not found") from None
    except av.FFmpegError as exc:
        raise ClipError("probe", uri, f"cannot read video container ({exc})") from None
    if not packets or first is None:
        raise ClipError("probe", uri, "the video stream has no decodable frame")
    packets.sort()
    pts = np.asarray([p for p, _ in packets], dtype=np.float64) * base
    last = packets[-1][1] * base or (float(np.median(np.diff(pts))) if len(pts) > 1 else 1 / 25)
    rotation = int(round(getattr(first, "rotation", 0) or 0)) % 360
    rotation -= rotation % 90
    if rotation in (90, 270):
        h, w = w, h
    return Timeline(pts, float(pts[-1] + last), rotation, h, w)


def png_number(name: str) -> int | None:
    """N of a frame file "N.png" (REACT 2023), else None."""
    stem = name[:-4]
    return int(stem) if name.endswith(".png") and stem.isdigit() else None


def group_pngs(rels: Iterable[str]) -> dict[str, list[int]]:
    """folder -> sorted N of its N.png files, from relative file paths."""
    folders: dict[str, list[int]] = {}
    for rel in rels:
        folder, name = posixpath.split(rel)
        n = png_number(name)
        if n is not None and folder:
            folders.setdefault(folder, []).append(n)
    return {k: sorted(v) for k, v in folders.items()}


def png_frame_numbers(video_uri: str) -> dict[str, list[int]]:
    """clip path -> sorted PNG frame numbers, walking folder by folder."""
    fs, base = storage.filesystem(video_uri)
    folders: dict[str, list[int]] = {}
    if not storage.is_remote(video_uri):
        # os.walk uses directory entries without a stat per file: a 2023 release has
        # millions of PNGs, where fsspec's local walk would stat every one of them.
        for dirpath, _, filenames in os.walk(base):
            numbers = sorted(n for n in map(png_number, filenames) if n is not None)
            if numbers:
                folders[os.path.relpath(dirpath, base).replace(os.sep, "/")] = numbers
        return folders
    prefix = base.rstrip("/") + "/"
    for dirpath, _, filenames in fs.walk(base):
        numbers = sorted(n for n in map(png_number, filenames) if n is not None)
        if numbers:
            folders[dirpath[len(prefix):] if dirpath.startswith(prefix) else dirpath] = numbers
    return folders


def open_video(uri: str, video_format: str = "mp4") -> FaceVideo:
    """A :class:`FaceVideo` for an mp4 file or a 2023 PNG frame folder."""
    if video_format == "png":
        return PngFrames(uri)
    if video_format != "mp4":
        raise ClipError("decode_video", uri, f"unknown video format {video_format!r} (mp4 or png)")
    return Mp4Video(uri)


# ---------------------------------------------------------------------------------------------
# Audio


@dataclass(frozen=True)
class Audio:
    """A mono waveform in [-1, 1] and where it came from."""

    samples: np.ndarray        # float32 [n]
    sample_rate: int
    source_rate: int           # the file's own rate (before any resampling)
    channels: int              # the file's channel count (averaged to mono)

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def read_audio(uri: str) -> Audio:
    """Mono float32 audio of a wav (soundfile) or of a container's first audio stream (PyAV).

    Multi-channel audio is averaged to mono, as the reference does.
    """
    ext = posixpath.splitext(uri.split("?", 1)[0])[1].lower()
    try:
        if ext in (".wav", ".flac", ".ogg", ".aiff", ".aif"):
            samples, rate = _read_soundfile(uri)
        else:
            samples, rate = _read_container_audio(uri)
    except ClipError:
        raise
    except FileNotFoundError:
        raise ClipError("decode_audio", uri, "audio file not found") from None
    except Exception as exc:
        raise ClipError("decode_audio", uri, f"cannot read audio ({_short(exc)})") from None
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ClipError("decode_audio", uri, "audio has no samples")
    channels = samples.shape[1]
    mono = samples.mean(axis=1, dtype=np.float64).astype(np.float32) if channels > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise ClipError("decode_audio", uri, "audio contains NaN or infinite samples")
    return Audio(np.ascontiguousarray(mono, dtype=np.float32), rate, rate, channels)


def _read_soundfile(uri: str) -> tuple[np.ndarray, int]:
    import soundfile

    if storage.is_remote(uri):
        source = io.BytesIO(storage.read_bytes(uri))
    else:
        source = storage.filesystem(uri)[1]
        if not os.path.isfile(source):   # libsndfile would only say "System error"
            raise FileNotFoundError(source)
    samples, rate = soundfile.read(source, dtype="float32", always_2d=True)   # [n, channels]
    return samples, int(rate)


def _read_container_audio(uri: str) -> tuple[np.ndarray, int]:
    import av

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f, av.open(f) as container:
        if not container.streams.audio:
            raise ClipError("decode_audio", uri, "the container has no audio stream")
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or stream.rate)
        # Planar float keeps each channel separate: [channels, n] per decoded frame.
        resampler = av.AudioResampler(format="fltp", rate=rate)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise ClipError("decode_audio", uri, "the audio stream decodes to no samples")
    return np.concatenate(chunks, axis=1).T.astype(np.float32), rate


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited (sinc) resampling with ``torchaudio.functional.resample``."""
    if from_rate == to_rate:
        return samples
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), from_rate, to_rate)
    return out.numpy()


def audio_at(audio: Audio, rate: int) -> Audio:
    """The same audio at ``rate`` (resampled when the file has another rate)."""
    if audio.sample_rate == rate:
        return audio
    return Audio(resample(audio.samples, audio.sample_rate, rate), rate, audio.source_rate, audio.channels)


# ---------------------------------------------------------------------------------------------
# Probing: what a file holds, from its headers (no decoding); ClipError(stage "probe") when unreadable


@contextlib.contextmanager
def _video_stream(uri: str):
    """(container, first video stream) of a video file, opened with PyAV."""
    import av

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f, av.open(f) as container:
        if not container.streams.video:
            raise ClipError("probe", uri, "no video stream")
        yield container, container.streams.video[0]


def mp4_info(uri: str) -> tuple[int, float, tuple[int, int]]:
    """(frames, fps, (height, width)) of a video file from its container metadata (no decoding)."""
    import av

    try:
        with _video_stream(uri) as (container, stream):
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = int(stream.frames or 0)
            if frames == 0:  # containers without a frame count: count packets (no decoding)
                frames = sum(1 for p in container.demux(stream) if p.size)
            return frames, fps, (stream.codec_context.height, stream.codec_context.width)
    except FileNotFoundError:
        raise ClipError("probe", uri, "video not found") from None
    except av.FFmpegError as exc:
        raise ClipError("probe", uri, f"cannot read video container ({exc})") from None


def png_size(uri: str) -> tuple[int, int]:
    """(height, width) of a PNG frame from its header."""
    from PIL import Image, UnidentifiedImageError

    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as f, Image.open(f) as img:
            return img.height, img.width
    except FileNotFoundError:
        raise ClipError("probe", uri, "PNG frame not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ClipError("probe", uri, f"not a readable PNG ({exc})") from None


def wav_info(uri: str) -> tuple[float, int]:
    """(seconds, sample rate) of a wav file from its header."""
    import soundfile

    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            info = soundfile.info(f)
    except FileNotFoundError:
        raise ClipError("probe", uri, "audio not found") from None
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise ClipError("probe", uri, f"cannot read audio ({exc})") from None
    return info.frames / info.samplerate, int(info.samplerate)


# ---------------------------------------------------------------------------------------------
# Frame alignment


def fit_frames(array: np.ndarray, frames: int) -> np.ndarray:
    """Crop to ``frames`` rows, or pad by repeating the last row (used within the tolerance only)."""
    n = len(array)
    if n == frames:
        return array
    if n > frames:
        return array[:frames]
    pad = np.repeat(array[-1:], frames - n, axis=0)
    return np.concatenate([array, pad], axis=0)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    text = " ".join(text.split())
    return storage.redact(text if len(text) <= limit else text[:limit] + "...")
