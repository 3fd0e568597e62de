"""Tiny media files and models for the extraction tests (written with PyAV, soundfile, Pillow, torch)."""

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


# ---------------------------------------------------------------------------------------------
# Tiny networks going through the real loaders


def save_tiny_torchscript(path: str | os.PathLike, width: int = 8, seed: int = 0) -> str:
    """A per-frame TorchScript network: [n, 3, 224, 224] -> [n, width] (conv, pool, linear)."""
    import torch

    torch.manual_seed(seed)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
            self.fc = torch.nn.Linear(4 * 4 * 4, width)

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
            return self.fc(x.flatten(1))

    scripted = torch.jit.script(Tiny().eval())
    scripted.save(str(path))
    return str(path)


TINY_WAV2VEC2 = dict(
    extractor_mode="group_norm",
    # The base model's strides (5 x 2^6 = 320 samples = 20 ms at 16 kHz) with few channels.
    extractor_conv_layer_config=[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2,
    extractor_conv_bias=False, encoder_embed_dim=32, encoder_projection_dropout=0.0,
    encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=1, encoder_num_heads=2,
    encoder_attention_dropout=0.0, encoder_ff_interm_features=64, encoder_ff_interm_dropout=0.0,
    encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
)


def tiny_wav2vec2(seed: int = 0):
    import torch
    import torchaudio

    torch.manual_seed(seed)
    return torchaudio.models.wav2vec2_model(**TINY_WAV2VEC2, aux_num_out=None).eval()


def save_tiny_wav2vec2(path: str | os.PathLike, seed: int = 0) -> str:
    """A randomly initialised small wav2vec2 as {"config", "state_dict"} (torch.save, weights only)."""
    import torch

    model = tiny_wav2vec2(seed)
    torch.save({"config": {k: (list(v) if isinstance(v, list) else v) for k, v in TINY_WAV2VEC2.items()},
                "state_dict": model.state_dict()}, str(path))
    return str(path)


def copy_dataset(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)
