"""Synthetic REACT data: the exact on-disk layout, with a learnable one-to-many reaction.

    reactdiff synth --out DIR [--dyads 8,4,4] [--frames 751] [--seed 0] [--release 2024|2023]
                    [--behaviour prototype|backchannel|contagion]
    pipeline.data.synth.generate(out, dyads=(8, 4, 4), frames=751, seed=0, release="2024")

The real corpus is licensed, so the demo, tests and benchmarks run on this. How it is drawn:

* Every person clip is driven by a per-frame latent ``z`` with the channels of ``LATENT``
  (mouth opening, smile, brow raise, frown, eye opening, head yaw/pitch/roll). The 58-d 3DMM,
  the 25-d emotion attributes, the face video (a face drawn with numpy masks, H.264 via PyAV)
  and the voice (harmonics + noise whose loudness follows the mouth) are all rendered from it.
* The person in csv column 1 (NoXI Expert, RECOLA P25/P41/P45, UDIVA FC1) is the speaker, the
  person in column 2 reacts. How both behave is a behaviour model of ``pipeline.data.behaviour``: by
  default three speaker prototypes and listeners that react 5..15 frames later in one of three
  styles, so one speaker behaviour has several appropriate reactions; ``backchannel`` and
  ``contagion`` are other models, for checking that results do not depend on the first.
* Appropriateness (``data_indices.csv`` + ``Approprirate_facial_reaction.npy``): two directed items
  are neighbours iff their speakers' behaviour classes are equal — ``(prototype)`` for column-1
  speakers, ``(prototype, style)`` for the reacting person speaking in a mirrored item. The diagonal
  is included. ``data_indices`` lists the dyads in another order than the split csvs (as the real
  one does), so readers must map by key.

Deterministic for a seed: csv/npy/wav bytes are identical across runs and worker counts; the
video frames are identical (x264 runs single-threaded, so the mp4 bytes are too in practice).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from pipeline import progress, storage
from pipeline.config import option
from pipeline.errors import UserError
from pipeline.data.behaviour import (BEHAVIOURS, BROW, EYES, FROWN, LATENT, LOOK as _LOOK, LABELS as _LABELS, MOUTH,
                                PERSON as _PERSON, PITCH, PLAN as _PLAN, REACT as _REACT, ROLL, SMILE,
                                VOICE as _VOICE, FACE_MODEL as _FACE_MODEL, YAW, rng as _rng)
from pipeline.data.face import CartoonFace, random_look
from pipeline.data.react import (ALL_NEIGHBOURS, AUDIO, DATA_INDICES, EMOTION, EMOTION_COLUMNS, FPS,
                            MEAN_FACE, SAMPLE_RATE, SPLITS, TDMM, TDMM_DIM, VIDEO, emotion_clip_path,
                            neighbour_key, split_neighbours_file)

log = logging.getLogger(__name__)

SYNTH_VERSION = 1                 # bump when the generated content changes
MARKER = "synthetic.json"         # written last: parameters + ground truth; its presence = complete
SIZE = 256


class SynthError(UserError, RuntimeError):
    """The output location cannot take a synthetic dataset (the message says why and what to do)."""


@dataclass
class SynthConfig:
    """Options of ``reactdiff synth`` (YAML/``--set`` keys)."""

    out: str = option("", "dataset root to write, local path or s3://bucket/prefix "
                          "(default: <working directory>/data)", flag="--out", metavar="URI")
    dyads: list[int] = option([8, 4, 4], "dyads per split (train, val, test); each dyad is two person clips",
                              flag="--dyads", metavar="TRAIN,VAL,TEST")
    frames: int = option(751, "frames per clip at 25 fps (REACT: 751)", flag="--frames")
    seed: int = option(0, "random seed; same seed, same data", flag="--seed")
    release: str = option("2024", "2024: mp4 videos, Emotion roles renamed P1/P2; 2023: PNG frame folders, "
                                  "original role names, UDIVA dyads too", flag="--release", choices=["2024", "2023"])
    behaviour: str = option("prototype", "behaviour model (pipeline.data.behaviour): prototype (three speaker "
                                         "prototypes, mirror/complementary/dampened listeners; the demo's) or "
                                         "backchannel (speaker groups, listeners that smile, raise brows and nod "
                                         "while the partner talks) or contagion (groups share switching moods, "
                                         "listeners catch them with a lag and nod at turn ends)",
                            flag="--behaviour", choices=list(BEHAVIOURS))
    workers: int = option(0, "processes rendering clips (default 0: one per CPU for sizeable datasets)",
                          flag="--workers")
    overwrite: bool = option(False, "replace the files of an existing synthetic dataset at --out",
                             flag="--overwrite")

    def validate(self) -> None:
        from pipeline.config import ConfigError

        if len(self.dyads) != 3 or min(self.dyads) < 0 or sum(self.dyads) == 0:
            raise ConfigError(f"dyads: expected three non-negative counts (train, val, test), got {self.dyads}")
        if self.frames < 2:
            raise ConfigError(f"frames: must be at least 2, got {self.frames}")
        if self.release not in ("2024", "2023"):
            raise ConfigError(f"release: must be 2024 or 2023, got {self.release!r}")
        if self.behaviour not in BEHAVIOURS:
            raise ConfigError(f"behaviour: must be one of {', '.join(BEHAVIOURS)}, got {self.behaviour!r}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")


# ---------------------------------------------------------------------------------------------
# Plan: sites, sessions, roles, splits, prototypes and reaction styles


@dataclass(frozen=True)
class DyadPlan:
    split: str
    ordinal: int                  # global dyad number (train, then val, then test)
    site: str
    speaker: str                  # csv path of the person in column 1
    listener: str                 # csv path of the person in column 2
    prototype: int                # speaker behaviour prototype
    style: str                    # listener reaction style
    lag: int                      # reaction lag in frames

    @property
    def speaker_class(self) -> tuple:
        return ("speaker", self.prototype)

    @property
    def listener_class(self) -> tuple:
        return ("listener", self.prototype, self.style)


_NOXI_CITIES = ("Paris", "Nottingham", "Augsburg")
_RECOLA_ROLES = (("P25", "P26"), ("P41", "P42"), ("P45", "P46"))
_UDIVA_TASKS = ("talk", "animals", "ghost", "lego")
_CLIPS_PER_SESSION = {"NoXI": 3, "RECOLA": 2, "UDIVA": 2}


def _site(ordinal: int, release: str) -> str:
    if ordinal % 4 == 1:
        return "RECOLA"
    if release == "2023" and ordinal % 4 == 2:
        return "UDIVA"
    return "NoXI"


def plan_dyads(dyads: tuple[int, int, int], seed: int = 0, release: str = "2024",
               behaviour: str = "prototype") -> list[DyadPlan]:
    """Every dyad of the dataset: paths (subject-independent splits), speaker group, style, lag."""
    model = BEHAVIOURS[behaviour]
    groups, styles, lags = model.groups, model.styles, model.lags
    plans: list[DyadPlan] = []
    session_no = 0
    ordinal = 0
    for split, count in zip(SPLITS, dyads):
        rng = _rng(seed, _PLAN, SPLITS.index(split))
        # Balanced prototypes; dyads sharing a prototype get different reaction styles, so every
        # speaker behaviour comes with several appropriate reactions (the one-to-many relation).
        prototypes = rng.permutation([i % groups for i in range(count)])
        style_offset = rng.integers(0, len(styles), groups)
        seen_proto = [0] * groups
        open_session: dict[str, tuple[str, int, tuple[str, str]]] = {}
        for j in range(count):
            site = _site(ordinal, release)
            name, used, roles = open_session.get(site, ("", _CLIPS_PER_SESSION[site], ("", "")))
            if used >= _CLIPS_PER_SESSION[site]:
                session_no += 1
                if site == "NoXI":
                    name = (f"{session_no:03d}_2016-{3 + session_no % 9:02d}-{1 + session_no * 7 % 28:02d}_"
                            f"{_NOXI_CITIES[session_no % 3]}")
                    roles = ("Expert_video", "Novice_video")
                elif site == "RECOLA":
                    name, roles = f"group-{session_no}", _RECOLA_ROLES[session_no % 3]
                else:
                    name = f"{_UDIVA_TASKS[session_no % 4]}/{session_no * 1031 % 1000000:06d}"
                    roles = ("FC1", "FC2")
                used = 0
            used += 1
            open_session[site] = (name, used, roles)
            speaker = f"{site}/{name}/{roles[0]}/{used}"
            listener = f"{site}/{name}/{roles[1]}/{used}"
            proto = int(prototypes[j])
            style = styles[(style_offset[proto] + seen_proto[proto]) % len(styles)]
            seen_proto[proto] += 1
            lag = int(rng.integers(lags[0], lags[1] + 1))
            plans.append(DyadPlan(split, ordinal, site, speaker, listener, proto, style, lag))
            ordinal += 1
    return plans


def appropriateness(plans: list[DyadPlan]) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """(data_indices rows, 2M x 2M matrix) in the organisers' format.

    Rows are ordered by site, session and clip (not split order); row i < M is dyad i with its
    column-1 person speaking, row M + i the mirrored dyad.
    """
    def sort_key(p: DyadPlan):
        site, session, clip = neighbour_key(p.speaker)
        return site, session, int(clip)

    ordered = sorted(plans, key=sort_key)
    rows = []
    for p in ordered:
        site, session, clip = neighbour_key(p.speaker)
        rows.append(({"RECOLA": "Recola"}.get(site, p.site), session, clip))   # the real file mixes case
    classes = [p.speaker_class for p in ordered] + [p.listener_class for p in ordered]
    ids = {c: i for i, c in enumerate(dict.fromkeys(classes))}
    code = np.array([ids[c] for c in classes])
    return rows, (code[:, None] == code[None, :]).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Labels: 3DMM and the 25 emotion attributes from the latent


def face_model() -> tuple[np.ndarray, np.ndarray]:
    """(expression basis [52, 5] over mouth, smile, brow, frown, eye closure; mean face [58]).

    Fixed for every seed: it plays the role of FaceVerse's model, shared by all datasets.
    """
    rng = _rng(0, _FACE_MODEL)
    basis = rng.normal(0, 0.08, (52, 5))
    primary = np.arange(52) % 5
    basis[np.arange(52), primary] = rng.uniform(0.4, 1.0, 52) * rng.choice([-1.0, 1.0], 52)
    mean_face = np.concatenate([rng.normal(0, 0.08, 52), rng.normal(0, 0.02, 3),
                                [0.0, 0.0, 0.1] + rng.normal(0, 0.01, 3)]).astype(np.float32)
    return basis, mean_face


def tdmm_from_latent(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[T, 58] float32: 52 expression + 3 rotation (pitch, yaw, roll) + 3 translation."""
    basis, mean_face = face_model()
    drivers = np.stack([z[:, MOUTH], z[:, SMILE], z[:, BROW], z[:, FROWN], 1 - z[:, EYES]], 1)
    expression = 0.6 * drivers @ basis.T + rng.normal(0, 0.01, (len(z), 52))
    rotation = z[:, [PITCH, YAW, ROLL]]
    translation = np.stack([0.05 * z[:, YAW], -0.04 * z[:, PITCH], 0.02 * z[:, MOUTH]], 1)
    return (mean_face[None] + np.concatenate([expression, rotation, translation], 1)).astype(np.float32)


# AU occurrence logits over (mouth, smile, brow, frown, eye closure, 1), in EMOTION_COLUMNS order.
_AU_WEIGHTS = np.array([
    [0, 0, 2.5, 0, 0, -0.5],       # AU1 inner brow raiser
    [0, 0, 2.5, 0, 0, -0.7],       # AU2 outer brow raiser
    [0, 0, 0, 3.0, 0, -0.6],       # AU4 brow lowerer
    [0, 3.0, 0, 0, 0, -0.9],       # AU6 cheek raiser
    [0, 0, 0, 2.0, 1.5, -0.8],     # AU7 lid tightener
    [0, 0, 0, 2.5, 0, -1.2],       # AU9 nose wrinkler
    [0, 1.5, 0, 1.0, 0, -1.2],     # AU10 upper lip raiser
    [0, 3.0, 0, 0, 0, -0.5],       # AU12 lip corner puller
    [0, 2.0, 0, 0, 0, -1.0],       # AU14 dimpler
    [0, -2.5, 0, 0, 0, -0.8],      # AU15 lip corner depressor
    [-2.0, 0, 0, 1.5, 0, -0.5],    # AU17 chin raiser
    [-2.0, 0, 0, 2.0, 0, -0.6],    # AU23 lip tightener
    [-3.0, 0, 0, 1.0, 0, -0.5],    # AU24 lip pressor
    [4.0, 0, 0, 0, 0, -0.6],       # AU25 lips part
    [4.0, 0, 0, 0, 0, -1.4],       # AU26 jaw drop
])
# Expression logits over the same drivers: Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt.
_EXPRESSION_WEIGHTS = np.array([
    [0, 0, 0, 0, 0, 1.2],
    [0, 4.0, 0, -1.0, 0, -0.6],
    [0, -2.5, -0.5, 1.5, 0.5, -1.0],
    [1.5, 0, 3.5, -1.0, -1.0, -1.5],
    [0.5, -1.0, 2.0, 1.5, 0, -2.0],
    [0, -1.0, 0, 2.5, 0.5, -1.8],
    [0, -1.5, -1.0, 3.5, 0, -1.8],
    [0, 1.0, 0, 1.0, 0, -2.0],
])


def emotion_from_latent(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[T, 25]: 15 binary AUs, valence and arousal in [-1, 1], 8 expression probabilities (sum 1)."""
    frames = len(z)
    drivers = np.stack([z[:, MOUTH], z[:, SMILE], z[:, BROW], z[:, FROWN], 1 - z[:, EYES],
                        np.ones(frames)], 1)
    aus = (drivers @ _AU_WEIGHTS.T + rng.normal(0, 0.15, (frames, 15)) > 0).astype(np.float64)
    head_motion = np.abs(np.gradient(z[:, YAW:], axis=0)).sum(1) * FPS
    valence = np.tanh(1.6 * z[:, SMILE] - 1.0 * z[:, FROWN] + rng.normal(0, 0.03, frames))
    arousal = np.tanh(1.2 * z[:, MOUTH] + 0.8 * z[:, BROW] + 0.5 * head_motion - 0.3
                      + rng.normal(0, 0.03, frames))
    logits = 1.5 * (drivers @ _EXPRESSION_WEIGHTS.T)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return np.concatenate([aus, valence[:, None], arousal[:, None], probs], 1)


def emotion_csv(emotion: np.ndarray) -> str:
    """The Emotion csv text: header of the 25 names, AUs as 0/1, the rest with 6 decimals."""
    lines = [",".join(EMOTION_COLUMNS)]
    for row in emotion:
        lines.append(",".join([str(int(v)) for v in row[:15]] + [f"{v:.6f}" for v in row[15:]]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Voice


def voice_from_latent(z: np.ndarray, f0: float, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 at 44.1 kHz: voiced harmonics + breath noise, loudness following the mouth."""
    frames = len(z)
    n = frames * SAMPLE_RATE // FPS
    t = np.arange(n) / SAMPLE_RATE
    frame_t = (np.arange(frames) + 0.5) / FPS
    mouth = np.interp(t, frame_t, z[:, MOUTH])
    smile = np.interp(t, frame_t, z[:, SMILE])
    loudness = np.clip((mouth - 0.1) / 0.9, 0, 1) ** 1.3
    pitch = f0 * (1 + 0.06 * np.sin(2 * np.pi * 0.8 * t + rng.uniform(0, 6.3)) + 0.05 * smile)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    # sin(h x) for h = 1..8 by the Chebyshev recurrence sin(hx) = 2 cos(x) sin((h-1)x) - sin((h-2)x):
    # one sin and one cos instead of eight sins over 1.3 M samples.
    two_cos, prev, cur = 2 * np.cos(phase), np.zeros(n), np.sin(phase)
    voiced = cur.copy()
    for h in range(2, 9):
        prev, cur = cur, two_cos * cur - prev
        voiced += cur / h
    voiced /= 2.7
    signal = 0.6 * loudness * voiced + rng.normal(0, 1, n) * (0.05 * loudness + 0.002)
    return np.clip(signal, -1, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Face video


def write_mp4(path: str, frames: Iterator[np.ndarray], size: int = SIZE) -> int:
    """H.264 mp4 at 25 fps (yuv420p); returns the number of frames written."""
    import av

    # threads=1: x264 output is then a pure function of the frames (deterministic bytes), and
    # the process pool already keeps every core busy.
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "crf": "18",
                                                                     "threads": "1"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        n = 0
        for n, rgb in enumerate(frames, start=1):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = n - 1
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return n


def write_pngs(folder: str, frames: Iterator[np.ndarray]) -> int:
    """2023 release: one folder of 1.png .. T.png."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    n = 0
    for n, rgb in enumerate(frames, start=1):
        Image.fromarray(rgb).save(os.path.join(folder, f"{n}.png"), compress_level=1)
    return n


# ---------------------------------------------------------------------------------------------
# One person clip (runs in a worker process)


@dataclass(frozen=True)
class ClipJob:
    root: str                     # local folder
    split: str
    clip_id: str
    person: int                   # global person number (random streams)
    seed: int
    release: str
    latent: np.ndarray            # [T, 8]


def render_clip(job: ClipJob) -> str:
    """Write the clip's video, wav, Emotion csv and 3DMM npy under ``job.root``."""
    import soundfile

    base = os.path.join(job.root, job.split)
    look_rng = _rng(job.seed, _LOOK, job.person)
    look = random_look(look_rng)
    f0 = float(look_rng.choice([look_rng.uniform(95, 135), look_rng.uniform(170, 230)]))  # the voice's pitch
    labels_rng = _rng(job.seed, _LABELS, job.person)
    tdmm = tdmm_from_latent(job.latent, labels_rng)
    emotion = emotion_from_latent(job.latent, labels_rng)

    path = os.path.join(base, TDMM, job.clip_id + ".npy")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # 2023 files are stored as T x 1 x 58 (the loaders squeeze), 2024 ones as T x 58.
    np.save(path, tdmm[:, None, :] if job.release == "2023" else tdmm, allow_pickle=False)

    emotion_rel = emotion_clip_path(job.clip_id) if job.release == "2024" else job.clip_id
    path = os.path.join(base, EMOTION, emotion_rel + ".csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(emotion_csv(emotion))

    path = os.path.join(base, AUDIO, job.clip_id + ".wav")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    soundfile.write(path, voice_from_latent(job.latent, f0, _rng(job.seed, _VOICE, job.person)),
                    SAMPLE_RATE, subtype="PCM_16", format="WAV")

    renderer = CartoonFace(look, SIZE)
    if job.release == "2023":
        write_pngs(os.path.join(base, VIDEO, job.clip_id), renderer.frames(job.latent))
    else:
        path = os.path.join(base, VIDEO, job.clip_id + ".mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_mp4(path, renderer.frames(job.latent))
    return job.clip_id


# ---------------------------------------------------------------------------------------------
# The whole dataset


@dataclass
class SynthSummary:
    out: str
    release: str
    frames: int
    seed: int
    dyads: dict[str, int]
    clips: int
    seconds: float
    workers: int
    skipped: bool = False                       # an identical dataset was already there
    truth: list[dict] = field(default_factory=list)   # per dyad: split, speaker, listener, prototype, style, lag

    def to_dict(self) -> dict:
        return asdict(self)


def _params(dyads, frames, seed, release, behaviour="prototype") -> dict:
    params = {"version": SYNTH_VERSION, "dyads": dict(zip(SPLITS, dyads)), "frames": frames,
              "seed": seed, "release": release}
    if behaviour != "prototype":      # datasets made before behaviour models existed stay valid
        params["behaviour"] = behaviour
    return params


def _written_names() -> list[str]:
    return [*SPLITS, *(f"{s}.csv" for s in SPLITS), DATA_INDICES, ALL_NEIGHBOURS, MEAN_FACE,
            "std_face.npy", MARKER, *(split_neighbours_file(s) for s in SPLITS)]


def _prepare_out(out: str, params: dict, overwrite: bool) -> SynthSummary | None:
    """Returns the previous summary if an identical dataset is complete at ``out``."""
    marker = storage.join(out, MARKER)
    if storage.exists(marker) and not overwrite:
        previous = storage.read_json(marker)
        if previous.get("params") == params:
            return SynthSummary(**{**previous["summary"], "skipped": True, "seconds": 0.0})
        raise SynthError(f"{out} holds a synthetic dataset made with other parameters "
                         f"({previous.get('params')}); pass --overwrite to replace it")
    ours = {storage.join(out, name) for name in _written_names()}
    existing = {storage.join(out, name) for name in storage.listdir(out)}
    if existing - ours and not overwrite:
        raise SynthError(f"{out} is not empty and holds no synthetic dataset; choose an empty "
                         "location or pass --overwrite (replaces only the files synth writes)")
    if existing & ours:   # --overwrite, or an interrupted run (no marker): start afresh
        log.info("%s: removing the files of a previous synthetic dataset", out)
        for uri in sorted(existing & ours):
            storage.remove(uri)
    return None


def _auto_workers(n_clips: int, frames: int) -> int:
    if n_clips * frames < 3000:         # a few seconds of work: a pool costs more than it saves
        return 1
    return max(1, min(os.cpu_count() or 1, n_clips))


def generate(out: str, dyads: tuple[int, int, int] | list[int] = (8, 4, 4), frames: int = 751,
             seed: int = 0, release: str = "2024", workers: int | None = None,
             overwrite: bool = False, behaviour: str = "prototype") -> SynthSummary:
    """Write a synthetic REACT dataset to ``out`` (local or s3://) and return what was made.

    ``dyads`` = (train, val, test) dyad counts; each dyad is two person clips of ``frames`` frames.
    Re-running with the same parameters on a complete dataset does nothing (``skipped=True``).
    ``behaviour`` picks the behaviour model (``pipeline.data.behaviour.BEHAVIOURS``).
    """
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; known: {', '.join(BEHAVIOURS)}")
    dyads = tuple(int(d) for d in dyads)
    if len(dyads) != 3 or min(dyads) < 0 or sum(dyads) == 0:
        raise ValueError(f"dyads must be three non-negative counts (train, val, test), not all zero; got {dyads}")
    if frames < 2:
        raise ValueError(f"frames must be at least 2, got {frames}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if release not in ("2024", "2023"):
        raise ValueError(f"release must be 2024 or 2023, got {release!r}")
    start = time.perf_counter()
    params = _params(dyads, frames, seed, release, behaviour)
    previous = _prepare_out(out, params, overwrite)
    if previous is not None:
        log.info("%s: identical synthetic dataset already complete, nothing to do", out)
        return previous

    plans = plan_dyads(dyads, seed, release, behaviour)
    model = BEHAVIOURS[behaviour]
    prototypes = {p: model.group(p, frames, seed) for p in range(model.groups)}
    remote = storage.is_remote(out)
    with tempfile.TemporaryDirectory(prefix="reactdiff-synth-") as tmp:
        local = tmp if remote else storage.filesystem(out)[1]
        os.makedirs(local, exist_ok=True)
        jobs = []
        for plan in plans:
            s = model.speaker(prototypes[plan.prototype], _rng(seed, _PERSON, 2 * plan.ordinal))
            lat = model.listener(s, plan.style, plan.lag, _rng(seed, _REACT, plan.ordinal))
            jobs.append(ClipJob(local, plan.split, plan.speaker, 2 * plan.ordinal, seed, release, s))
            jobs.append(ClipJob(local, plan.split, plan.listener, 2 * plan.ordinal + 1, seed, release, lat))
        n_workers = workers or _auto_workers(len(jobs), frames)
        _run_jobs(jobs, n_workers)
        _write_root_files(local, plans)
        truth = [{"split": p.split, "speaker": p.speaker, "listener": p.listener, "prototype": p.prototype,
                  "style": p.style, "lag": p.lag} for p in plans]
        summary = SynthSummary(out=out, release=release, frames=frames, seed=seed,
                               dyads=dict(zip(SPLITS, dyads)), clips=len(jobs), seconds=0.0,
                               workers=n_workers, truth=truth)
        if remote:
            _upload(local, out)
    summary.seconds = round(time.perf_counter() - start, 2)
    # The marker goes last: a dataset without it is incomplete (an interrupted run is redone).
    storage.write_json(storage.join(out, MARKER), {"params": params, "summary": summary.to_dict(),
                                                    "note": "synthetic REACT-layout data made by reactdiff synth"})
    log.debug("synthetic REACT %s: %d clips (%s dyads) in %.1f s with %d worker(s) -> %s", release,
             len(jobs), "/".join(map(str, dyads)), summary.seconds, n_workers, out)
    return summary


def _run_jobs(jobs: list[ClipJob], workers: int) -> None:
    with progress.bar(total=len(jobs), desc="synth", unit="clip") as clips:
        if workers <= 1:
            for job in jobs:
                render_clip(job)
                clips.update()
            return
        import multiprocessing

        # spawn, not fork: the caller may hold threads (Ray, s3fs event loops) that fork would copy.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(render_clip, job) for job in jobs]):
                future.result()
                clips.update()


def _write_root_files(local: str, plans: list[DyadPlan]) -> None:
    for split in SPLITS:
        rows = [p for p in plans if p.split == split]
        if not rows:
            continue
        text = "idx,speaker_path,listener_path\n" + "".join(
            f"{i},{p.speaker},{p.listener}\n" for i, p in enumerate(rows))
        with open(os.path.join(local, f"{split}.csv"), "w", newline="") as f:
            f.write(text)
    index_rows, matrix = appropriateness(plans)
    with open(os.path.join(local, DATA_INDICES), "w", newline="") as f:
        f.write("site,chat_index,clip_index\n" + "".join(f"{a},{b},{c}\n" for a, b, c in index_rows))
    np.save(os.path.join(local, ALL_NEIGHBOURS), matrix, allow_pickle=False)
    _, mean_face = face_model()
    np.save(os.path.join(local, MEAN_FACE), mean_face, allow_pickle=False)
    np.save(os.path.join(local, "std_face.npy"), np.full(TDMM_DIM, 0.1, np.float32), allow_pickle=False)


def _upload(local: str, out: str) -> None:
    fs, base = storage.filesystem(out)
    lpaths, rpaths = [], []
    for dirpath, _, files in os.walk(local):
        for name in sorted(files):
            lp = os.path.join(dirpath, name)
            lpaths.append(lp)
            rpaths.append(base.rstrip("/") + "/" + os.path.relpath(lp, local).replace(os.sep, "/"))
    log.info("uploading %d files to %s", len(lpaths), out)
    fs.put(lpaths, rpaths)   # s3fs uploads the batch concurrently
