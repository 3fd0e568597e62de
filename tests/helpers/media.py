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
            step = 1024
            pts = 0
            for start in range(0, len(audio), step):
                chunk = audio[start:start + step].astype(np.float32)[None]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, pts
                pts += chunk.shape[1]
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return path


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
