"""Reactions for new speaker clips, and batch predictions for a whole split.

One clip (``reactdiff generate --speaker-video X.mp4``), read top to bottom as the data flows::

    model URI ─ registry ─ generator + version ─ version tag snapshot_uri ─ snapshot manifest
                                                   └─ the feature set the model was trained on
    speaker video (+ audio) ─ checks (readable, face-sized, >= 2 s, audio when the model hears)
                        ─ speaker_face: the face detected, tracked and smoothed (pipeline.data.face_crop)
                        ─ pipeline.data.clip.extract_clip: the clip at 25 fps by timestamps, upright,
                          cropped; decode_clip + the network stages (the extraction job's own code:
                          the speaker gets exactly the features of training)
                        ─ generate_reactions: K reactions [K, T, 25] + [K, T, 58] for all T frames
                          (750-frame windows; shorter clips looped, longer ones cross-faded)
                        ─ REACT files per sample: 25-column attributes csv, T x 58 3DMM npy
                        ─ reactions.png (all K under the speaker), reaction_00.mp4 (speaker crop | face)

What the written files guarantee (the raw network output is unconstrained):

* AU occurrences in [0, 1] (``--binarize``: 0/1 at 0.5), valence/arousal in [-1, 1];
* the 8 expression probabilities are clipped at 0 and renormalised to sum to 1 on every frame
  (a frame with no positive value becomes uniform, 1/8 each);
* one row per frame of the speaker clip at 25 fps; a REACT clip (751 frames) is one model window
  of ``seq_len`` = 750 frames (0..749, as the reference) and its 751st row repeats the 750th.
  ``generation.json`` says so, per run, with the windows used (docs/generation.md).

A whole split (``reactdiff generate --features SNAPSHOT --split test``) runs the evaluation job's
own Ray Data pipeline (``pipeline.evaluate.predictions.predictions_dataset``: its actor pool and
per-item seeds ``protocol.item_seed(seed, k)``) over the items evaluation scores (``available_items``: an item whose
speaker or listener clip was quarantined is skipped), and streams Parquet in the evaluation
predictions contract, so ``reactdiff evaluate --predictions URI`` gives the numbers a direct
evaluation would. Those predictions are the generator's raw output — what the metrics score —
not the cleaned files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import config as config_mod
from pipeline.config import option
from pipeline.errors import UserError
from pipeline import runtime, storage
from pipeline.data import clip as clip_features
from pipeline.data import face_crop, media, react
from pipeline.data.features import Extractor, FeatureSet, feature_set_from_manifest
from pipeline.data.media import ClipError, read_audio
from pipeline.data.snapshot import Snapshot, SnapshotError
from pipeline.evaluate.predictions import actor_pool, predictions_dataset
from pipeline.evaluate.protocol import (available_items, item_seed, model_description, model_features,
                                       sampling_options)
from pipeline import plots
from pipeline.generate import render
from reactdiff.windows import Sampling, generate_reactions
from pipeline.registry.models import RegistryError, load_generator

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities.model_registry import ModelVersion

    from reactdiff.generator import ReactDiffGenerator

log = logging.getLogger(__name__)

MIN_FACE_PIXELS = 64          # a frame smaller than this on either side holds no usable face
MIN_SECONDS = 2.0             # shorter clips hold too little speech to react to
FACE_CROP_MODES = ("auto", "detect", "off")
AU, VALENCE_AROUSAL, EXPRESSION = slice(0, 15), slice(15, 17), slice(17, 25)
PREDICTIONS_MANIFEST = "_predictions.json"   # '_' prefix: Parquet dataset readers skip it


class GenerationError(UserError, RuntimeError):
    """Something the user can fix: the message names the file or option and what to do."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class GenerateConfig:
    """``reactdiff generate`` settings (jobs/configs/generate.yaml; every key can be ``--set``)."""

    model: str = option("models:/reactdiff@champion", "models:/reactdiff@champion, models:/reactdiff/3, "
                        "runs:/..., or a generator file", flag="--model", metavar="MODEL_URI")
    out: str | None = option(None, "output folder, local or s3:// (default: <workdir>/outputs/generate-<time>)",
                             flag="--out", metavar="DIR")
    samples: int = option(10, "reactions per speaker", flag="--samples")
    seed: int = option(0, "one clip: the generator seed; with --split, item k uses "
                          "pipeline.evaluate.protocol.item_seed(seed, k)", flag="--seed")
    steps: int | None = option(None, "DDIM steps (default: the generator's schedule)", flag="--steps")
    decoder_dropout: bool = option(False, "sample with the frozen decoder's dropout on, as the reference does "
                                          "(more diverse, less faithful)", flag="--decoder-dropout")
    guidance: float | None = option(None, "classifier-free guidance scale (null: the model's own; 1 = none)",
                                    flag="--guidance")
    features: str | None = option(None, "feature snapshot URI or id: the model's feature set (one clip) or the "
                                        "split's features (--split); default: the model version's snapshot_uri "
                                        "tag", flag="--features", metavar="SNAPSHOT")
    speaker_video: str | None = option(None, "the speaker's video (mp4, mov, webm...), local or s3://: any frame "
                                             "rate (resampled to 25 fps by timestamps), size and rotation, at least "
                                             f"{MIN_SECONDS:g} s long; the face is found and cropped",
                                       flag="--speaker-video", group="one speaker clip", metavar="FILE")
    speaker_audio: str | None = option(None, "the speaker's audio (wav, flac, mp3, m4a...); default: the video's "
                                             "own audio stream (AAC, Opus, MP3; any rate and channels)",
                                       flag="--speaker-audio", group="one speaker clip", metavar="FILE")
    face_crop: str = option("auto", "auto: find the face unless the video is already a square face crop (as "
                                    "REACT's 256x256 videos); detect: always; off: the whole frame",
                            flag="--face-crop", group="one speaker clip", choices=list(FACE_CROP_MODES))
    face_box: str | None = option(None, "the face's box x,y,w,h in pixels of the upright frame: no detection",
                                  flag="--face-box", group="one speaker clip", metavar="X,Y,W,H")
    speaker_attributes: str | None = option(None, "the speaker's 25-column REACT attributes, drawn above the "
                                                  "reactions in the plot", flag="--speaker-attributes",
                                            group="one speaker clip", metavar="CSV")
    speaker_3dmm: str | None = option(None, "the speaker's 58-d 3DMM (T x 58); only models that consume it need "
                                            "it", flag="--speaker-3dmm", group="one speaker clip", metavar="NPY")
    binarize: bool = option(False, "write the 15 AU columns as 0/1 (threshold 0.5) instead of scores in [0, 1]",
                            flag="--binarize", group="one speaker clip")
    plot: bool = option(True, "skip reactions.png (plot=false)", flag="--no-plot", group="one speaker clip",
                        action="store_false")
    video: bool = option(True, "skip the reaction_<k>.mp4 videos, speaker | animated face (video=false)",
                         flag="--no-video", group="one speaker clip", action="store_false")
    video_sample: int = option(0, "which reaction drives the face in the video", flag="--video-sample",
                               group="one speaker clip", metavar="K")
    renderer: str = option("cartoon", "face renderer: 'cartoon' (built-in 2D face) or a factory taking size= and "
                                      "returning an object with render(emotion, tdmm) -> frames (e.g. FaceVerse)",
                           flag="--renderer", group="one speaker clip", metavar="MODULE:FACTORY")
    face_size: int = option(256, "pixels of each half of the video")
    feature_models: dict[str, str] = option({}, "model file of a network extractor (as for `reactdiff extract "
                                                 "--model`), repeatable", flag="--feature-model", group="one speaker clip",
                                            metavar="NAME=URI")
    split: str | None = option(None, "generate for every directed item of this snapshot split", flag="--split",
                               group="a whole split (Ray Data)", choices=["train", "val", "test"])
    max_items: int | None = option(None, "only the first N items (smoke runs)", flag="--max-items",
                                   group="a whole split (Ray Data)")
    batch_size: int = option(8, "items per actor call", flag="--batch-size", group="a whole split (Ray Data)")
    actors: int | None = option(None, "generation actors (default: one per GPU, else up to 2)", flag="--actors",
                                group="a whole split (Ray Data)")
    device: str = option("auto", "one clip on a cluster: auto = a Ray task on a GPU worker when the cluster has "
                                 "GPUs; cuda = always (an autoscaler adds one); cpu = in the driver")
    ray_address: str | None = option(None, "Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray "
                                           "on 127.0.0.1)", flag="--ray-address", group="a whole split (Ray Data)")

    def sampling(self) -> Sampling:
        """How the reactions are drawn (steps, decoder dropout, guidance); checks them."""
        return sampling_options(self)

    def validate(self) -> None:
        err = config_mod.ConfigError
        if not self.model:
            raise err("model: pass --model MODEL_URI (e.g. models:/reactdiff@champion)")
        if bool(self.speaker_video) == bool(self.split):
            raise err("pass either --speaker-video FILE (one clip) or --split SPLIT (a whole snapshot split)")
        if self.samples < 1:
            raise err(f"samples must be >= 1, got {self.samples}")
        self.sampling()
        if not 0 <= self.video_sample < self.samples:
            raise err(f"video_sample must be in 0..{self.samples - 1} (one of the {self.samples} reactions)")
        if self.split is not None and self.split not in react.SPLITS:
            raise err(f"split must be one of {', '.join(react.SPLITS)}, got {self.split!r}")
        if self.speaker_3dmm and not self.speaker_video:
            raise err("--speaker-3dmm belongs to --speaker-video")
        if self.max_items is not None and self.max_items < 1:
            raise err("max_items must be >= 1")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise err("batch_size and actors must be >= 1")
        if self.face_size < 64 or self.face_size % 2:
            raise err("face_size must be an even number >= 64")
        if self.face_crop not in FACE_CROP_MODES:
            raise err(f"face_crop must be one of {', '.join(FACE_CROP_MODES)}, got {self.face_crop!r}")
        if self.face_box is not None:
            try:
                face_crop.parse_face_box(self.face_box)
            except ValueError as exc:
                raise err(f"--face-box: {exc}") from None
        if self.device not in ("auto", "cuda", "cpu"):
            raise err(f"device must be auto, cuda or cpu, got {self.device!r}")


# ---------------------------------------------------------------------------------------------
# The model and the features it was trained on
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    generator: "ReactDiffGenerator"
    version: "ModelVersion | None"
    uri: str
    snapshot: "Snapshot | None"

    @property
    def inputs(self) -> dict[str, int]:
        """The named per-frame speaker features the generator consumes (column -> width)."""
        return model_features(self.generator)

    @property
    def seq_len(self) -> int:
        return int(self.generator.config.seq_len)

    def describe(self) -> dict[str, Any]:
        v = self.version
        return {"uri": self.uri, "name": getattr(v, "name", None),
                "version": str(v.version) if v is not None else None,
                "run_id": getattr(v, "run_id", None),
                "snapshot_id": self.snapshot.id if self.snapshot else None,
                "snapshot_uri": storage.redact(self.snapshot.uri) if self.snapshot else None,
                "feature_set_hash": self.snapshot.feature_set_hash if self.snapshot else None,
                "inputs": self.inputs, "seq_len": self.seq_len,
                "architecture": self.generator.config.architecture,
                "latent_normalisation": "reference" if self.generator.config.reference_normalisation_bug else "exact"}


def load_model(model_uri: str, features: str | None = None, *, device: str = "cpu") -> LoadedModel:
    """The generator, its registry version and the snapshot whose feature set it consumes.

    Snapshot: ``features`` (URI or id under the workspace), else the version's ``snapshot_uri``
    tag (set by ``register_generator``), else the generator file's own metadata.
    """
    try:
        generator, version = load_generator(model_uri, map_location=device)
    except RegistryError as exc:
        raise GenerationError(str(exc)) from None
    generator.eval()
    tags = dict(getattr(version, "tags", None) or {})
    meta = dict(getattr(generator, "metadata", None) or {})
    ref = features or tags.get("snapshot_uri") or meta.get("snapshot_uri")
    snapshot = None
    if ref:
        try:
            snapshot = Snapshot.resolve(ref, runtime.workspace().snapshots)
        except SnapshotError as exc:
            raise GenerationError(f"the feature snapshot of {model_uri} cannot be opened: {exc}. "
                                  "Pass --features SNAPSHOT_URI (the snapshot the model was trained on)") from None
    fsh = tags.get("feature_set_hash") or meta.get("feature_set_hash")
    if snapshot is not None and fsh and fsh != snapshot.feature_set_hash:
        raise GenerationError(f"{model_uri} was trained on feature set {fsh[:8]} but snapshot {snapshot.id} "
                              f"has {snapshot.feature_set_hash[:8]}: pass --features with the model's snapshot")
    return LoadedModel(generator, version, model_uri, snapshot)


def speaker_feature_set(model: LoadedModel, models: dict[str, str] | None = None) -> tuple["FeatureSet", dict]:
    """The extractors of the model's inputs, rebuilt from the snapshot manifest; (set, policy).

    Each rebuilt extractor must describe itself exactly as in the manifest (type, options,
    width, dtype, model sha256), so a new clip gets the numbers the model was trained on.
    """
    if model.snapshot is None:
        raise GenerationError(f"cannot tell which features {model.uri} consumes: it has no snapshot_uri tag. "
                              "Pass --features SNAPSHOT_URI (the snapshot it was trained on)")
    recorded = model.snapshot.manifest.feature_set
    extractors = recorded.config.get("extractors", {})
    # Model files: --feature-model overrides, else the URIs the extraction recorded.
    stray = sorted(set(models or {}) - set(extractors))
    if stray:
        raise GenerationError(f"--feature-model {stray[0]}=...: the model's feature set has no extractor "
                              f"{stray[0]!r} (extractors: {', '.join(extractors)})")
    try:
        full, policy = feature_set_from_manifest(model.snapshot.manifest, models)
    except config_mod.ConfigError as exc:
        raise GenerationError(f"rebuilding the feature set of snapshot {model.snapshot.id}: {exc} "
                              "(with `reactdiff generate`, name model files with --feature-model NAME=URI)") from None
    by_column = {e.column: e for e in full.extractors}
    missing = [c for c in model.inputs if c not in by_column]
    if missing:
        raise GenerationError(f"{model.uri} consumes {missing}, which snapshot {model.snapshot.id}'s feature set "
                              f"does not produce ({', '.join(by_column)}); pass --features with the model's snapshot")
    needed: list[Extractor] = [by_column[c] for c in model.inputs]
    resolved = recorded.resolved.get("extractors", {})
    for e in needed:
        try:
            e.resolve()
        except config_mod.ConfigError as exc:
            raise GenerationError(f"{exc} (name the file with --feature-model {e.name}=URI)") from None
        want = resolved.get(e.name)
        if want is not None and _comparable(e.describe()) != _comparable(want):
            raise GenerationError(f"extractor {e.name!r} rebuilt here differs from the one snapshot "
                                  f"{model.snapshot.id} was extracted with ({_diff(e.describe(), want)}); "
                                  f"pass --feature-model {e.name}=URI with the same model file")
    return FeatureSet(full.name, needed, full.sample_rate, full.source, full.raw), policy


def _comparable(desc: dict) -> str:
    return json.dumps(desc, sort_keys=True, default=str)


def _diff(have: dict, want: dict) -> str:
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return ", ".join(f"{k}: {have.get(k)!r} here vs {want.get(k)!r}" for k in keys[:3])


# ---------------------------------------------------------------------------------------------
# One speaker clip: checks and features
# ---------------------------------------------------------------------------------------------

@dataclass
class SpeakerClip:
    video: str
    audio: str | None = None           # audio file; None: the video's own audio stream (if it has one)
    attributes: str | None = None      # Emotion csv
    tdmm: str | None = None            # 3D_FV npy

    def check_video(self) -> tuple[int, float, tuple[int, int], bool]:
        """(frames at 25 fps, source fps, upright (h, w), has_audio); GenerationError when
        unreadable or not face-sized."""
        import av

        try:
            timeline = media.video_timeline(self.video)
        except media.ClipError as exc:
            raise GenerationError(f"speaker video {exc.uri}: {exc.reason} — pass a readable video file "
                                  "(mp4, H.264) of the speaker's face") from None
        h, w = timeline.height, timeline.width
        if min(h, w) < MIN_FACE_PIXELS:
            raise GenerationError(f"speaker video {self.video} is {w}x{h} pixels: no face-sized frame (at least "
                                  f"{MIN_FACE_PIXELS}x{MIN_FACE_PIXELS}; REACT face crops are 256x256)")
        fs, path = storage.filesystem(self.video)
        try:
            with fs.open(path, "rb") as f, av.open(f) as container:
                has_audio = bool(container.streams.audio)
        except av.FFmpegError as exc:
            raise GenerationError(f"speaker video {self.video}: cannot decode ({exc})") from None
        return len(timeline.resample(react.FPS)), round(timeline.fps, 3), (h, w), has_audio


def _check_length(video: str, frames: int) -> None:
    if frames < MIN_SECONDS * react.FPS:
        raise GenerationError(f"speaker clip {video} is {frames / react.FPS:.2f} s long ({frames} frames at "
                              f"{react.FPS} fps); reactions need at least {MIN_SECONDS:g} s of the speaker")


def speaker_face(speaker: SpeakerClip, mode: str, box: str | None, size: tuple[int, int],
                 frames: int) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Crop boxes (pipeline.data.face_crop) for the speaker's 25-fps frames, or None for the
    whole frame; and what was done. ``auto``: a square frame is taken as a face crop already
    (REACT's videos are 256x256 crops), any other frame is searched."""
    h, w = size
    if box is not None:
        parsed = face_crop.parse_face_box(box)
        try:
            boxes = face_crop.fixed_boxes(parsed, frames, h, w)
        except ValueError as exc:
            raise GenerationError(f"--face-box: {exc}") from None
        return boxes, {"mode": "face-box", "face_box": list(parsed)}
    if mode == "off" or (mode == "auto" and h == w):
        why = "--face-crop off" if mode == "off" else "a square frame: taken as a face crop already (as REACT's)"
        return None, {"mode": "whole frame", "why": why}
    try:
        video, report = face_crop.open_face_video(speaker.video, react.FPS)
    except ValueError as exc:
        raise GenerationError(f"speaker video {storage.redact(speaker.video)} ({w}x{h}): {exc}") from None
    except media.ClipError as exc:
        raise GenerationError(f"speaker video {storage.redact(exc.uri)}: {exc.reason}") from None
    video.close()
    log.info("face found in %d of %d frames searched; crop %s px, jitter %.2f -> %.2f px after smoothing",
             report["found"], report["searched"], report["crop_side_px"], report["jitter_px"],
             report["smoothed_jitter_px"])
    return video.boxes, {"mode": "detected", **report}


def extract_speaker(model: LoadedModel, speaker: SpeakerClip, feature_models: dict[str, str] | None = None,
                    device: str = "cpu", video_info: tuple | None = None,
                    face_boxes: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The speaker's features {column: float32 [T, D]}, computed by the extraction job's code.

    Uses ``pipeline.data.clip.extract_clip`` (``decode_clip`` with the CPU extractors, then the
    job's network stages for TorchScript/wav2vec2 extractors) — the very code that built the
    snapshot — on the clip read at 25 fps by timestamps, cropped to ``face_boxes`` when given.
    ``video_info``: the result of ``speaker.check_video()`` when the caller already has it.
    """
    frames, fps, (h, w), has_audio = video_info or speaker.check_video()
    feature_set, policy = speaker_feature_set(model, feature_models)
    info: dict[str, Any] = {"video_frames": frames, "video_fps": fps, "video_size": [w, h],
                            "video_has_audio": has_audio, "audio": None}
    acoustic = [e.column for e in feature_set.acoustic]
    if acoustic:
        if speaker.audio is None and not has_audio:
            raise GenerationError(f"the model listens to the speaker ({', '.join(acoustic)}) but {speaker.video} "
                                  "has no audio stream: pass --speaker-audio FILE (wav, mp3, m4a...)")
        info["audio"] = speaker.audio or speaker.video
    labels = {e.type: e for e in feature_set.labels}
    for kind, flag, uri in (("emotion", "--speaker-attributes", speaker.attributes),
                            ("tdmm", "--speaker-3dmm", speaker.tdmm)):
        if kind in labels and not uri:
            raise GenerationError(f"the model consumes the speaker's {kind} labels: pass {flag} FILE")

    clip = react.Clip(clip_id="speaker", split="", site="", session="", role="", index="",
                      video=speaker.video, video_format="mp4", audio=info["audio"],
                      emotion=speaker.attributes, tdmm=speaker.tdmm)
    # A recording's frame count is its own (never the dataset's fixed one), and its sound may
    # start or end up to a second off the picture (cameras, phones): the audio is fitted to it.
    policy = {**policy, "frames": None, "frame_tolerance": max(int(policy.get("frame_tolerance", 2)), react.FPS)}
    try:
        out = clip_features.extract_clip(clip, feature_set, **policy, device=device, face_boxes=face_boxes)
    except ClipError as exc:
        hint = " (pass --speaker-audio FILE)" if exc.stage == "decode_audio" else ""
        raise GenerationError(f"speaker clip: {exc.stage}: {storage.redact(exc.uri)}: {exc.reason}{hint}") from None
    info["frames"] = int(out["num_frames"])
    features = {c: np.asarray(out[c], dtype=np.float32) for c in model.inputs}
    return features, info


def speaker_video_frames(video: str, boxes: np.ndarray | None, size: int):
    """The speaker's 25-fps frames as the model saw them (the face crop, or the whole upright
    frame), for the side-by-side video; ``render`` scales them to its size."""
    recording = media.Recording(video, react.FPS, boxes, size=size)
    try:
        for start in range(0, recording.num_frames, 64):
            yield from recording.frames(start, min(start + 64, recording.num_frames))
    finally:
        recording.close()


# ---------------------------------------------------------------------------------------------
# REACT outputs
# ---------------------------------------------------------------------------------------------

def clean_emotion(emotion: np.ndarray, binarize: bool = False) -> tuple[np.ndarray, dict[str, int]]:
    """Raw generated attributes [.., 25] → valid REACT attributes, and what had to change.

    AUs clipped to [0, 1] (or rounded at 0.5 with ``binarize``), valence/arousal clipped to
    [-1, 1], expressions clipped at 0 and renormalised to sum to 1 (uniform if none positive).
    """
    e = np.array(emotion, dtype=np.float32, copy=True)
    if not np.isfinite(e).all():
        raise GenerationError("the model produced NaN or infinite attributes; the checkpoint is broken "
                              "(retrain or pick another version)")
    stats = {"au_clipped": int(((e[..., AU] < 0) | (e[..., AU] > 1)).sum()),
             "va_clipped": int((np.abs(e[..., VALENCE_AROUSAL]) > 1).sum())}
    e[..., AU] = np.clip(e[..., AU], 0.0, 1.0)
    if binarize:
        e[..., AU] = (e[..., AU] >= 0.5).astype(np.float32)
    e[..., VALENCE_AROUSAL] = np.clip(e[..., VALENCE_AROUSAL], -1.0, 1.0)
    p = np.clip(e[..., EXPRESSION], 0.0, None)
    total = p.sum(axis=-1, keepdims=True)
    empty = total[..., 0] <= 1e-12
    stats["expression_frames_renormalised"] = int(np.count_nonzero(np.abs(total[..., 0] - 1.0) > 1e-6))
    stats["expression_frames_uniform"] = int(empty.sum())
    p = np.where(empty[..., None], 1.0 / p.shape[-1], p / np.maximum(total, 1e-12))
    e[..., EXPRESSION] = p
    return e, stats


def pad_frames(x: np.ndarray, frames: int) -> np.ndarray:
    """[.., T, D] → [.., frames, D]: crop, or repeat the last frame (T=750 → REACT's 751)."""
    t = x.shape[-2]
    if t >= frames:
        return x[..., :frames, :]
    reps = np.repeat(x[..., -1:, :], frames - t, axis=-2)
    return np.concatenate([x, reps], axis=-2)


def attributes_csv(emotion: np.ndarray, binarized: bool = False) -> str:
    """[T, 25] → REACT Emotion csv text: the official header, one row per frame."""
    if emotion.ndim != 2 or emotion.shape[1] != react.EMOTION_DIM:
        raise ValueError(f"attributes must be [T, {react.EMOTION_DIM}], got {emotion.shape}")
    lines = [",".join(react.EMOTION_COLUMNS)]
    for row in emotion:
        aus = ",".join(str(int(v)) if binarized else f"{v:.6f}" for v in row[AU])
        rest = ",".join(f"{v:.6f}" for v in row[15:])
        lines.append(f"{aus},{rest}")
    return "\n".join(lines) + "\n"


def write_local_or_remote(out_uri: str, name: str, writer) -> str:
    """Run ``writer(local_path)`` and put the file at ``out_uri/name`` (uploaded if remote)."""
    target = storage.join(out_uri, name)
    if not storage.is_remote(out_uri):
        os.makedirs(os.path.dirname(storage.filesystem(target)[1]), exist_ok=True)
        writer(storage.filesystem(target)[1])
        return target
    with tempfile.TemporaryDirectory(prefix="reactdiff-generate-") as tmp:
        local = os.path.join(tmp, os.path.basename(name))
        writer(local)
        with open(local, "rb") as f:
            storage.write_bytes(target, f.read())
    return target


@dataclass
class ClipResult:
    out: str
    files: dict[str, list[str]]          # kind -> URIs: attributes, tdmm, plot, video, summary
    emotion: np.ndarray                  # [K, frames, 25] as written (cleaned, padded)
    tdmm: np.ndarray                     # [K, frames, 58] absolute FaceVerse coefficients
    summary: dict[str, Any]


def generate_clip(cfg: GenerateConfig) -> ClipResult:
    """Features of one speaker clip → K reactions → REACT files, plot and video under ``cfg.out``."""
    import torch

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    speaker = SpeakerClip(cfg.speaker_video, cfg.speaker_audio, cfg.speaker_attributes, cfg.speaker_3dmm)
    speaker_emotion = None
    if speaker.attributes:   # read first: a bad csv should fail before minutes of work
        try:
            speaker_emotion = react.read_emotion(speaker.attributes)
        except react.ReactLayoutError as exc:
            raise GenerationError(f"--speaker-attributes {exc.uri}: {exc.reason}") from None
    if speaker.tdmm:
        try:
            react.read_tdmm(speaker.tdmm)
        except react.ReactLayoutError as exc:
            raise GenerationError(f"--speaker-3dmm {exc.uri}: {exc.reason}") from None
    try:
        renderer = render.load_renderer(cfg.renderer, size=cfg.face_size) if cfg.video else None
    except ValueError as exc:
        raise GenerationError(f"--renderer: {exc}") from None
    video_info = speaker.check_video()   # before the model: a bad video fails in a second

    t0 = time.perf_counter()
    model = load_model(cfg.model, cfg.features, device=device)
    timings["load_model_s"] = time.perf_counter() - t0
    log.info("model %s (%s), inputs %s", cfg.model,
             f"{model.version.name} v{model.version.version}" if model.version else "file", model.inputs)

    _check_length(speaker.video, video_info[0])

    t0 = time.perf_counter()
    face_boxes, face = speaker_face(speaker, cfg.face_crop, cfg.face_box, video_info[2], video_info[0])
    timings["face_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    features, info = extract_speaker(model, speaker, cfg.feature_models, device, video_info, face_boxes)
    timings["features_s"] = time.perf_counter() - t0
    frames = info["frames"]
    _check_length(speaker.video, frames)
    out_frames = frames   # the whole clip; REACT's 751 = the model's 750 + 1 repeated
    log.info("speaker features %s for %d frames; generating %d reactions", list(features), frames, cfg.samples)

    t0 = time.perf_counter()
    raw_emotion, tdmm, windowing = generate_reactions(model.generator, features, frames, samples=cfg.samples,
                                                      seed=cfg.seed, sampling=cfg.sampling())
    timings["generate_s"] = time.perf_counter() - t0
    if not np.isfinite(tdmm).all():
        raise GenerationError("the model produced NaN or infinite 3DMM coefficients; the checkpoint is broken")
    emotion, fixes = clean_emotion(raw_emotion, cfg.binarize)
    generated = emotion.shape[1]
    emotion, tdmm = pad_frames(emotion, out_frames), pad_frames(tdmm, out_frames).astype(np.float32)

    out = cfg.out or storage.join(_workspace_outputs(), f"generate-{time.strftime('%Y%m%d-%H%M%S')}")
    files: dict[str, list[str]] = {"attributes": [], "tdmm": [], "plot": [], "video": []}
    t0 = time.perf_counter()
    for k in range(cfg.samples):
        uri = storage.join(out, f"reaction_{k:02d}.csv")
        storage.write_text(uri, attributes_csv(emotion[k], cfg.binarize))
        files["attributes"].append(uri)
        uri = storage.join(out, f"reaction_{k:02d}.npy")
        storage.write_npy(uri, tdmm[k])
        files["tdmm"].append(uri)
    timings["write_s"] = time.perf_counter() - t0

    if cfg.plot:
        t0 = time.perf_counter()
        title = (f"{cfg.samples} reactions to {os.path.basename(speaker.video)} — "
                 f"{model.describe()['name'] or 'model'} v{model.describe()['version'] or '?'}, seed {cfg.seed}")
        png = plots.reaction_plot_png(emotion, speaker_emotion, title=title)
        uri = storage.join(out, "reactions.png")
        storage.write_bytes(uri, png)
        files["plot"].append(uri)
        timings["plot_s"] = time.perf_counter() - t0

    if cfg.video:
        t0 = time.perf_counter()
        audio = None
        source = speaker.audio or (speaker.video if info["video_has_audio"] else None)
        if source:
            try:
                a = read_audio(source)
                audio = (a.samples, a.sample_rate)
            except ClipError as exc:
                log.warning("video without sound: %s", exc)
        k = cfg.video_sample
        name = f"reaction_{k:02d}.mp4"
        caption = f"generated reaction #{k}"
        uri = write_local_or_remote(out, name, lambda p: render.write_reaction_video(
            p, speaker_video_frames(speaker.video, face_boxes, renderer.size), emotion[k], tdmm[k],
            renderer=renderer, audio=audio, caption=caption))
        files["video"].append(uri)
        timings["video_s"] = time.perf_counter() - t0

    timings["total_s"] = time.perf_counter() - t_start
    notes = [f"the model generates {generated} frames; REACT clips have {out_frames}: "
             f"{out_frames - generated} last frame(s) repeat frame {generated - 1}" if out_frames > generated
             else f"{generated} generated frames written as they are",
             "expression probabilities (last 8 columns) clipped at 0 and renormalised to sum to 1 per frame",
             "AU occurrences " + ("binarised at 0.5" if cfg.binarize else "clipped to [0, 1]")
             + "; valence and arousal clipped to [-1, 1]",
             "3DMM files hold absolute FaceVerse v2 coefficients (mean_face added back)"]
    if windowing:
        notes.append(windowing)
    if face["mode"] == "detected":
        notes.append(f"face found in {face['found']} of {face['searched']} frames searched and tracked; the crop "
                     f"box is smoothed over 1 s (jitter {face['jitter_px']:.2f} -> {face['smoothed_jitter_px']:.2f} px)")
    summary = {"model": model.describe(), "speaker": {k: storage.redact(v) if isinstance(v, str) else v
                                                      for k, v in {**asdict(speaker), **info}.items()},
               "samples": cfg.samples, "seed": cfg.seed, "steps": cfg.steps, "binarize": cfg.binarize,
               "decoder_dropout": cfg.decoder_dropout, "guidance": _guidance(model.generator, cfg.guidance),
               "frames": {"generated": generated, "written": out_frames, "padded": out_frames - generated},
               "face": face, "fixes": fixes, "notes": notes, "renderer": cfg.renderer if cfg.video else None,
               "video_sample": cfg.video_sample if cfg.video else None, "timings": timings,
               "files": {k: [storage.redact(u) for u in v] for k, v in files.items()}}
    uri = storage.join(out, "generation.json")
    storage.write_json(uri, summary)
    files["summary"] = [uri]
    for note in notes[:1]:
        log.info(note)
    return ClipResult(out, files, emotion, tdmm, summary)


def _guidance(generator, asked: float | None) -> float:
    """The classifier-free guidance scale the reactions were sampled with (recorded in outputs)."""
    return float(model_description(generator, guidance=asked)["guidance"])


def _workspace_outputs() -> str:
    return runtime.workspace().outputs


# ---------------------------------------------------------------------------------------------
# A whole split: predictions Parquet for `reactdiff evaluate --predictions`
# ---------------------------------------------------------------------------------------------

@dataclass
class SplitResult:
    out: str
    items: int
    skipped: list[int]
    files: list[str]
    manifest: dict[str, Any]


def _with_ids(batch: dict[str, np.ndarray], pairs: dict[int, tuple[str, str]], seed: int) -> dict[str, np.ndarray]:
    """Add speaker, listener and the item's seed next to ``item`` and ``emotion``."""
    items = [int(i) for i in batch["item"]]
    batch["speaker"] = np.asarray([pairs[i][0] for i in items], dtype=object)
    batch["listener"] = np.asarray([pairs[i][1] for i in items], dtype=object)
    batch["seed"] = np.asarray([item_seed(seed, i) for i in items], dtype=np.int64)
    return batch


def generate_split(cfg: GenerateConfig) -> SplitResult:
    """K reactions for every item of ``cfg.split`` over Ray Data → Parquet predictions at ``cfg.out``.

    Written to a staging folder, then swapped in (old part files removed) and
    ``_predictions.json`` written last: a re-run replaces, never appends duplicate items.
    """
    t_start = time.perf_counter()
    runtime.init_ray(cfg.ray_address)
    model = load_model(cfg.model, cfg.features)      # one registry resolution: alias -> version
    if model.snapshot is None:
        raise GenerationError(f"which snapshot? {cfg.model} has no snapshot_uri tag: pass --features SNAPSHOT_URI")
    snapshot, generator = model.snapshot, model.generator
    try:
        items = snapshot.items(cfg.split)
    except SnapshotError as exc:
        raise GenerationError(str(exc)) from None
    missing = [c for c in model.inputs if c not in snapshot.features]
    if missing:
        raise GenerationError(f"{cfg.model} consumes {missing}, which snapshot {snapshot.id} lacks; "
                              "pass --features with a snapshot of the model's feature set")
    for k, item in enumerate(items):
        if int(item.index) != k:
            raise GenerationError(f"snapshot {snapshot.id}: items/{cfg.split} row {k} has index {item.index}")
    if cfg.max_items is not None:
        items = items[:cfg.max_items]
    available = set(available_items(snapshot, cfg.split, items))   # as evaluation
    skipped = [int(i.index) for k, i in enumerate(items) if k not in available]
    if skipped:
        log.warning("%d item(s) skipped: their speaker or listener clip was quarantined in %s (first: %s)",
                    len(skipped), snapshot.id, skipped[:5])
    todo = [i for k, i in enumerate(items) if k in available]
    if not todo:
        raise GenerationError(f"no item of {snapshot.id}/{cfg.split} has both clips extracted")

    out = cfg.out or storage.join(_workspace_outputs(), f"predictions-{cfg.split}-{snapshot.id}")
    staging = storage.join(out, f"_staging-{uuid.uuid4().hex[:8]}")
    size = actor_pool(cfg.actors, len(todo), cfg.batch_size)[0]
    log.info("generating %d reactions for %d items of %s/%s on %d actor(s) -> %s", cfg.samples, len(todo),
             snapshot.id, cfg.split, size, storage.redact(out))
    t0 = time.perf_counter()
    # The evaluation job's own pipeline: same actor pool, seeds (item_seed) and per-item generator
    # calls; the generator travels as its weights-only file bytes (never a pickled module).
    ds = predictions_dataset(generator, snapshot, todo, samples=cfg.samples, seed=cfg.seed,
                             sampling=cfg.sampling(), batch_size=cfg.batch_size, actors=cfg.actors,
                             frames=model.seq_len)
    ds = ds.map_batches(_with_ids, batch_format="numpy",
                        fn_kwargs={"pairs": {int(i.index): (i.speaker, i.listener) for i in todo},
                                   "seed": cfg.seed})
    fs, staging_path = storage.arrow_filesystem(staging)
    try:
        ds.write_parquet(staging_path, filesystem=fs)
    except Exception:
        storage.remove(staging)
        raise
    generate_s = time.perf_counter() - t0

    # Swap in: drop the previous run's part files, move the new ones up, manifest last.
    for name in storage.listdir(out):
        if name.endswith(".parquet"):
            storage.remove(storage.join(out, name))
    files = []
    for name in storage.listdir(staging):
        if name.endswith(".parquet"):
            target = storage.join(out, name)
            storage.write_bytes(target, storage.read_bytes(storage.join(staging, name)))
            files.append(target)
    storage.remove(staging)
    manifest = {
        "format": "reactdiff-predictions/1",
        "contract": "pipeline/evaluate/predictions.py: item int64, emotion float32 [K, T, 25] (raw generator output)",
        "model": model.describe(), "split": cfg.split, "samples": cfg.samples, "seed": cfg.seed,
        "steps": cfg.steps, "decoder_dropout": cfg.decoder_dropout, "guidance": _guidance(generator, cfg.guidance),
        "seeds": "item k uses pipeline.evaluate.protocol.item_seed(seed, k)",
        "items": len(todo), "items_in_split": len(snapshot.items(cfg.split)), "max_items": cfg.max_items,
        "skipped_items": skipped, "frames": model.seq_len,
        "files": [storage.redact(os.path.basename(f)) for f in files],
        "timings": {"generate_s": generate_s, "total_s": time.perf_counter() - t_start},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(storage.join(out, PREDICTIONS_MANIFEST), manifest)
    return SplitResult(out, len(todo), skipped, files, manifest)


def run_generation(cfg: GenerateConfig) -> ClipResult | SplitResult:
    """The ``reactdiff generate`` job: one speaker clip, or a whole snapshot split."""
    if not cfg.speaker_video:
        return generate_split(cfg)
    return _generate_clip_on_a_gpu_worker(cfg) if _clip_wants_a_gpu_task(cfg) else generate_clip(cfg)


def _clip_wants_a_gpu_task(cfg: GenerateConfig) -> bool:
    """One clip goes to a GPU worker only on a cluster (``ray job submit`` sets RAY_ADDRESS; the
    driver then sits on a CPU head) that has GPUs (or ``device=cuda``: an autoscaler adds one).
    A driver that holds a GPU itself (a RayJob with entrypointNumGpus, a GPU workstation)
    generates in place; without a cluster the clip is generated here, on CPU."""
    import torch

    if cfg.device == "cpu" or torch.cuda.is_available() or not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
        return False
    import ray

    runtime.init_ray(cfg.ray_address)
    return cfg.device == "cuda" or ray.cluster_resources().get("GPU", 0) >= 1


def _generate_clip_on_a_gpu_worker(cfg: GenerateConfig) -> ClipResult:
    import ray

    if not storage.is_remote(cfg.out or ""):
        log.warning("the clip is generated on a GPU worker: --out %s is a path on that worker's disk; "
                    "pass --out s3://... to get the files back", cfg.out or "(default)")
    # The job's runtime env reaches the task; MLflow's URI is passed too, for drivers started by
    # hand with RAY_ADDRESS (the worker resolves models:/... itself).
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}

    def on_gpu(cfg: GenerateConfig) -> tuple[ClipResult, list]:
        return generate_clip(cfg), [str(g) for g in ray.get_gpu_ids()]

    task = ray.remote(num_gpus=1, max_retries=0)(on_gpu)
    log.info("generating the clip on a GPU worker of the cluster")
    result, gpus = ray.get(task.options(runtime_env={"env_vars": env} if env else None).remote(cfg))
    log.info("generated on a GPU worker (GPU ids %s) -> %s", gpus, storage.redact(result.out))
    return result
