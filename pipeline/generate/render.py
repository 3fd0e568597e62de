"""Faces of generated reactions: the side-by-side face video.

``write_reaction_video`` — the speaker video beside a face animated by one generated reaction,
H.264 at 25 fps with the speaker's audio when there is one. (The trajectory plot of the
reactions is ``pipeline.plots.plot_reactions``.)

The face is drawn by ``CartoonFaceRenderer``: a 2D face in plain numpy, driven by the 25
attributes and the head pose of the 3DMM (§6 of the reference note). The reference renders
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

from pipeline.data.react import EMOTION_COLUMNS, FPS

log = logging.getLogger(__name__)

# REACT facial attributes (model.md §1.2): 15 AU occurrences, valence, arousal, 8 expressions.
AU_NAMES = EMOTION_COLUMNS[:15]
EXPRESSION_NAMES = EMOTION_COLUMNS[17:]
_AU = {name: i for i, name in enumerate(AU_NAMES)}
_EXPR = {name: 17 + i for i, name in enumerate(EXPRESSION_NAMES)}

# FaceVerse v2 coefficients (model.md §1.2/§6): 52 expression, then rotation (Euler angles about
# x, y, z = pitch, yaw, roll, radians), then translation.
ROTATION = slice(52, 55)

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


_SKIN, _OUTLINE, _BROW = (np.array(c, np.float32) for c in
                          ([0.96, 0.80, 0.66], [0.55, 0.38, 0.28], [0.30, 0.20, 0.14]))
_LIP, _MOUTH, _BLUSH = (np.array(c, np.float32) for c in
                        ([0.78, 0.33, 0.33], [0.35, 0.05, 0.08], [0.95, 0.50, 0.50]))
_EYE_WHITE, _IRIS, _BACKGROUND = (np.array(c, np.float32) for c in
                                  ([1.0, 1.0, 1.0], [0.18, 0.26, 0.34], [0.16, 0.17, 0.20]))


class CartoonFaceRenderer:
    """A 2D face drawn with numpy from the 25 attributes and the 3DMM head pose.

    What moves (AU numbers are FACS; values are the generated occurrence scores in [0, 1]):

    * head: roll rotates the whole face, yaw and pitch shift the features across it
      (3DMM rotation, coefficients 52–54, clipped to ±0.5 rad);
    * brows: AU1 raises the inner ends, AU2 the outer ends, AU4 lowers and knits them;
    * eyes: AU6/AU7 narrow them, Surprise/Fear widen them, the irises follow the head;
    * cheeks: AU6 shows as a blush;
    * mouth: AU25 (lips part) and AU26 (jaw drop) open it — plus an optional 3DMM expression
      coefficient (``jaw_coefficient``; FaceVerse v2 does not document which of its 52
      expression bases is the jaw, so none is used unless you name one); AU12 and Happy pull
      the corners up into a smile, AU15 and Sad pull them down, AU23/AU24 press the lips thin.

    Translation is not drawn: REACT videos are face crops, so the face stays centred.
    """

    def __init__(self, size: int = 256, *, jaw_coefficient: int | None = None, jaw_gain: float = 1.0):
        if size < 32:
            raise ValueError("face size must be at least 32 pixels")
        self.size = int(size)
        self.jaw_coefficient = jaw_coefficient
        self.jaw_gain = float(jaw_gain)
        axis = ((np.arange(self.size) + 0.5) / self.size * 2.0 - 1.0).astype(np.float32)
        self._x, self._y = np.meshgrid(axis, axis)  # pixel centres in [-1, 1]
        self._pixel = 2.0 / self.size

    def render(self, emotion: np.ndarray, tdmm: np.ndarray) -> Iterator[np.ndarray]:
        emotion = np.asarray(emotion, np.float32)
        tdmm = np.asarray(tdmm, np.float32)
        if len(emotion) != len(tdmm):
            raise ValueError(f"emotion has {len(emotion)} frames but tdmm has {len(tdmm)}")
        for e, c in zip(emotion, tdmm):
            yield self.frame(e, c)

    # -- one frame ---------------------------------------------------------------------------

    def frame(self, emotion: np.ndarray, tdmm: np.ndarray) -> np.ndarray:
        au = lambda name: float(np.clip(emotion[_AU[name]], 0.0, 1.0))  # noqa: E731
        ex = lambda name: float(np.clip(emotion[_EXPR[name]], 0.0, 1.0))  # noqa: E731
        pitch, yaw, roll = (float(v) for v in np.clip(np.nan_to_num(tdmm[ROTATION]), -0.5, 0.5))
        # Roll turns the face about its centre; yaw and pitch move the features across it
        # (the outline moves 30 % as far, which reads as a turn of the head).
        fx, fy = 0.35 * np.sin(yaw), 0.30 * np.sin(pitch)
        self._pose = (np.cos(roll), np.sin(roll), fx, fy)
        img = np.empty((self.size, self.size, 3), np.float32)
        img[:] = _BACKGROUND
        paint = lambda *a, **k: self._paint(img, *a, **k)  # noqa: E731

        face_w, fcx, fcy = 0.66 * (1.0 - 0.15 * abs(np.sin(yaw))), -0.7 * fx, 0.05 - 0.7 * fy
        paint(self._ellipse(fcx, fcy, face_w + 0.025, 0.845), _OUTLINE)
        paint(self._ellipse(fcx, fcy, face_w, 0.82), _SKIN)

        # Cheeks (AU6 cheek raiser).
        if au("AU6") > 0.02:
            for side in (-1, 1):
                paint(self._ellipse(side * 0.33, 0.16, 0.12, 0.07), _BLUSH, 0.6 * au("AU6"))

        # Eyes.
        openness = float(np.clip(1.0 - 0.45 * au("AU7") - 0.3 * au("AU6")
                                 + 0.5 * ex("Surprise") + 0.3 * ex("Fear"), 0.12, 1.6))
        for side in (-1, 1):
            cx, cy = side * 0.25, -0.10
            paint(self._ellipse(cx, cy, 0.135, 0.07 * openness + 0.015), _OUTLINE)
            paint(self._ellipse(cx, cy, 0.12, 0.07 * openness), _EYE_WHITE)
            eye, iris = self._ellipse(cx, cy, 0.12, 0.07 * openness), self._ellipse(
                cx + 0.05 * np.sin(yaw), cy + 0.04 * np.sin(pitch), 0.038, 0.038)
            paint((lambda x, y, e=eye[0], i=iris[0]: np.maximum(e(x, y), i(x, y)), iris[1]), _IRIS)

        # Brows: inner end up with AU1, outer end up with AU2, AU4 pulls both down and inwards.
        raise_inner, raise_outer, lower = au("AU1"), au("AU2"), au("AU4")
        for side in (-1, 1):
            inner = (side * (0.11 - 0.03 * lower), -0.27 - 0.10 * raise_inner + 0.06 * lower)
            outer = (side * 0.40, -0.25 - 0.10 * raise_outer + 0.02 * lower)
            paint(self._segment(inner, outer, 0.028), _BROW)

        # Nose, wrinkled wider by AU9.
        paint(self._segment((0.0, -0.02), (0.0, 0.17), 0.012), _OUTLINE, 0.6)
        nostril = 0.06 + 0.03 * au("AU9")
        paint(self._segment((-nostril, 0.19), (nostril, 0.19), 0.014), _OUTLINE, 0.7)

        # Mouth.
        opening = 0.10 * au("AU25") + 0.16 * au("AU26") + 0.04 * ex("Surprise")
        if self.jaw_coefficient is not None:
            opening += self.jaw_gain * max(0.0, float(tdmm[self.jaw_coefficient]))
        opening = float(np.clip(opening, 0.0, 0.30))
        smile = 0.10 * au("AU12") + 0.06 * ex("Happy") - 0.08 * au("AU15") - 0.04 * ex("Sad")
        width = 0.19 + 0.06 * au("AU12") - 0.04 * max(au("AU23"), au("AU24"))
        lip = 0.030 * (1.0 - 0.5 * max(au("AU23"), au("AU24")))
        outer, inner = self._mouth(0.0, 0.42, width, opening, smile, lip)
        paint(outer, _LIP)
        paint(inner, _MOUTH, 1.0 if opening > 0.01 else 0.8)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    # -- primitives ----------------------------------------------------------------------------
    # A primitive is (distance(x, y) in feature coordinates, negative inside; bounding disc
    # (cx, cy, radius)). Painting evaluates it only on the pixels of that disc's box, which
    # keeps a 256 px frame at a few milliseconds.

    @staticmethod
    def _ellipse(cx, cy, rx, ry):
        def distance(x, y):
            return (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0) * min(rx, ry)
        return distance, (cx, cy, max(rx, ry))

    @staticmethod
    def _segment(a, b, radius):
        (ax, ay), (bx, by) = a, b
        dx, dy = bx - ax, by - ay

        def distance(x, y):
            h = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
            return np.hypot(x - ax - h * dx, y - ay - h * dy) - radius
        return distance, ((ax + bx) / 2, (ay + by) / 2, np.hypot(dx, dy) / 2 + radius)

    @staticmethod
    def _mouth(cx, cy, width, opening, smile, lip):
        """Lips between two parabolas whose centre line bends up at the corners by ``smile``;
        returns (lips, inside) primitives. Closed lips leave a thin line where they meet."""
        def geometry(x, y):
            u = np.clip((x - cx) / width, -1.0, 1.0)
            centre = cy - smile * u ** 2 + smile * 0.3
            half = (opening / 2.0 + 0.004) * (1.0 - u ** 2)
            return u, np.abs(y - centre), half, np.abs(x - cx) - width

        def lips(x, y):
            u, dy, half, outside = geometry(x, y)
            return np.maximum(dy - half - lip * (1.0 - 0.6 * u ** 2), outside - 0.01)

        def inside(x, y):
            _, dy, half, outside = geometry(x, y)
            return np.maximum(dy - (half if opening > 0.01 else 0.006), outside)
        disc = (cx, cy, width + abs(smile) + opening + lip + 0.02)
        return (lips, disc), (inside, disc)

    def _paint(self, img, primitive, colour, opacity: float = 1.0) -> None:
        distance, (cx, cy, radius) = primitive
        c, s, fx, fy = self._pose
        # feature point -> image point: undo the feature shift, then rotate by the roll.
        px, py = cx + fx, cy + fy - 0.05
        ix, iy = c * px - s * py, s * px + c * py + 0.05
        to_pixel = lambda v: (v + 1.0) / self._pixel - 0.5  # noqa: E731
        margin = radius + 2 * self._pixel
        r0, r1 = max(0, int(to_pixel(iy - margin))), min(self.size, int(to_pixel(iy + margin)) + 2)
        c0, c1 = max(0, int(to_pixel(ix - margin))), min(self.size, int(to_pixel(ix + margin)) + 2)
        if r0 >= r1 or c0 >= c1:
            return
        gx, gy = self._x[r0:r1, c0:c1], self._y[r0:r1, c0:c1] - 0.05
        x = c * gx + s * gy - fx
        y = -s * gx + c * gy + 0.05 - fy
        alpha = np.clip(0.5 - distance(x, y) / self._pixel, 0.0, 1.0) * opacity
        patch = img[r0:r1, c0:c1]
        patch += alpha[..., None] * (colour - patch)


# --------------------------------------------------------------------------------------------
# Side-by-side video
# --------------------------------------------------------------------------------------------

CAPTION_HEIGHT = 24


def _caption(width: int, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    bar = Image.new("RGB", (width, CAPTION_HEIGHT), (24, 24, 28))
    ImageDraw.Draw(bar).text((6, 5), text, fill=(230, 230, 230))
    return np.asarray(bar)


def speaker_frames(video: str, size: int) -> Iterator[np.ndarray]:
    """The speaker's frames as uint8 [size, size, 3]: scaled to ``size`` high, centre-cropped
    or padded to square. Reads local paths and URIs (the file is fetched once)."""
    import av

    from pipeline import storage

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


def write_reaction_video(out_path: str, speaker_video: str, emotion: np.ndarray, tdmm: np.ndarray, *,
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
