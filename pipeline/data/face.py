"""One cartoon face, drawn with numpy masks: the faces of synthetic REACT data and of generated
reactions.

The face follows eight face parameters (``FACE_PARAMETERS``): mouth opening [0, 1], smile,
brow raise and frown [-1, 1], eye openness [0.05, 1.5] and the head's yaw, pitch and roll
(radians). Synthetic data draws its behaviour latent directly (``pipeline.data.behaviour.LATENT``
names the same eight); generation maps the 25 REACT attributes and the 3DMM head pose onto them
with :func:`face_parameters`, so a generated smile is drawn by the same code as a synthetic one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipeline.data.react import EMOTION_COLUMNS

FACE_PARAMETERS = ("mouth", "smile", "brow", "frown", "eyes", "yaw", "pitch", "roll")

@dataclass(frozen=True)
class Look:
    """A person's appearance."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    shirt: tuple[float, float, float]
    background: tuple[float, float, float]
    iris: tuple[float, float, float]
    width: float
    height: float
    eye_gap: float


_SKINS = ((241, 194, 167), (224, 172, 140), (198, 134, 103), (161, 102, 77), (120, 80, 60), (233, 185, 150))
_HAIRS = ((40, 30, 25), (90, 60, 35), (20, 20, 20), (150, 110, 60), (200, 170, 110), (110, 110, 110))
_IRISES = ((70, 50, 30), (60, 90, 140), (70, 110, 70), (40, 30, 20))


def random_look(rng: np.random.Generator) -> Look:
    def jitter(c, s=12):
        return tuple(float(v) for v in np.clip(np.asarray(c) + rng.normal(0, s, 3), 0, 255))

    return Look(
        skin=jitter(_SKINS[rng.integers(len(_SKINS))], 8),
        hair=jitter(_HAIRS[rng.integers(len(_HAIRS))], 8),
        shirt=tuple(float(v) for v in rng.uniform(30, 220, 3)),
        background=tuple(float(v) for v in rng.uniform(90, 200, 3)),
        iris=jitter(_IRISES[rng.integers(len(_IRISES))], 6),
        width=float(rng.uniform(0.92, 1.06)), height=float(rng.uniform(0.95, 1.05)),
        eye_gap=float(rng.uniform(0.92, 1.08)),
    )


# The face of generated reactions: one fixed person, so that only the reaction changes.
NEUTRAL_LOOK = Look(skin=(233.0, 185.0, 150.0), hair=(90.0, 60.0, 35.0), shirt=(70.0, 90.0, 140.0),
                    background=(70.0, 74.0, 84.0), iris=(60.0, 90.0, 140.0), width=1.0, height=1.0,
                    eye_gap=1.0)


def _fill(region: np.ndarray, mask: np.ndarray, colour) -> None:
    """Paint ``colour`` where ``mask``; per channel, which is several times faster than region[mask] = c."""
    for ch in range(3):
        np.copyto(region[..., ch], colour[ch], where=mask, casting="unsafe")


class CartoonFace:
    """Draws a cartoon face (numpy masks, no per-pixel Python) following the face parameters.

    Coordinates: (u, v) are face-local pixels (u right, v down) after the head's roll; yaw and
    pitch move the head and shift the features (nose most, brows least) for a 3-D impression.
    Small features are painted inside their bounding boxes only, which keeps a frame at ~2 ms.
    """

    def __init__(self, look: Look = NEUTRAL_LOOK, size: int = 256):
        if size < 32:
            raise ValueError("face size must be at least 32 pixels")
        self.look, self.size = look, int(size)
        self.scale = size / 256
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.xx, self.yy = xx, yy
        gradient = np.linspace(1.1, 0.8, size, dtype=np.float32)[:, None, None]
        self.background = np.clip(np.asarray(look.background, np.float32) * gradient, 0, 255
                                  ).astype(np.uint8) * np.ones((1, size, 1), np.uint8)
        self.skin = np.asarray(look.skin, np.float32)

    def _box(self, fu, fv, hw, hh, c, s, cx, cy):
        """Slices of the image around face-local point (fu, fv) of half-size (hw, hh)."""
        k = self.scale
        ix, iy = cx + (fu * c - fv * s) * k, cy + (fu * s + fv * c) * k
        rw, rh = (hw * abs(c) + hh * abs(s)) * k + 2, (hw * abs(s) + hh * abs(c)) * k + 2
        y0, y1 = max(0, int(iy - rh)), min(self.size, int(iy + rh) + 1)
        x0, x1 = max(0, int(ix - rw)), min(self.size, int(ix + rw) + 1)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def frame(self, z: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 for one vector of the eight FACE_PARAMETERS."""
        look, k, size = self.look, self.scale, self.size
        mouth, smile, brow, frown, eyes, yaw, pitch, roll = (float(v) for v in z)
        img = self.background.copy()
        cx, cy = size / 2 + 70 * k * yaw, size * 0.53 + 60 * k * pitch
        c, s = math.cos(roll), math.sin(roll)
        dx, dy = (self.xx - cx) * (1 / k), (self.yy - cy) * (1 / k)
        u, v = dx * c + dy * s, dy * c - dx * s
        a = 74 * look.width * (1 - 0.12 * abs(yaw))
        b = 96 * look.height

        low = slice(max(0, min(size, int(cy + 30 * k))), size)      # rows below the chin
        ul, vl = u[low], v[low]
        _fill(img[low], (ul / 115) ** 2 + ((vl - 200) / 90) ** 2 <= 1, look.shirt)         # shoulders
        _fill(img[low], (np.abs(ul) <= 30) & (vl >= 40) & (vl <= 125), self.skin * 0.8)   # neck
        hair = (u / (a + 8)) ** 2 + ((v + 12) / (b * 0.97)) ** 2 <= 1
        _fill(img, hair, look.hair)
        for side in (-1, 1):                                                              # ears
            ys, xs = self._box(side * a, 2, 10, 17, c, s, cx, cy)
            uw, vw = u[ys, xs], v[ys, xs]
            _fill(img[ys, xs], ((uw - side * a) / 9) ** 2 + ((vw - 2) / 16) ** 2 <= 1, self.skin * 0.9)
        e = (u / a) ** 2 + (v / b) ** 2                                                   # face, shaded
        face = e <= 1
        shade = 1.0 - 0.25 * e - (0.06 / a) * u
        for ch in range(3):
            np.copyto(img[..., ch], shade * self.skin[ch], where=face, casting="unsafe")
        ys, xs = self._box(0, -0.75 * b, a, 0.3 * b, c, s, cx, cy)                        # fringe
        uw, vw = u[ys, xs], v[ys, xs]
        _fill(img[ys, xs], face[ys, xs] & hair[ys, xs] & (vw < -0.62 * b + 7 * np.sin(uw / 7.0 + 1.0)),
              look.hair)

        if smile > 0.15:                                                                  # cheeks
            for side in (-1, 1):
                ys, xs = self._box(side * 42 + 20 * yaw, 22, 14, 12, c, s, cx, cy)
                uw, vw = u[ys, xs], v[ys, xs]
                m = ((uw - side * 42 - 20 * yaw) / 13) ** 2 + ((vw - 22) / 10) ** 2 <= 1
                region = img[ys, xs]
                region[m] = (0.75 * region[m] + 0.25 * np.array([230, 90, 90])).astype(np.uint8)

        eye_h = max(0.6, 8.5 * eyes * (1 - 0.3 * max(smile, 0)) * (1 + 0.25 * max(brow, 0)))
        for side in (-1, 1):
            eu, ev = side * 28 * look.eye_gap + 20 * yaw, -14.0
            ys, xs = self._box(eu, ev, 16, 12, c, s, cx, cy)                             # eye
            region = img[ys, xs]
            du, dv = u[ys, xs] - eu, v[ys, xs] - ev
            sclera = (du / 13) ** 2 + (dv / eye_h) ** 2 <= 1
            iris_d = (du - 4 * yaw) ** 2 + dv ** 2
            _fill(region, (du / 14.5) ** 2 + (dv / (eye_h + 1.8)) ** 2 <= 1, self.skin * 0.45)  # lid
            _fill(region, sclera, (245, 245, 240))
            _fill(region, sclera & (iris_d <= 36), look.iris)
            _fill(region, sclera & (iris_d <= 7), (15, 15, 15))

            bu, bv = side * 28 * look.eye_gap + 18 * yaw, -34 - 9 * brow                # brow
            slope = -side * 0.35 * frown         # frowning lowers the inner ends
            ys, xs = self._box(bu, bv, 17, 10, c, s, cx, cy)
            uw, vw = u[ys, xs], v[ys, xs]
            q = (uw - bu) / 15
            _fill(img[ys, xs], (np.abs(q) <= 1) & (np.abs(vw - bv - slope * (uw - bu)) <= 3.4 - 1.6 * q * q),
                  np.asarray(look.hair) * 0.8)

        nu = 26 * yaw                                                                     # nose
        ys, xs = self._box(nu, 12, 8, 13, c, s, cx, cy)
        uw, vw = u[ys, xs], v[ys, xs]
        _fill(img[ys, xs], ((uw - nu) / 5.5) ** 2 + ((vw - 12) / 11) ** 2 <= 1, self.skin * 0.88)

        mu, mv = 20 * yaw, 46.0                                                           # mouth
        w, h = 20 + 7 * smile, 1.0 + 14 * mouth
        ys, xs = self._box(mu, mv, w + 4, h + 12, c, s, cx, cy)
        uw, vw = u[ys, xs], v[ys, xs]
        q = (uw - mu) / w
        inside = np.abs(q) <= 1
        profile = np.sqrt(np.clip(1 - q * q, 0, 1))
        centre = mv - 7 * smile * q * q          # smiling lifts the corners
        dist = np.abs(vw - centre)
        region = img[ys, xs]
        _fill(region, inside & (dist <= h * profile + 3.2 * np.sqrt(profile)), (170, 60, 70))  # lips
        opening = inside & (dist <= h * profile) & (np.abs(q) <= 0.95)
        _fill(region, opening, (60, 15, 20))
        if h > 4:
            _fill(region, opening & (vw - centre < -h * profile + 0.3 * h), (235, 235, 225))  # teeth
        return img

    def frames(self, z: np.ndarray) -> Iterator[np.ndarray]:
        """One frame per row of ``z`` [T, 8]."""
        for row in z:
            yield self.frame(row)


# REACT attributes (model.md §1.2): 15 AU occurrences, valence, arousal, 8 expression probabilities.
_ATTRIBUTE = {name: i for i, name in enumerate(EMOTION_COLUMNS)}
# FaceVerse v2 coefficients (model.md §1.2/§6): 52 expression, then rotation (Euler angles about
# x, y, z = pitch, yaw, roll, radians), then translation.
ROTATION = slice(52, 55)


def face_parameters(emotion: np.ndarray, tdmm: np.ndarray, *, jaw_coefficient: int | None = None,
                    jaw_gain: float = 1.0) -> np.ndarray:
    """[T, 25] REACT attributes + [T, 58] absolute 3DMM → [T, 8] FACE_PARAMETERS.

    AU numbers are FACS, values the occurrence scores in [0, 1]: AU25 (lips part) and AU26 (jaw
    drop) open the mouth, plus an optional 3DMM expression coefficient (``jaw_coefficient``:
    FaceVerse v2 does not document which of its 52 bases is the jaw, so none is used unless you
    name one); AU12 and Happy pull the corners up, AU15 and Sad down; AU1/AU2 raise the brows;
    AU4 (and Angry) knit them; AU6/AU7 narrow the eyes, Surprise/Fear widen them; the 3DMM
    rotation (clipped to ±0.5 rad) turns the head. Translation is not drawn: REACT videos are
    face crops, so the face stays centred.
    """
    e = np.clip(np.nan_to_num(np.asarray(emotion, np.float32)), 0.0, 1.0)
    a = lambda name: e[:, _ATTRIBUTE[name]]  # noqa: E731
    z = np.zeros((len(e), len(FACE_PARAMETERS)), np.float32)
    mouth = 0.45 * a("AU25") + 0.55 * a("AU26") + 0.2 * a("Surprise")
    if jaw_coefficient is not None:
        mouth = mouth + jaw_gain * np.maximum(0.0, np.asarray(tdmm, np.float32)[:, jaw_coefficient])
    z[:, 0] = np.clip(mouth, 0.0, 1.0)
    z[:, 1] = np.clip(0.7 * a("AU12") + 0.4 * a("Happy") - 1.0 * a("AU15") - 0.4 * a("Sad"), -1.0, 1.0)
    z[:, 2] = np.clip(0.6 * a("AU1") + 0.6 * a("AU2") + 0.3 * a("Surprise") - 0.3 * a("AU4"), -1.0, 1.0)
    z[:, 3] = np.clip(0.9 * a("AU4") + 0.4 * a("Anger"), -1.0, 1.0)
    z[:, 4] = np.clip(1.0 - 0.45 * a("AU7") - 0.3 * a("AU6") + 0.4 * a("Surprise") + 0.3 * a("Fear"), 0.05, 1.5)
    pitch, yaw, roll = np.clip(np.nan_to_num(np.asarray(tdmm, np.float32)[:, ROTATION]), -0.5, 0.5).T
    z[:, 5], z[:, 6], z[:, 7] = yaw, pitch, roll
    return z
