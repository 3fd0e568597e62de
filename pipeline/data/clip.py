"""One person clip's features, by the code path both extraction and generation run.

``decode_clip`` decodes a clip (pipeline.data.media) and runs the CPU extractors; the network
stages (``FacialNetworks``, ``AcousticNetworks``) run the TorchScript / wav2vec2 extractors on the
inputs it leaves (``_crops``, ``_audio_<rate>``). The extraction job (pipeline.data.extract) runs
the stages as Ray Data actor pools over many clips; ``extract_clip`` runs them in this process
for one clip (``reactdiff generate`` on a new speaker clip), so a new clip gets exactly the
numbers the snapshot holds.

A bad clip raises :class:`ClipError` (stage, file, reason): the job quarantines it with that.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data import media, react
from pipeline.data.features import FeatureSet
from pipeline.data.media import ClipError, audio_at, fit_frames, open_video, read_audio


# Row keys of a clip in the pipeline (the Clip's URIs get a _uri suffix: "emotion" and "tdmm"
# are also the label feature columns).
CLIP_FIELDS = {"clip_id": "clip_id", "split": "split", "site": "site", "session": "session", "role": "role",
               "index": "index", "video_uri": "video", "video_format": "video_format",
               "audio_uri": "audio", "emotion_uri": "emotion", "tdmm_uri": "tdmm"}
# What every clip reports back to the driver (small: no features).
SUMMARY_DEFAULTS: dict[str, Any] = {
    "clip_id": "", "split": "", "status": "ok", "stage": "", "error_uri": "", "reason": "",
    "content_hash": "", "num_frames": 0, "file": "", "bytes": 0, "column_bytes": "{}",
    "prepare_s": 0.0, "video_s": 0.0, "audio_s": 0.0, "network_s": 0.0, "write_s": 0.0, "peak_rss_mb": 0.0,
    "warnings": "",                # repairs made to the clip, one a line: ClipEntry.warnings in the manifest
}
MODALITY_FOLDERS = {"video": "Video_files", "audio": "Audio_files", "emotion": "Emotion", "tdmm": "3D_FV_files"}


@dataclass
class ClipPlan:
    """How one clip becomes features: the feature set and the job's frame policy."""

    features: FeatureSet
    fps: float = 25.0
    frames: int | None = None          # crop/pad to this many frames; None: the video's own count
    frame_tolerance: int = 2           # modalities may differ by this many frames (pad/crop)
    decode_chunk: int = 64             # frames decoded at once (memory per task)
    root: str = ""                     # dataset root: names the expected file of a missing one
    max_pad_fraction: float = 0.0      # a video this much (of the labels' frames) short is padded
    face_crop: bool = False            # videos are not face crops: detect, track and crop the face
    face_boxes: np.ndarray | None = None   # precomputed crop boxes (one clip: reactdiff generate)


def peak_rss_mb() -> float:
    """Peak resident memory of this worker process so far (MB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def clip_row(clip: react.Clip) -> dict[str, Any]:
    """A clip's row in the pipeline: its CLIP_FIELDS, a missing URI as ""."""
    return {k: (getattr(clip, attr) or "") for k, attr in CLIP_FIELDS.items()}


def _missing(plan: ClipPlan, row: dict, modality: str) -> ClipError:
    folder = MODALITY_FOLDERS[modality]
    suffix = {"video": "" if row.get("video_format") == "png" else ".mp4", "audio": ".wav",
              "emotion": ".csv", "tdmm": ".npy"}[modality]
    expected = storage.join(plan.root, row["split"], folder, row["clip_id"] + suffix)
    stage = {"video": "decode_video", "audio": "decode_audio"}.get(modality, "labels")
    return ClipError(stage, expected, f"missing {modality} file (no {folder}/{row['clip_id']}{suffix} "
                     "in the dataset)")


def read_labels(kind: str, uri: str) -> np.ndarray:
    """A clip's Emotion ([T, 25]) or 3DMM ([T, 58]) labels (pipeline.data.react), a bad file as ClipError."""
    try:
        return react.read_emotion(uri) if kind == "emotion" else react.read_tdmm(uri)
    except react.ReactLayoutError as exc:
        raise ClipError("labels", exc.uri, exc.reason) from None
    except Exception as exc:
        what = "Emotion csv" if kind == "emotion" else "3DMM npy"
        raise ClipError("labels", uri, f"cannot read {what} ({media._short(exc)})") from None


def decode_clip(row: dict[str, Any], plan: ClipPlan) -> dict[str, Any]:
    """Decode one clip and run the CPU extractors -> {column: [T, D]} plus network inputs.

    Network inputs travel to the actor stages as ``_crops`` (uint8 [T, 224, 224, 3], only when
    a facial network is in the set) and ``_audio_<rate>`` (float32 waveform).
    """
    import torch

    opened: list = []
    threads = torch.get_num_threads()
    # One torch thread, whoever calls. In the job: Ray runs one task per CPU, and torch's own
    # thread pool on top would oversubscribe the cores. In-process (`reactdiff generate`): another
    # thread count changes float summation order, and a new speaker's features must equal what
    # the job computes, bit for bit (the CPU extractors are cheap; decoding dominates).
    torch.set_num_threads(1)
    try:
        return _decode_clip(row, plan, opened)
    finally:
        torch.set_num_threads(threads)
        for video in opened:   # one reader per task, released even when a check fails
            video.close()


def _decode_clip(row: dict[str, Any], plan: ClipPlan, opened: list) -> dict[str, Any]:
    fs = plan.features
    warnings: list[str] = []
    counts: dict[str, tuple[float, str]] = {}       # modality -> (frames, uri)
    labels = {}
    for e in fs.labels:
        uri = row.get(f"{e.type}_uri")
        if not uri:
            raise _missing(plan, row, e.type)
        arr = read_labels(e.type, uri)
        labels[e] = e.label_features(arr)
        counts[e.type] = (len(arr), uri)
    video = audio = None
    if fs.facial:
        if not row.get("video_uri"):
            raise _missing(plan, row, "video")
        video = _open_video(row["video_uri"], row.get("video_format") or "mp4", plan, warnings)
        opened.append(video)
        counts["video"] = (video.num_frames, row["video_uri"])
    if fs.acoustic:
        if not row.get("audio_uri"):
            raise _missing(plan, row, "audio")
        audio = read_audio(row["audio_uri"])
        counts["audio"] = (audio.seconds * plan.fps, row["audio_uri"])

    # Frame count T: the configured one, else the video's, else the labels', else the audio's.
    order = ("video", "emotion", "tdmm", "audio")
    frames = plan.frames or next(int(round(counts[m][0])) for m in order if m in counts)
    short = _video_short_of_labels(counts, plan)
    if short:
        frames = plan.frames or frames + short
        counts["video"] = (counts["video"][0] + short, counts["video"][1])
        warnings.append(f"video has {frames - short} frames, the labels {frames}: padded by repeating "
                        f"its last frame {short} time(s)")
    off = [m for m, (n, _) in counts.items()
           if abs(n - frames) > plan.frame_tolerance + (0.5 if m == "audio" else 0)]
    if off:
        listing = ", ".join(f"{m} {c:.0f}" for m, (c, _) in counts.items())
        # Name the odd file out: the only file whose count the clip's other files disagree on.
        votes = Counter(int(round(c)) for c, _ in counts.values())
        majority, agree = votes.most_common(1)[0]
        odd = [m for m, (c, _) in counts.items() if int(round(c)) != majority]
        modality = odd[0] if agree > 1 and len(odd) == 1 and not plan.frames else off[0]
        n, uri = counts[modality]
        have = f"{n:.1f}" if modality == "audio" else str(int(n))
        if modality in odd and modality not in off:      # T came from this file: the others are off
            reason = f"{modality} has {have} frames but the clip's other files have {majority}"
        else:
            reason = f"{modality} has {have} frames but the clip has {frames}"
        raise ClipError("frames", uri, f"{reason} (tolerance {plan.frame_tolerance}; {listing})")

    out: dict[str, Any] = {"num_frames": frames, "warnings": "\n".join(warnings)}
    for e, arr in labels.items():
        out[e.column] = fit_frames(arr, frames)
    t_audio = time.perf_counter()
    if audio is not None:
        rates = {e.sample_rate(fs.sample_rate) for e in fs.acoustic}
        # Resample from the file's own rate once per target rate (16 kHz for wav2vec2).
        at_rate = {r: audio_at(audio, r) for r in rates}
        for e in fs.acoustic:
            rate = e.sample_rate(fs.sample_rate)
            if e.network:
                out[f"_audio_{rate}"] = at_rate[rate].samples
            else:
                out[e.column] = e.audio_features(at_rate[rate], frames, plan.fps)
    out["audio_s"] = time.perf_counter() - t_audio
    t_video = time.perf_counter()
    if video is not None:
        with video:
            cpu = [e for e in fs.facial if not e.network]
            parts: dict[Any, list] = {e: [] for e in cpu}
            nets = [e for e in fs.facial if e.network]
            crops_all = np.empty((video.num_frames, media.CROP, media.CROP, 3), np.uint8) if nets else None
            start = 0
            for crops in video.crops(plan.decode_chunk):
                for e in cpu:
                    parts[e].append(e.frame_features(crops))
                if crops_all is not None:
                    crops_all[start:start + len(crops)] = crops
                start += len(crops)
            for e in cpu:
                out[e.column] = fit_frames(np.concatenate(parts[e]), frames)
            if crops_all is not None:
                out["_crops"] = fit_frames(crops_all, frames)
    out["video_s"] = time.perf_counter() - t_video
    return out


def _open_video(uri: str, video_format: str, plan: ClipPlan, warnings: list[str]) -> media.FaceVideo:
    """The clip's face video at ``plan.fps``: REACT's own 25-fps mp4s and PNG folders as they are;
    a video of another rate resampled by timestamps (with a warning), one that is no face crop
    (``plan.face_crop`` / ``plan.face_boxes``) cropped to the tracked face (pipeline.data.face_crop)."""
    if video_format == "mp4" and plan.face_boxes is not None:
        return media.Recording(uri, plan.fps, plan.face_boxes)
    if video_format == "mp4" and plan.face_crop:
        from pipeline.data import face_crop

        try:
            video, report = face_crop.open_face_video(uri, plan.fps)
        except ValueError as exc:
            raise ClipError("face", uri, str(exc)) from None
        warnings.extend(report.get("warnings", []))
        return video
    video = open_video(uri, video_format)
    if video.fps is not None and abs(video.fps - plan.fps) > 0.01 * plan.fps:
        video.close()
        resampled = media.Recording(uri, plan.fps)
        warnings.append(f"video is {video.fps:g} fps: resampled to {plan.fps:g} fps by presentation "
                        f"timestamps ({video.num_frames} -> {resampled.num_frames} frames)")
        return resampled
    return video


def _video_short_of_labels(counts: dict[str, tuple[float, str]], plan: ClipPlan) -> int:
    """Frames to pad the video with: > 0 when it is short of labels that agree with each other
    (and the audio) by more than the tolerance but at most ``max_pad_fraction`` of them."""
    if "video" not in counts or plan.max_pad_fraction <= 0:
        return 0
    others = [int(round(n)) for m, (n, _) in counts.items() if m in ("emotion", "tdmm")]
    if not others or max(others) - min(others) > plan.frame_tolerance:
        return 0
    target = plan.frames or max(others)
    short = target - int(counts["video"][0])
    if short <= plan.frame_tolerance or short > plan.max_pad_fraction * target:
        return 0
    if "audio" in counts and abs(counts["audio"][0] - target) > plan.frame_tolerance + 0.5:
        return 0
    return short


def pick_device(preference: str) -> str:
    import torch

    if preference == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if preference == "cuda":
        raise RuntimeError("device: cuda but this worker has no CUDA device")
    return "cpu"


class NetworkStage:
    """Actor: loads its networks once, then runs them on each clip's network inputs."""

    def __init__(self, extractors, device: str, input_key: str):
        import torch

        self.device = pick_device(device)
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.extractors, self.input_key = extractors, input_key
        for e in extractors:
            e.load(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        row = to_row(batch)
        inputs = row.pop(self.input_key, None)
        if row["status"] != "ok" or inputs is None:
            return to_batch(row)
        t0 = time.perf_counter()
        self.current = self.extractors[0]
        try:
            self.apply(row, inputs)
        except Exception as exc:
            current = self.current
            row.update(status="error", stage=f"extract:{current.name}",
                       error_uri=row.get("video_uri") if current.kind == "facial" else row.get("audio_uri"),
                       reason=media._short(exc))
        row["network_s"] = float(row.get("network_s", 0.0)) + time.perf_counter() - t0
        row["peak_rss_mb"] = max(float(row.get("peak_rss_mb", 0.0)), peak_rss_mb())
        return to_batch(row)

    def apply(self, row: dict[str, Any], inputs) -> None:
        """Run the networks on one clip's inputs; their feature columns go into ``row``."""
        for e, values in self.run(inputs, int(row["num_frames"])):
            row[e.column] = values

    def run(self, inputs, frames):
        raise NotImplementedError


class FacialNetworks(NetworkStage):
    """TorchScript networks on 224 crops; the crops go to the device once for all networks."""

    def __init__(self, extractors, device: str):
        super().__init__(extractors, device, "_crops")

    def run(self, crops, frames):
        import torch

        step = min(e.options.frame_batch for e in self.extractors)
        outs: dict[Any, list] = {e: [] for e in self.extractors}
        with torch.inference_mode():
            for start in range(0, len(crops), step):
                x01 = torch.from_numpy(np.ascontiguousarray(crops[start:start + step])).to(self.device)
                x01 = x01.permute(0, 3, 1, 2).float().div_(255.0)
                for e in self.extractors:
                    self.current = e
                    outs[e].append(e.forward(x01))
        for e in self.extractors:
            yield e, np.concatenate(outs[e])


class AcousticNetworks(NetworkStage):
    """wav2vec2 on the 16 kHz waveform."""

    def __init__(self, extractors, device: str, rate: int):
        super().__init__(extractors, device, f"_audio_{rate}")
        self.rate = rate

    def run(self, samples, frames):
        audio = media.Audio(np.asarray(samples, np.float32), self.rate, self.rate, 1)
        for e in self.extractors:
            self.current = e
            yield e, e.audio_features(audio, frames, 0.0)


def network_stages(features: FeatureSet) -> list[tuple[type[NetworkStage], dict[str, Any]]]:
    """The network stages of a feature set in pipeline order, as (stage class, constructor
    kwargs without ``device``); empty when no extractor of the set is a network."""
    stages: list[tuple[type[NetworkStage], dict[str, Any]]] = []
    facial = [e for e in features.facial if e.network]
    if facial:
        stages.append((FacialNetworks, {"extractors": facial}))
    acoustic = [e for e in features.acoustic if e.network]
    if acoustic:
        stages.append((AcousticNetworks, {"extractors": acoustic,
                                          "rate": acoustic[0].sample_rate(features.sample_rate)}))
    return stages


def extract_clip(clip: react.Clip, features: FeatureSet, *, fps: float = 25.0, frames: int | None = None,
                 frame_tolerance: int = 2, decode_chunk: int = 64, device: str = "cpu",
                 face_boxes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One clip's features, in this process, by the job's own code path: ``decode_clip``
    (decoding and CPU extractors), then each network stage. No snapshot is written.

    Returns ``{column: [T, D]}`` for every extractor of ``features`` and ``"num_frames"`` (T,
    an int). A bad clip raises :class:`ClipError` (stage, file, reason), the error the job
    quarantines it with. ``face_boxes``: crop every (resampled) frame to these boxes
    (pipeline.data.face_crop; ``reactdiff generate`` on a recording). Resolve the feature set (``FeatureSet.resolve``) beforehand, as the job
    does; ``device`` is the network stages' (auto, cpu or cuda).
    """
    plan = ClipPlan(features, fps=fps, frames=frames, frame_tolerance=frame_tolerance, decode_chunk=decode_chunk,
                    face_boxes=face_boxes)
    out = decode_clip(clip_row(clip), plan)
    for cls, kwargs in network_stages(features):
        stage = cls(**kwargs, device=device)
        stage.apply(out, out.pop(stage.input_key))
    return {**{e.column: out[e.column] for e in features.extractors}, "num_frames": int(out["num_frames"])}


# Ray Data UDF adapters: batch_size=1, numpy batches <-> one row dict.


def to_row(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    row = {}
    for k, v in batch.items():
        item = v[0]
        row[k] = item.item() if isinstance(item, np.generic) else item
    return row


def to_batch(row: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            out[k] = v[np.newaxis]
        else:
            out[k] = np.array([v])
    return out

