"""Small synthetic REACT datasets shared by the data tests (generated once per session; read-only:
a test that breaks a layout copies it first with ``copy_dataset``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import synth
from pipeline.data.react import EMOTION_COLUMNS
from tests.helpers import media

SMALL = dict(dyads=(2, 1, 1), frames=60, seed=0)


@pytest.fixture(scope="session")
def synth_2024(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    root = tmp_path_factory.mktemp("react2024") / "data"
    return root, synth.generate(str(root), release="2024", **SMALL)


@pytest.fixture(scope="session")
def synth_2023(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    root = tmp_path_factory.mktemp("react2023") / "data"
    return root, synth.generate(str(root), release="2023", **SMALL)


@pytest.fixture
def copy_dataset(tmp_path):
    """copy_dataset(src) -> a private copy under tmp_path that the test may break."""
    return lambda src: media.copy_dataset(src, tmp_path / "copy")


@pytest.fixture
def write_layout():
    """write_layout(root, {split: [(speaker, listener), ...]}, emotion_roles=..., video=..., frames=...)."""
    return _write_layout


def _write_layout(root: Path, splits: dict[str, list[tuple[str, str]]], *, emotion_roles: str = "P1/P2",
                 video: str = "mp4", frames: int = 5) -> None:
    """A hand-made layout: real csv/npy label files, placeholder media (listing tests only)."""
    from pipeline.data.react import emotion_clip_path

    for split, rows in splits.items():
        (root / f"{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.csv").write_text(
            "idx,speaker_path,listener_path\n" + "".join(f"{i},{s},{l}\n" for i, (s, l) in enumerate(rows)))
        for clip in [c for row in rows for c in row]:
            base = root / split
            if video == "mp4":
                _touch(base / "Video_files" / f"{clip}.mp4", b"not really an mp4")
            else:
                for n in range(1, frames + 1):
                    _touch(base / "Video_files" / clip / f"{n}.png", b"png")
            _touch(base / "Audio_files" / f"{clip}.wav", b"RIFF")
            emotion = emotion_clip_path(clip) if emotion_roles == "P1/P2" else clip
            _touch(base / "Emotion" / f"{emotion}.csv",
                   (",".join(EMOTION_COLUMNS) + "\n" + "0,1,0,0,0,0,0,1,0,0,0,0,0,1,0,0.5,-0.5,"
                    "0.3,0.2,0.1,0.1,0.1,0.1,0.05,0.05\n" * frames).encode())
            path = base / "3D_FV_files" / f"{clip}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.zeros((frames, 58), np.float32))


def _touch(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
