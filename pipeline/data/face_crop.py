"""The speaker's face in an ordinary recording: detected, tracked, and cropped like REACT's videos.

REACT's videos are already face crops (256x256, the face filling most of the frame); a webcam or
phone recording has the face somewhere in a larger frame, moving. This module turns such a frame
sequence into the same kind of crop, one square box per (25 fps) frame:

1. **detect** on every ``detect_every``-th frame with OpenCV's Haar cascades, which ship inside the
   opencv-python-headless wheel (``cv2.data``: no weight download, BSD-3 licence, a few ms per
   downscaled frame on one core): the frontal cascade, then the profile cascade on the frame and
   its mirror image (the profile cascade only knows faces turned one way). docs/generation.md
   says why this detector;
2. **track**: of several faces, the one nearest the previous pick (the first pick: the largest);
   detections that jump far from their neighbours' median are dropped as false positives, and the
   box is interpolated linearly between the detections kept (held at the ends);
3. **smooth** the box centre and size over ``smooth_s`` seconds (a centred moving average) so the
   detector's frame-to-frame jitter does not shake the crop;
4. **crop** a square of ``(1 + 2 margin)`` face widths around the face (kept inside the frame),
   resized to ``size`` (256, REACT's frame size: the extractors then take their usual
   Resize(256)/CenterCrop(224) of it).

A user who knows where the face is passes a fixed box instead (``--face-box x,y,w,h``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pipeline.data import media

CASCADES = ("haarcascade_frontalface_alt2.xml", "haarcascade_profileface.xml")
DETECT_WIDTH = 320        # frames are searched at this width: ~4x faster than 640, faces >= ~30 px found
SIZE = 256                # REACT's face-crop videos are 256x256


@dataclass(frozen=True)
class FaceCropConfig:
    """How the face is found and framed (defaults chosen on REACT-like framing, docs/generation.md)."""

    detect_every: int = 5           # frames between detections (25 fps: 5 a second)
    smooth_s: float = 1.0           # moving-average window of the crop box, seconds
    margin: float = 0.4             # face widths added on each side (REACT crops show hair and chin)
    size: int = SIZE
    min_face: float = 0.06          # smallest face searched, as a fraction of the frame's shorter side


def parse_face_box(text: str) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` (pixels of the displayed, upright frame) -> a tuple; ValueError if malformed."""
    try:
        x, y, w, h = (int(round(float(v))) for v in text.split(","))
    except ValueError:
        raise ValueError(f"face box {text!r}: expected x,y,w,h in pixels, e.g. 200,80,240,240") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise ValueError(f"face box {text!r}: x and y must be >= 0, w and h > 0")
    return x, y, w, h


class FaceDetector:
    """Haar cascades (frontal, then profile both ways) on a downscaled grayscale frame."""

    def __init__(self, min_face: float = FaceCropConfig.min_face):
        import cv2

        self.cv2 = cv2
        self.cascades = []
        for name in CASCADES:
            cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
            if cascade.empty():
                raise RuntimeError(f"OpenCV cascade {name} not found in {cv2.data.haarcascades}")
            self.cascades.append(cascade)
        self.min_face = min_face

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """float [n, 4] boxes (x, y, w, h) in the frame's pixels, largest first; empty when none."""
        cv2 = self.cv2
        h, w = rgb.shape[:2]
        scale = min(1.0, DETECT_WIDTH / w)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        smallest = max(20, int(self.min_face * min(gray.shape)))
        frontal, profile = self.cascades
        boxes = _found(frontal, gray, smallest)
        if not len(boxes):
            boxes = _found(profile, gray, smallest)
        if not len(boxes):     # the profile cascade knows one side: search the mirror image too
            mirrored = _found(profile, gray[:, ::-1], smallest)
            if len(mirrored):
                mirrored[:, 0] = gray.shape[1] - mirrored[:, 0] - mirrored[:, 2]
            boxes = mirrored
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / scale
        return boxes[np.argsort(-boxes[:, 2] * boxes[:, 3])]


def _found(cascade, gray: np.ndarray, smallest: int) -> np.ndarray:
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    return np.asarray(found, dtype=np.float64).reshape(-1, 4)


def pick_track(detections: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """One box per detected frame: the face nearest the previous pick (the first: the largest)."""
    picked: dict[int, np.ndarray] = {}
    previous = None
    for i in sorted(detections):
        boxes = detections[i]
        if not len(boxes):
            continue
        if previous is None:
            box = boxes[0]
        else:
            centres = boxes[:, :2] + boxes[:, 2:] / 2
            box = boxes[np.argmin(np.linalg.norm(centres - (previous[:2] + previous[2:] / 2), axis=1))]
        picked[i] = previous = box
    return picked


def drop_outliers(picked: dict[int, np.ndarray], neighbours: int = 2, jump: float = 0.5) -> dict[int, np.ndarray]:
    """Drop a detection whose centre is more than ``jump`` face widths from the median centre of
    its ``neighbours`` detections on each side, or whose width is off by more than half."""
    keys = sorted(picked)
    if len(keys) < 3:
        return picked
    boxes = np.stack([picked[k] for k in keys])
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    kept = {}
    for j, k in enumerate(keys):
        around = [i for i in range(max(0, j - neighbours), min(len(keys), j + neighbours + 1)) if i != j]
        median_c = np.median(centres[around], axis=0)
        median_w = float(np.median(boxes[around, 2]))
        if (np.linalg.norm(centres[j] - median_c) <= jump * median_w
                and abs(boxes[j, 2] - median_w) <= 0.5 * median_w):
            kept[k] = picked[k]
    return kept or picked


def smooth_track(picked: dict[int, np.ndarray], frames: int, window: int) -> np.ndarray:
    """float [frames, 3] (centre x, centre y, face side): interpolated between the detections,
    held at the ends, then a centred moving average of ``window`` frames (edges padded)."""
    keys = np.asarray(sorted(picked), dtype=np.float64)
    boxes = np.stack([picked[int(k)] for k in keys])
    track = np.stack([boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2,
                      np.sqrt(boxes[:, 2] * boxes[:, 3])], axis=1)
    t = np.arange(frames, dtype=np.float64)
    dense = np.stack([np.interp(t, keys, track[:, c]) for c in range(3)], axis=1)
    window = max(1, min(int(window), frames))
    if window > 1:
        pad = window // 2
        padded = np.pad(dense, ((pad, window - 1 - pad), (0, 0)), mode="edge")
        kernel = np.ones(window) / window
        dense = np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(3)], axis=1)
    return dense


def crop_boxes(track: np.ndarray, height: int, width: int, margin: float) -> np.ndarray:
    """int [frames, 3] square crops (left, top, side) of ``(1 + 2 margin)`` face sides around each
    centre, shifted to stay inside the frame (and no larger than its shorter side)."""
    side = np.minimum(track[:, 2] * (1 + 2 * margin), min(height, width))
    left = np.clip(track[:, 0] - side / 2, 0, width - side)
    top = np.clip(track[:, 1] - side / 2, 0, height - side)
    return np.stack([np.round(left), np.round(top), np.round(side)], axis=1).astype(np.int64)


def fixed_boxes(box: tuple[int, int, int, int], frames: int, height: int, width: int) -> np.ndarray:
    """The crops of a user's ``--face-box`` (x, y, w, h), squared around its centre, every frame."""
    x, y, w, h = box
    if x >= width or y >= height:
        raise ValueError(f"face box {box} lies outside the {width}x{height} frame")
    track = np.array([[x + w / 2, y + h / 2, max(w, h)]], dtype=np.float64).repeat(frames, axis=0)
    return crop_boxes(track, height, width, margin=0.0)


def face_boxes(sampled: Iterable[tuple[int, np.ndarray]], frames: int, height: int, width: int,
               fps: float, config: FaceCropConfig = FaceCropConfig()) -> tuple[np.ndarray, dict]:
    """Crop boxes int [frames, 3] (left, top, side) from ``(frame index, rgb)`` samples, and a
    report (frames searched, faces found, jitter); ValueError when no face is found at all."""
    detector = FaceDetector(config.min_face)
    detections = {i: detector.detect(rgb) for i, rgb in sampled}
    picked = pick_track(detections)
    report = {"detector": "opencv haar cascades " + " + ".join(CASCADES), "searched": len(detections),
              "found": len(picked), "every": config.detect_every}
    if not picked:
        raise ValueError(f"no face found in {len(detections)} frames searched (every {config.detect_every}th "
                         f"frame of {frames}, OpenCV Haar cascades: frontal and profile, faces of at least "
                         f"{config.min_face:.0%} of the frame)")
    kept = drop_outliers(picked)
    track = smooth_track(kept, frames, round(config.smooth_s * fps))
    report.update(outliers=len(picked) - len(kept), jitter_px=_jitter(picked), smoothed_jitter_px=_jitter(
        {i: np.array([c[0] - c[2] / 2, c[1] - c[2] / 2, c[2], c[2]]) for i, c in enumerate(track) if i in picked}))
    return crop_boxes(track, height, width, config.margin), report


def _jitter(picked: dict[int, np.ndarray]) -> float:
    """Mean |second difference| of the box centre between consecutive detections (pixels):
    ~0 for a face moving steadily, large when the detector shakes the box."""
    keys = sorted(picked)
    if len(keys) < 3:
        return 0.0
    centres = np.stack([picked[k][:2] + picked[k][2:] / 2 for k in keys])
    return float(np.linalg.norm(np.diff(centres, n=2, axis=0), axis=1).mean())


def crop(rgb: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, 3] of the square ``box`` (left, top, side) of a frame."""
    import cv2

    left, top, side = (int(v) for v in box)
    patch = rgb[top:top + side, left:left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=interpolation)


def open_face_video(uri: str, fps: float, box: tuple[int, int, int, int] | None = None,
                    config: FaceCropConfig = FaceCropConfig()) -> tuple["media.Recording", dict]:
    """A recording read at ``fps`` and cropped to its face: a fixed ``box`` (x, y, w, h) or the
    detected, tracked and smoothed one; and the report (what was searched, found, the jitter).
    ValueError (naming what was tried) when no face is found."""
    video = media.Recording(uri, fps, size=config.size)
    t = video.timeline
    if box is not None:
        boxes, report = fixed_boxes(box, video.num_frames, t.height, t.width), {"face_box": list(box)}
    else:
        every = max(1, config.detect_every)
        sampled = video.upright(every)
        try:
            boxes, report = face_boxes(sampled, video.num_frames, t.height, t.width, fps, config)
        except ValueError as exc:
            raise ValueError(f"{exc}; pass --face-box x,y,w,h if the face is there") from None
    video.boxes = boxes
    report.update(source_fps=round(t.fps, 3), variable_frame_rate=t.variable, rotation=t.rotation,
                  source_size=[t.width, t.height], crop_side_px=[int(boxes[:, 2].min()), int(boxes[:, 2].max())])
    return video, report
