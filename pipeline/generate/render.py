"""Faces of generated reactions: the side-by-side face video.

``write_reaction_video`` — the speaker video beside a face animated by one generated reaction,
H.264 at 25 fps with the speaker's audio when there is one. (The trajectory plot of the
reactions is ``pipeline.plots.plot_reactions``.)

The face is drawn by ``CartoonFaceRenderer``: the 2D numpy face of ``pipeline.data.face`` (the
one synthetic data is drawn with), driven by the 25 attributes and the head pose of the 3DMM
(§6 of the reference note). The reference renders
FaceVerse v2 meshes and PIRender frames; their assets are licensed and not shipped, so the
renderer is a seam: anything with ``size`` and ``render(emotion, tdmm) -> frames`` can replace
the cartoon (``load_renderer("my_pkg.faceverse:FaceVerseRenderer")``).
"""

from __future__ import annotations

import importlib
import io
import logging
from fractions import Fraction
from typing import Iterable, Iterator, Protocol, runtime_checkable

import numpy as np

from pipeline.data.face import NEUTRAL_LOOK, CartoonFace, Look, face_parameters
from pipeline.data.react import FPS

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Faces: the renderer seam and the numpy cartoon
# --------------------------------------------------------------------------------------------

@runtime_checkable
class FaceRenderer(Protocol):
    """Turns one reaction into face images; the seam where a FaceVerse/PIRender renderer plugs in.

    ``emotion`` is [T, 25] (REACT attributes), ``tdmm`` is [T, 58] *absolute* FaceVerse v2
    coefficients (the generator has already added ``mean_face`` back). ``render`` yields T
    uint8 RGB frames of shape [size, size, 3].

    A FaceVerse renderer would take the expression (0–51), rotation (52–54) and translation
    (55–57) coefficients with the identity of ``reference_full.npy`` and rasterise the mesh
    (model.md §6); a PIRender one would warp a reference portrait with 27-frame windows of
    ``tdmm``. Point ``--renderer`` at its factory: ``load_renderer("pkg.module:Factory")``.
    """

    size: int

    def render(self, emotion: np.ndarray, tdmm: np.ndarray) -> Iterator[np.ndarray]: ...


def load_renderer(spec: str | None = None, *, size: int = 256) -> FaceRenderer:
    """``None``/``"cartoon"`` → the built-in 2D face; ``"module:attr"`` → ``attr(size=size)``."""
    if spec in (None, "", "cartoon"):
        return CartoonFaceRenderer(size=size)
    if ":" not in spec:
        raise ValueError(f"renderer {spec!r} must be 'cartoon' or 'package.module:Factory'")
    module_name, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load renderer {spec!r}: {exc}") from None
    renderer = factory(size=size)
    if not isinstance(renderer, FaceRenderer):
        raise ValueError(f"renderer {spec!r} has no size/render(emotion, tdmm) (see pipeline.generate.render.FaceRenderer)")
    return renderer


class CartoonFaceRenderer:
    """The built-in face: ``pipeline.data.face.CartoonFace`` (the face synthetic data is drawn
    with) driven by the 25 attributes and the 3DMM head pose through ``face_parameters``; see
    there which attribute moves what. ``jaw_coefficient``/``jaw_gain``: an optional 3DMM
    expression coefficient that also opens the mouth."""

    def __init__(self, size: int = 256, *, jaw_coefficient: int | None = None, jaw_gain: float = 1.0,
                 look: Look = NEUTRAL_LOOK):
        self.face = CartoonFace(look, size)
        self.size = self.face.size
        self.jaw_coefficient, self.jaw_gain = jaw_coefficient, float(jaw_gain)

    def render(self, emotion: np.ndarray, tdmm: np.ndarray) -> Iterator[np.ndarray]:
        if len(emotion) != len(tdmm):
            raise ValueError(f"emotion has {len(emotion)} frames but tdmm has {len(tdmm)}")
        yield from self.face.frames(face_parameters(emotion, tdmm, jaw_coefficient=self.jaw_coefficient,
                                                    jaw_gain=self.jaw_gain))

    def frame(self, emotion: np.ndarray, tdmm: np.ndarray) -> np.ndarray:
        """One [size, size, 3] uint8 frame for one frame's attributes [25] and 3DMM [58]."""
        return next(self.render(np.asarray(emotion)[None], np.asarray(tdmm)[None]))


# --------------------------------------------------------------------------------------------
# Side-by-side video
# --------------------------------------------------------------------------------------------

CAPTION_HEIGHT = 24


def _caption(width: int, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    bar = Image.new("RGB", (width, CAPTION_HEIGHT), (24, 24, 28))
    ImageDraw.Draw(bar).text((6, 5), text, fill=(230, 230, 230))
    return np.asarray(bar)


def speaker_frames(video: str | Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The speaker's frames as uint8 [size, size, 3]: scaled to ``size`` high, centre-cropped
    or padded to square. ``video``: a file, local or a URI (fetched once), decoded as it is; or
    frames already read (``pipeline.generate.job.speaker_video_frames``: 25 fps, face-cropped)."""
    import av

    from pipeline import storage

    if not isinstance(video, str):
        import cv2

        for rgb in video:
            h, w = rgb.shape[:2]
            side = min(h, w)
            square = rgb[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
            yield cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=cv2.INTER_AREA)
        return

    source = video if not storage.is_remote(video) else io.BytesIO(storage.read_bytes(video))
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            w = max(2, round(frame.width * size / frame.height))
            rgb = frame.reformat(width=w, height=size, format="rgb24").to_ndarray()
            if w >= size:
                left = (w - size) // 2
                yield rgb[:, left:left + size]
            else:
                pad = np.zeros((size, size, 3), np.uint8)
                pad[:, (size - w) // 2:(size - w) // 2 + w] = rgb
                yield pad


def write_reaction_video(out_path: str, speaker_video: str | Iterable[np.ndarray], emotion: np.ndarray, tdmm: np.ndarray, *,
                         renderer: FaceRenderer | None = None, audio: tuple[np.ndarray, int] | None = None,
                         fps: int = FPS, caption: str = "generated reaction", crf: int = 23) -> int:
    """Speaker video | animated face, H.264 (yuv420p) at ``fps``; returns the frame count.

    ``emotion`` [T, 25] and ``tdmm`` [T, 58] (absolute) drive the face; the video has T frames
    (the speaker's last frame is held if the speaker video is shorter). ``audio`` =
    (samples [n] or [n, channels] float, sample rate) is muxed as AAC, cut to the video length.
    ``out_path`` is a local path (PyAV writes files); upload it with pipeline.storage if needed.
    """
    import av

    renderer = renderer or CartoonFaceRenderer()
    size = renderer.size
    total = len(emotion)
    width, height = 2 * size, size + CAPTION_HEIGHT
    width, height = width + width % 2, height + height % 2  # yuv420p needs even sides

    with av.open(out_path, mode="w", format="mp4") as out:
        vstream = out.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.options = {"crf": str(crf), "preset": "veryfast"}
        astream = None
        if audio is not None:
            samples, rate = audio
            astream = out.add_stream("aac", rate=int(rate))
            astream.layout = "mono"

        speaker = speaker_frames(speaker_video, size)
        last = np.zeros((size, size, 3), np.uint8)
        canvas = np.zeros((height, width, 3), np.uint8)
        written = 0
        try:
            for i, face in enumerate(renderer.render(emotion, tdmm)):
                last = next(speaker, last)      # hold the speaker's last frame if it ends first
                canvas[:size, :size] = last
                canvas[:size, size:2 * size] = face
                canvas[size:size + CAPTION_HEIGHT] = _caption(width, f"speaker  |  {caption}   "
                                                                     f"t={i / fps:5.2f}s")[:, :width]
                frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
                frame.pts = i
                for packet in vstream.encode(frame):
                    out.mux(packet)
                written += 1
        finally:
            speaker.close()                     # closes the speaker's container now, not at GC
        for packet in vstream.encode():
            out.mux(packet)
        if astream is not None:
            _encode_audio(out, astream, audio[0], int(audio[1]), written / fps)
    return written


def _encode_audio(out, stream, samples: np.ndarray, rate: int, seconds: float) -> None:
    """Mono float audio → AAC frames of the encoder's frame size (AudioFifo re-chunks)."""
    import av

    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    samples = np.clip(samples[: int(round(seconds * rate))], -1.0, 1.0)
    fifo = av.AudioFifo()
    frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
    frame.sample_rate = rate
    frame.pts = 0
    fifo.write(frame)
    chunk = stream.codec_context.frame_size or 1024
    for piece in _drain(fifo, chunk):
        for packet in stream.encode(piece):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def _drain(fifo, chunk: int) -> Iterable:
    while fifo.samples >= chunk:
        yield fifo.read(chunk)
    rest = fifo.read()
    if rest is not None and rest.samples:
        yield rest


def video_summary(path: str) -> dict[str, float]:
    """Frame count, size, fps and whether there is audio (for logs and tests)."""
    import av

    with av.open(path) as container:
        v = container.streams.video[0]
        frames = sum(1 for _ in container.decode(v))
        return {"frames": frames, "width": v.codec_context.width, "height": v.codec_context.height,
                "fps": float(v.average_rate or Fraction(FPS)), "audio": bool(container.streams.audio)}
