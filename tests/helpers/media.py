"""Tiny media files for the tests (written with PyAV, soundfile, Pillow): videos, frame folders,
audio, and copies of a dataset a test may break."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

FPS = 25
RATE = 44100


def flash_frames(frames: int, bright: range = range(0), size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """uint8 [T, H, W, 3]: dark grey frames with a horizontal gradient; frames in ``bright`` are white."""
    h, w = size
    base = np.zeros((frames, h, w, 3), np.uint8)
    base[:] = np.linspace(20, 90, w, dtype=np.uint8)[None, None, :, None]
    for t in bright:
        base[t] = 250
    return base


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = FPS, audio: np.ndarray | None = None,
              rate: int = RATE) -> str:
    """H.264 mp4 (yuv420p, high quality), optionally with an AAC audio track."""
    import av

    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=rate)
            astream.layout = "mono"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None:
            encode_audio(container, astream, audio, rate, step=1024)
    return path


def encode_audio(container, stream, audio: np.ndarray, rate: int, step: int = 960) -> None:
    """Encode float audio [n] or [n, channels] into ``stream`` of ``container``, ``step`` samples a frame."""
    import av

    planar = np.ascontiguousarray((audio if audio.ndim == 2 else audio[:, None]).T.astype(np.float32))
    pts = 0
    for start in range(0, planar.shape[1], step):
        chunk = np.ascontiguousarray(planar[:, start:start + step])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
        frame.sample_rate, frame.pts = rate, pts
        pts += chunk.shape[1]
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_speaker_mp4(path: str | os.PathLike, frames: int = 30, size: int = 96) -> None:
    """A silent ``size``² H.264 speaker video whose green channel ramps frame by frame."""
    import av

    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=FPS)
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((size, size, 3), np.uint8)
            img[:, :, 1] = (i * 8) % 256
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in v.encode(f):
                out.mux(p)
        for p in v.encode():
            out.mux(p)


def write_pngs(folder: str | os.PathLike, frames: np.ndarray) -> str:
    from PIL import Image

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames, start=1):
        Image.fromarray(f).save(os.path.join(folder, f"{i}.png"))
    return folder


def beep(frames: int, on: range, rate: int = RATE, fps: int = FPS, freq: float = 1000.0,
         channels: int = 1, noise: float = 1e-3, seed: int = 0) -> np.ndarray:
    """float32 [n] (or [n, channels]): quiet noise, a loud sine during the video frames ``on``."""
    n = frames * rate // fps
    rng = np.random.default_rng(seed)
    x = noise * rng.standard_normal(n).astype(np.float32)
    hop = rate / fps
    start, stop = int(on.start * hop), int(on.stop * hop) if len(on) else 0
    t = np.arange(start, stop) / rate
    x[start:stop] += 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def write_wav(path: str | os.PathLike, samples: np.ndarray, rate: int = RATE) -> str:
    import soundfile

    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    soundfile.write(path, samples, rate, subtype="PCM_16")
    return path


def copy_dataset(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


# ---------------------------------------------------------------------------------------------
# Ordinary recordings (issue #17): a real face moving in a larger frame, any rate, container audio


def astronaut_face(side: int) -> np.ndarray:
    """uint8 [side, side, 3]: the head of scikit-image's astronaut photo (a real, frontal face)."""
    import cv2
    from skimage import data

    return cv2.resize(data.astronaut()[0:256, 96:352], (side, side), interpolation=cv2.INTER_AREA)


def moving_face_frames(frames: int, size: tuple[int, int] = (480, 640), side: int = 200,
                       amplitude: tuple[int, int] = (60, 20), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [T, H, W, 3] frames with the astronaut's head pasted off centre and drifting
    smoothly, float [T, 2] the true centre of the pasted head per frame)."""
    h, w = size
    head = astronaut_face(side)
    rng = np.random.default_rng(seed)
    out = np.empty((frames, h, w, 3), np.uint8)
    out[:] = rng.integers(40, 80, size=(1, h, w, 3), dtype=np.uint8)   # a still, textured room
    centres = np.empty((frames, 2))
    x0, y0 = (w - side) // 2 + w // 10, (h - side) // 2
    for t in range(frames):
        x = int(round(x0 + amplitude[0] * np.sin(2 * np.pi * t / max(frames, 60))))
        y = int(round(y0 + amplitude[1] * np.cos(2 * np.pi * t / max(frames, 45))))
        x, y = min(max(x, 0), w - side), min(max(y, 0), h - side)
        out[t, y:y + side, x:x + side] = head
        centres[t] = (x + side / 2, y + side / 2)
    return out, centres


def write_recording(path: str | os.PathLike, frames: np.ndarray, *, fps: float = 30.0,
                    times: np.ndarray | None = None, audio: np.ndarray | None = None, rate: int = 48000,
                    audio_codec: str = "aac", rotation: int = 0) -> str:
    """A recording as a phone or webcam writes it: H.264 at ``fps`` or at the presentation
    ``times`` (seconds; variable frame rate), ``rotation`` degrees counter-clockwise in the
    display matrix (the frames are stored unrotated), and ``audio`` (float [n] or [n, channels])
    encoded with ``audio_codec`` (aac, libopus, libmp3lame) inside the mp4."""
    from fractions import Fraction

    import av

    path = str(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    base = Fraction(1, 90000)
    if times is None:
        times = np.arange(len(frames)) / fps
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = base
        stream.options = {"crf": "18", "preset": "ultrafast"}
        if rotation:
            stream.set_display_rotation(rotation)
        astream = None
        if audio is not None:
            channels = 1 if audio.ndim == 1 else audio.shape[1]
            astream = container.add_stream(audio_codec, rate=rate)
            astream.layout = "mono" if channels == 1 else "stereo"
        for f, t in zip(frames, times):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts, frame.time_base = int(round(t / base)), base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None:
            encode_audio(container, astream, audio, rate)
    return path
