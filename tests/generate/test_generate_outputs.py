"""The REACT files, the plot and the face video, without a model (fast, no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline import plots
from pipeline.data import react
from pipeline.generate import render
from pipeline.generate.job import GenerationError, attributes_csv, clean_emotion, pad_frames
from tests.helpers.media import write_speaker_mp4


def raw_reactions(k=3, t=40, seed=0) -> np.ndarray:
    """Unconstrained network-like output: AUs outside [0, 1], negative 'probabilities'."""
    return np.random.default_rng(seed).normal(0.0, 0.8, size=(k, t, 25)).astype(np.float32)


def test_clean_emotion_makes_valid_react_attributes():
    raw = raw_reactions()
    raw[0, 0, 17:] = -1.0                                   # no positive expression at all
    clean, fixes = clean_emotion(raw)
    aus, va, expr = clean[..., :15], clean[..., 15:17], clean[..., 17:]
    assert aus.min() >= 0.0 and aus.max() <= 1.0
    assert va.min() >= -1.0 and va.max() <= 1.0
    assert expr.min() >= 0.0
    np.testing.assert_allclose(expr.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(expr[0, 0], 1 / 8)           # uniform when nothing was positive
    assert fixes["expression_frames_uniform"] == int((raw[..., 17:] <= 0).all(-1).sum()) >= 1
    assert fixes["au_clipped"] > 0 and fixes["va_clipped"] > 0
    inside = (raw[..., :15] > 0) & (raw[..., :15] < 1)       # values already valid are kept
    np.testing.assert_array_equal(aus[inside], raw[..., :15][inside])
    positive = raw[1, 5, 17:].clip(0)
    np.testing.assert_allclose(expr[1, 5], positive / positive.sum(), rtol=1e-6)


def test_binarize_rounds_aus_at_one_half():
    clean, _ = clean_emotion(raw_reactions(), binarize=True)
    assert set(np.unique(clean[..., :15]).tolist()) == {0.0, 1.0}
    raw = raw_reactions()
    np.testing.assert_array_equal(clean[..., :15], (np.clip(raw[..., :15], 0, 1) >= 0.5).astype(np.float32))


def test_clean_emotion_rejects_nan():
    raw = raw_reactions()
    raw[0, 3, 4] = np.nan
    with pytest.raises(GenerationError, match="NaN"):
        clean_emotion(raw)


def test_pad_frames_repeats_the_last_generated_frame():
    x = np.arange(2 * 750 * 3, dtype=np.float32).reshape(2, 750, 3)
    y = pad_frames(x, 751)
    assert y.shape == (2, 751, 3)
    np.testing.assert_array_equal(y[:, :750], x)
    np.testing.assert_array_equal(y[:, 750], x[:, 749])
    assert pad_frames(x, 700).shape == (2, 700, 3)


def test_attributes_csv_reads_back_with_the_official_header(tmp_path):
    clean, _ = clean_emotion(raw_reactions(k=1, t=751))
    text = attributes_csv(clean[0])
    assert text.splitlines()[0].split(",") == list(react.EMOTION_COLUMNS)
    assert text.splitlines()[0].startswith("AU1,AU2,AU4") and text.splitlines()[0].endswith("Anger,Contempt")
    path = tmp_path / "r.csv"
    path.write_text(text)
    back = react.read_emotion(str(path))                     # the dataset reader accepts it
    assert back.shape == (751, 25)
    np.testing.assert_allclose(back, clean[0], atol=1e-6)
    binary = attributes_csv(clean_emotion(raw_reactions(k=1), binarize=True)[0][0], binarized=True)
    assert set(binary.splitlines()[1].split(",")[:15]) <= {"0", "1"}


# --------------------------------------------------------------------------------------------
# The face and the pictures


def one_frame(**values) -> tuple[np.ndarray, np.ndarray]:
    e = np.zeros(25, np.float32)
    e[17] = 1.0
    names = list(react.EMOTION_COLUMNS)
    for name, v in values.items():
        e[names.index(name)] = v
    return e, np.zeros(58, np.float32)


def test_cartoon_face_moves_with_the_attributes_and_the_head_pose():
    face = render.CartoonFaceRenderer(128)
    neutral = face.frame(*one_frame())
    assert neutral.shape == (128, 128, 3) and neutral.dtype == np.uint8
    mouth = (slice(80, 118), slice(34, 94))
    for change in ({"AU25": 1.0, "AU26": 1.0}, {"AU12": 1.0, "Happy": 1.0}, {"AU15": 1.0}):
        img = face.frame(*one_frame(**change))
        assert np.abs(img[mouth].astype(int) - neutral[mouth]).mean() > 2, change
    brows = (slice(20, 55), slice(10, 118))
    raised = face.frame(*one_frame(AU1=1.0, AU2=1.0))
    assert np.abs(raised[brows].astype(int) - neutral[brows]).mean() > 1
    e, c = one_frame()
    c[52:55] = [0.0, 0.0, 0.4]                                # roll
    assert np.abs(face.frame(e, c).astype(int) - neutral).mean() > 3
    frames = list(face.render(np.stack([e, e]), np.stack([c, c])))
    assert len(frames) == 2


class StripesRenderer:
    """A stand-in for a user-supplied FaceVerse renderer: brightness follows AU12."""

    def __init__(self, size: int = 64):
        self.size = size

    def render(self, emotion, tdmm):
        for e in emotion:
            yield np.full((self.size, self.size, 3), int(255 * np.clip(e[7], 0, 1)), np.uint8)


def test_renderer_seam_loads_a_user_factory_and_rejects_bad_specs():
    r = render.load_renderer(f"{__name__}:StripesRenderer", size=64)
    assert isinstance(r, StripesRenderer) and r.size == 64
    assert isinstance(render.load_renderer(None), render.CartoonFaceRenderer)
    with pytest.raises(ValueError, match="module:Factory|package.module:Factory"):
        render.load_renderer("no_colon_here")
    with pytest.raises(ValueError, match="cannot load renderer"):
        render.load_renderer("no_such_module_xyz:Thing")


def decode_frames(path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_reaction_video_is_speaker_beside_face_with_sound(tmp_path):
    speaker = tmp_path / "speaker.mp4"
    write_speaker_mp4(speaker, frames=30)
    emotion = np.zeros((40, 25), np.float32)
    emotion[:, 7] = np.linspace(0, 1, 40)                     # AU12 ramps up
    tdmm = np.zeros((40, 58), np.float32)
    out = tmp_path / "r.mp4"
    audio = (0.2 * np.sin(np.linspace(0, 2000, 16000 * 2)).astype(np.float32), 16000)
    n = render.write_reaction_video(str(out), str(speaker), emotion, tdmm,
                                    renderer=StripesRenderer(64), audio=audio)
    assert n == 40
    info = render.video_summary(str(out))
    assert info == {"frames": 40, "width": 128, "height": 64 + render.CAPTION_HEIGHT, "fps": 25.0, "audio": True}
    frames = decode_frames(out).astype(float)
    face = frames[:, 8:56, 72:120].mean(axis=(1, 2, 3))      # the renderer's half follows AU12
    assert face[-1] - face[0] > 150
    speaker_half = frames[:, 8:56, 8:56, 1].mean(axis=(1, 2))
    assert speaker_half[29] == pytest.approx(speaker_half[39], abs=2)   # last speaker frame held


def test_reaction_plot_png_is_a_real_picture():
    from PIL import Image

    raw = raw_reactions(k=4, t=100)
    clean, _ = clean_emotion(raw)
    for speaker in (None, clean[0]):
        png = plots.reaction_plot_png(clean, speaker, title="test")
        img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
        assert img.shape[0] > 600 and img.shape[1] > 1000
        assert img.std() > 20                                # not a blank canvas
    with_speaker = Image.open(io.BytesIO(plots.reaction_plot_png(clean, clean[0])))
    without = Image.open(io.BytesIO(plots.reaction_plot_png(clean, None)))
    assert with_speaker.size[1] > without.size[1]            # the speaker panel is there
