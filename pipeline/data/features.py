"""Feature extractors: a small registry of named per-frame features, and feature sets.

Every extractor turns one clip into a [T, D] array (T = video frames at 25 fps) and declares
its output column, width D, storage dtype, kind (facial | acoustic | label) and whether it is a
network (runs batched in an actor pool, on a GPU when one is there). The reference features
(Hunan-Tiger/ReactDiff ``extract_feature.py``, see reference/model.md §2):

========================  ======  =========================================================
type                      width   what
========================  ======  =========================================================
``pixels``                1024    weightless face descriptor: 32x32 grayscale of the 224 crop
``torchscript``           any     any per-frame TorchScript network on 224 crops in [-1, 1]
                                  (reference: AU 49x512 = 25088, VA 64, FE 1408)
``mfcc``                  26      Kaldi MFCC per 40 ms frame at the native rate
``logmel``                64      log-mel, one window per video frame (hop = rate / fps)
``wav2vec2``              1536    wav2vec 2.0 last hidden state, two 20 ms vectors per frame
``emotion`` / ``tdmm``    25 / 58 labels: facial attributes and FaceVerse 3DMM
========================  ======  =========================================================

A feature set is a YAML mapping ``name -> {type, uri?, width?, options...}`` (jobs/configs/
features/). Its hash covers everything that changes the numbers (types, options, widths,
dtypes, sample rate, model file sha256s, :data:`FEATURES_VERSION`) and nothing that does not
(model URIs), so an incremental run knows which clips it can carry over.

Security: TorchScript and pickled checkpoints execute code. Model files are loaded only from
URIs the user names explicitly (``--model name=URI``), state dicts with
``torch.load(weights_only=True)``, and each file's sha256 is recorded in the manifest and
verified again in every worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline import config as config_mod
from pipeline import storage
from pipeline.data.media import CROP, Audio, fit_frames
from pipeline.data.react import FPS
from pipeline.data.snapshot import FeatureSpec, Manifest

log = logging.getLogger(__name__)

# Bump when a change in this file or in decode.py changes extracted numbers: it is part of
# every feature-set hash, so incremental runs re-extract instead of mixing old and new values.
FEATURES_VERSION = 1

FEATURE_SET_DIR = Path(__file__).resolve().parent / "feature_sets"   # package data
KINDS = ("facial", "acoustic", "label")


class FeatureSetError(config_mod.ConfigError):
    """A feature set is invalid (unknown type, missing model URI, bad option); names the extractor."""


# ---------------------------------------------------------------------------------------------
# The extractor interface


class Extractor:
    """One named per-frame feature. Subclasses set the class attributes and one compute method.

    - facial: ``frame_features(crops uint8 [n, 224, 224, 3]) -> [n, D]`` (called chunk by chunk)
    - acoustic: ``audio_features(audio at self.sample_rate(...), frames, fps) -> [T, D]``
    - label: ``label_features(array [T', D]) -> [T', D]``

    Instances are pickled into Ray tasks and actors before any weights are loaded; networks load
    in :meth:`load` inside the actor.
    """

    type: ClassVar[str]
    kind: ClassVar[str]
    dtype: ClassVar[str] = "float32"
    network: ClassVar[bool] = False           # batched in an actor pool (GPU when available)

    @dataclass
    class Options:
        pass

    def __init__(self, name: str, options: Any, uri: str | None = None, width: int | None = None):
        self.name, self.options, self.uri = name, options, uri
        self._width = width
        self.sha256: str | None = None       # model file hash, set by resolve()

    # -- declaration ------------------------------------------------------------------------------

    @property
    def column(self) -> str:
        if self.kind == "label":
            return self.name
        return f"{'video' if self.kind == 'facial' else 'audio'}_{self.name}"

    @property
    def width(self) -> int:
        if self._width is None:
            raise FeatureSetError(f"extractor {self.name!r}: width unknown; set width: in the feature set")
        return self._width

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.width, self.dtype, self.kind)

    @property
    def needs_gpu(self) -> bool:
        """Networks run in an actor pool on a GPU when the cluster has one (CPU otherwise)."""
        return self.network

    def describe(self) -> dict[str, Any]:
        """What determines this extractor's output (hashed; URIs are not part of it)."""
        return {"type": self.type, "column": self.column, "width": self.width, "dtype": self.dtype,
                "kind": self.kind, "options": dataclasses.asdict(self.options), "model_sha256": self.sha256}

    def resolve(self) -> None:
        """Driver-side checks before the job starts (model hashes, widths)."""

    def load(self, device: str = "cpu") -> None:
        """Load weights (networks only; called once per actor)."""

    def sample_rate(self, feature_set_rate: int) -> int:
        return feature_set_rate

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r} -> {self.column} [T, {self._width}] {self.dtype})"


REGISTRY: dict[str, type[Extractor]] = {}


def register(cls: type[Extractor]) -> type[Extractor]:
    REGISTRY[cls.type] = cls
    return cls


# ---------------------------------------------------------------------------------------------
# Facial


@register
class Pixels(Extractor):
    """Weightless face descriptor: the 224 reference crop, grayscale, area-downsampled to
    ``size`` x ``size``, scaled to [-1, 1]. Lets the CPU demo learn from real video content."""

    type, kind, dtype = "pixels", "facial", "float16"

    @dataclass
    class Options:
        size: int = 32
        grayscale: bool = True

        def validate(self):
            if not 1 <= self.size <= CROP:
                raise config_mod.ConfigError(f"size must be in 1..{CROP}, got {self.size}")

    def __init__(self, name, options, uri=None, width=None):
        channels = 1 if options.grayscale else 3
        super().__init__(name, options, uri, options.size * options.size * channels)

    def frame_features(self, crops: np.ndarray) -> np.ndarray:
        n, h, w, _ = crops.shape
        s = self.options.size
        if h == w and h % s == 0:
            # Area average with Pillow's box reduce (C, rounded to 8 bits: +-0.004 here), on the
            # chunk stacked into one tall image (blocks never straddle frames since s divides h):
            # this runs on every decoded frame and is ~2x faster than numpy block sums.
            from PIL import Image

            tall = Image.fromarray(np.ascontiguousarray(crops).reshape(n * h, w, 3))
            x = np.asarray(tall.reduce(h // s)).reshape(n, s, s, 3).astype(np.float32)
        else:
            import torch

            t = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
            x = torch.nn.functional.adaptive_avg_pool2d(t, s).permute(0, 2, 3, 1).numpy()
        if self.options.grayscale:
            x = x @ np.array([0.299, 0.587, 0.114], np.float32)                # ITU-R 601 luma
        x = x / 127.5 - 1.0
        return x.reshape(n, -1).astype(np.float16)


@register
class TorchScriptNetwork(Extractor):
    """Any per-frame TorchScript network on 224 centre crops, batched, on GPU when present.

    The reference feeds its three facetorch networks [-1, 1]-normalised crops
    (``normalize: reference``); ``imagenet`` is facetorch's own preprocessing. A network returning
    a tuple/list contributes element ``output_index``; the output is flattened per frame
    (e.g. AU tokens 49 x 512 -> 25088).
    """

    type, kind, dtype, network = "torchscript", "facial", "float16", True

    @dataclass
    class Options:
        normalize: str = "reference"
        output_index: int = 0
        frame_batch: int = 64

        def validate(self):
            if self.normalize not in ("reference", "imagenet"):
                raise config_mod.ConfigError(f"normalize must be reference or imagenet, got {self.normalize!r}")
            if self.frame_batch < 1:
                raise config_mod.ConfigError("frame_batch must be >= 1")

    def resolve(self) -> None:
        self.sha256 = _model_sha256(self)
        if self._width is None:  # probe once on the driver: one black crop through the network
            self.load("cpu")
            out = self.frame_features(np.zeros((1, CROP, CROP, 3), np.uint8))
            self._width = int(out.shape[1])
            log.info("extractor %s: probed output width %d", self.name, self._width)
            self._model = None

    def load(self, device: str = "cpu") -> None:
        import torch

        data = _read_model(self)
        self.device = device
        with warnings.catch_warnings():   # torch 2.14 marks TorchScript deprecated; the models are TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self._model = torch.jit.load(io.BytesIO(data), map_location=device).eval()

    def frame_features(self, crops: np.ndarray) -> np.ndarray:
        import torch

        outs = []
        with torch.inference_mode():
            for start in range(0, len(crops), self.options.frame_batch):
                x = torch.from_numpy(crops[start:start + self.options.frame_batch]).to(self.device)
                x = x.permute(0, 3, 1, 2).float().div_(255.0)
                outs.append(self.forward(x))
        return np.concatenate(outs) if outs else np.zeros((0, self.width), np.float16)

    def forward(self, x01) -> np.ndarray:
        """[n, 3, 224, 224] float in [0, 1] (on the model's device) -> float16 [n, D]."""
        import torch

        if self.options.normalize == "reference":
            x = (x01 - 0.5) / 0.5                                   # Normalize(mean 0.5, std 0.5)
        else:
            mean = torch.tensor([0.485, 0.456, 0.406], device=x01.device).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], device=x01.device).view(1, 3, 1, 1)
            x = (x01 - mean) / std
        out = self._model(x)
        if isinstance(out, (tuple, list)):
            out = out[self.options.output_index]
        out = out.reshape(x.shape[0], -1)
        if self._width is not None and out.shape[1] != self._width:
            raise ValueError(f"network {self.name!r} returned {out.shape[1]} values per frame; "
                             f"the feature set declares width {self._width}")
        return out.to(torch.float16).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Acoustic


@register
class Mfcc(Extractor):
    """Kaldi-compatible MFCC, one 40 ms frame per video frame, exactly as the reference:
    audio at its native rate, cropped/zero-padded to T x int(rate / fps) samples, cut into T
    non-overlapping chunks, ``torchaudio.compliance.kaldi.mfcc`` per chunk with frame length =
    frame shift = chunk, 26 mel bins, 26 cepstra, use_energy, dither 0, other Kaldi defaults
    (pre-emphasis 0.97, povey window, lifter 22)."""

    type, kind, dtype = "mfcc", "acoustic", "float32"

    @dataclass
    class Options:
        num_ceps: int = 26
        num_mel_bins: int = 26
        use_energy: bool = True

    def __init__(self, name, options, uri=None, width=None):
        super().__init__(name, options, uri, options.num_ceps)

    def audio_features(self, audio: Audio, frames: int, fps: float) -> np.ndarray:
        import torch

        chunk = int(audio.sample_rate / fps)
        x = torch.from_numpy(_crop_or_pad(audio.samples, frames * chunk))
        frame_ms = 1000.0 / fps
        kwargs = dict(sample_frequency=float(audio.sample_rate), frame_length=frame_ms, frame_shift=frame_ms,
                      num_mel_bins=self.options.num_mel_bins, num_ceps=self.options.num_ceps,
                      use_energy=self.options.use_energy, dither=0.0)
        # Kaldi frames every window independently (DC removal, pre-emphasis, window, FFT per
        # frame), so one call over the whole signal with shift = length equals the reference's
        # per-chunk loop -- as long as Kaldi's own window size equals the chunk size.
        if int(audio.sample_rate * frame_ms * 0.001) == chunk:
            out = _kaldi_mfcc(x.unsqueeze(0), **kwargs)
        else:
            out = torch.cat([_kaldi_mfcc(c.unsqueeze(0), **kwargs) for c in x.split(chunk)])
        return out.numpy().astype(np.float32)


def mfcc_reference(samples: np.ndarray, sample_rate: int, frames: int, fps: float = 25.0,
                   num_ceps: int = 26, num_mel_bins: int = 26, use_energy: bool = True) -> np.ndarray:
    """The reference's per-chunk loop, one Kaldi call per 40 ms chunk (for tests and audits)."""
    import torch

    chunk = int(sample_rate / fps)
    x = torch.from_numpy(_crop_or_pad(samples, frames * chunk))
    rows = [_kaldi_mfcc(c.unsqueeze(0), sample_frequency=float(sample_rate), frame_length=1000.0 / fps,
                        frame_shift=1000.0 / fps, num_mel_bins=num_mel_bins, num_ceps=num_ceps,
                        use_energy=use_energy, dither=0.0)
            for c in x.split(chunk)]
    return torch.cat(rows).numpy()


def _kaldi_mfcc(waveform, **kwargs):
    from torchaudio.compliance import kaldi

    return kaldi.mfcc(waveform, **kwargs)


@register
class LogMel(Extractor):
    """Frame-aligned log-mel: hop = rate / fps, a Hann window of ``window_frames`` hops centred on
    the middle of each video frame, so row t describes [t / fps, (t + 1) / fps)."""

    type, kind, dtype = "logmel", "acoustic", "float32"

    @dataclass
    class Options:
        n_mels: int = 64
        window_frames: float = 2.0

        def validate(self):
            if self.window_frames < 1.0:
                raise config_mod.ConfigError("window_frames must be >= 1 (one hop)")

    def __init__(self, name, options, uri=None, width=None):
        super().__init__(name, options, uri, options.n_mels)
        self._transform = None

    def __getstate__(self):
        return {**self.__dict__, "_transform": None}

    def audio_features(self, audio: Audio, frames: int, fps: float) -> np.ndarray:
        import torch
        import torchaudio

        hop = int(audio.sample_rate / fps)
        win = max(hop, int(round(self.options.window_frames * hop)))
        n_fft = 1 << (win - 1).bit_length()
        key = (audio.sample_rate, hop)
        if self._transform is None or self._transform[0] != key:
            self._transform = (key, torchaudio.transforms.MelSpectrogram(
                sample_rate=audio.sample_rate, n_fft=n_fft, win_length=win, hop_length=hop,
                n_mels=self.options.n_mels, center=False, power=2.0))
        x = _crop_or_pad(audio.samples, frames * hop)
        # Frame t's window (centred in n_fft) must sit on the middle of video frame t: (t + 0.5) hop.
        left = n_fft // 2 - hop // 2
        right = (frames - 1) * hop + n_fft - left - len(x)
        x = np.pad(x, (left, max(0, right)))
        mel = self._transform[1](torch.from_numpy(x))[:, :frames]           # [n_mels, T]
        return torch.log(mel + 1e-6).T.contiguous().numpy().astype(np.float32)


@register
class Wav2Vec2(Extractor):
    """wav2vec 2.0 last hidden state, as the reference: 16 kHz audio normalised to zero mean and
    unit variance, the 50 Hz hidden states padded to an even count (last vector repeated),
    truncated to 2T and reshaped so each 40 ms video frame gets two 20 ms vectors -> 2 x 768.

    Weights: a state dict (``torch.load(weights_only=True)``, or ``.safetensors``) in torchaudio or
    Hugging Face naming (``facebook/wav2vec2-base-960h`` ``pytorch_model.bin``), or a dict
    ``{"config": {...wav2vec2_model kwargs}, "state_dict": {...}}``. Architecture: ``config``
    option or the file's config, else ``torchaudio.models.wav2vec2_base()``. Clips whose audio
    gives fewer than T row pairs are padded by repeating the last row (the reference would
    return T - 1 rows there).
    """

    type, kind, dtype, network = "wav2vec2", "acoustic", "float16", True
    RATE = 16000

    @dataclass
    class Options:
        config: dict[str, Any] | None = None     # torchaudio.models.wav2vec2_model kwargs
        normalize: bool = True

    def __init__(self, name, options, uri=None, width=None):
        # wav2vec2-base: 2 x 768; resolve() settles it from the model file's config.
        dim = int(options.config["encoder_embed_dim"]) if options.config else 768
        super().__init__(name, options, uri, width or 2 * dim)
        self._declared_width = width

    def sample_rate(self, feature_set_rate: int) -> int:
        return self.RATE

    def resolve(self) -> None:
        self.sha256 = _model_sha256(self)
        state = _load_state_dict(self)
        cfg = self.options.config or state.get("config")
        dim = int(cfg["encoder_embed_dim"]) if cfg else 768
        if self._declared_width is not None and self._declared_width != 2 * dim:
            raise FeatureSetError(f"extractor {self.name!r}: width {self._declared_width} but the model has "
                                  f"hidden size {dim} (width must be 2 x {dim})")
        self._width = 2 * dim

    def load(self, device: str = "cpu") -> None:
        import torchaudio

        state = _load_state_dict(self)
        cfg = self.options.config or state.get("config")
        if cfg:
            kwargs = {**_WAV2VEC2_NO_DROPOUT, **cfg, "aux_num_out": None}
            if kwargs.get("extractor_conv_layer_config") is not None:
                kwargs["extractor_conv_layer_config"] = [tuple(c) for c in kwargs["extractor_conv_layer_config"]]
            model = torchaudio.models.wav2vec2_model(**kwargs)
        else:
            model = torchaudio.models.wav2vec2_base()
        weights = _torchaudio_wav2vec2_keys(state["state_dict"])
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise FeatureSetError(f"extractor {self.name!r}: {self.uri} does not match the wav2vec2 "
                                  f"architecture (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                                  "pass options.config for non-base sizes")
        self.device = device
        self._model = model.eval().to(device)

    def audio_features(self, audio: Audio, frames: int, fps: float) -> np.ndarray:
        import torch

        if audio.sample_rate != self.RATE:
            raise ValueError(f"wav2vec2 needs {self.RATE} Hz audio, got {audio.sample_rate}")
        x = torch.from_numpy(audio.samples.astype(np.float32))
        if self.options.normalize:   # Wav2Vec2FeatureExtractor(do_normalize=True)
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        with torch.inference_mode():
            hidden, _ = self._model(x.unsqueeze(0).to(self.device))
        h = hidden[0].float().cpu().numpy()                                   # [L, dim] at 50 Hz
        if len(h) % 2:
            h = np.concatenate([h, h[-1:]])
        h = h[: 2 * frames].reshape(-1, 2 * h.shape[1])
        return fit_frames(h, frames).astype(np.float16)


_WAV2VEC2_NO_DROPOUT = dict(encoder_projection_dropout=0.0, encoder_attention_dropout=0.0,
                            encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_drop=0.0)


def _torchaudio_wav2vec2_keys(state: dict) -> dict:
    """Hugging Face wav2vec2 keys -> torchaudio keys (torchaudio's own keys pass through)."""
    if any(k.startswith("encoder.transformer.") for k in state):
        return {k: v for k, v in state.items() if not k.startswith("aux.")}
    out = {}
    for key, value in state.items():
        k = key[len("wav2vec2."):] if key.startswith("wav2vec2.") else key
        if k.startswith("feature_extractor."):
            out[k] = value
        elif k.startswith("feature_projection."):
            out["encoder." + k] = value
        elif k.startswith("encoder."):
            k = "encoder.transformer." + k[len("encoder."):]
            k = k.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
            k = k.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")
            out[k] = value
        # lm_head (CTC), masked_spec_embed, quantizer, project_*: not part of the hidden state
    return out


# ---------------------------------------------------------------------------------------------
# Labels


class _Label(Extractor):
    kind, dtype = "label", "float32"

    def __init__(self, name, options, uri=None, width=None):
        super().__init__(name, options, uri, self.WIDTH)

    def label_features(self, array: np.ndarray) -> np.ndarray:
        if array.ndim != 2 or array.shape[1] != self.WIDTH:
            raise ValueError(f"{self.type} labels have shape {array.shape}; expected (T, {self.WIDTH})")
        return array.astype(np.float32)


@register
class Emotion(_Label):
    """The 25 facial attributes per frame (15 AUs, valence, arousal, 8 expressions)."""
    type, WIDTH = "emotion", 25


@register
class Tdmm(_Label):
    """The 58 FaceVerse v2 3DMM coefficients per frame (T x 1 x 58 files squeezed)."""
    type, WIDTH = "tdmm", 58


# ---------------------------------------------------------------------------------------------
# Model files


def _read_model(ext: Extractor) -> bytes:
    if not ext.uri:
        raise FeatureSetError(f"extractor {ext.name!r} ({ext.type}) needs a model URI: pass --model "
                              f"{ext.name}=URI (or models.{ext.name} in the config). Only name files you "
                              "trust: TorchScript runs code.")
    try:
        data = storage.read_bytes(ext.uri)
    except FileNotFoundError:
        raise FeatureSetError(f"extractor {ext.name!r}: model file {storage.redact(ext.uri)} not found") from None
    digest = hashlib.sha256(data).hexdigest()
    if ext.sha256 is not None and digest != ext.sha256:
        raise FeatureSetError(f"extractor {ext.name!r}: {storage.redact(ext.uri)} changed during the job or "
                              f"since the snapshot recorded it (sha256 {digest[:12]} != {ext.sha256[:12]})")
    return data


def _model_sha256(ext: Extractor) -> str:
    return hashlib.sha256(_read_model(ext)).hexdigest()


def _load_state_dict(ext: Extractor) -> dict:
    """{"state_dict": ..., "config": ... | None} from a weights-only file."""
    data = _read_model(ext)
    if ext.uri.endswith(".safetensors"):
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError:
            raise FeatureSetError("reading .safetensors needs the safetensors package "
                                  "(pip install safetensors), or save the state dict with torch.save") from None
        return {"state_dict": load_safetensors(data), "config": None}
    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FeatureSetError(f"extractor {ext.name!r}: {storage.redact(ext.uri)} is not a weights-only "
                              f"state dict ({type(exc).__name__}: {str(exc)[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        return {"state_dict": obj["state_dict"], "config": obj.get("config")}
    if isinstance(obj, dict):
        return {"state_dict": obj, "config": None}
    raise FeatureSetError(f"extractor {ext.name!r}: {storage.redact(ext.uri)} holds a {type(obj).__name__}, "
                          "not a state dict")


def _crop_or_pad(samples: np.ndarray, length: int) -> np.ndarray:
    """Crop or zero-pad to ``length`` samples (the reference's treatment of the wav)."""
    x = np.asarray(samples, dtype=np.float32)
    if len(x) >= length:
        return np.ascontiguousarray(x[:length])
    return np.pad(x, (0, length - len(x)))


# ---------------------------------------------------------------------------------------------
# Feature sets


@dataclass
class FeatureSet:
    """An ordered set of extractors plus the audio rate the acoustic ones see."""

    name: str
    extractors: list[Extractor]
    sample_rate: int = 44100            # audio at other rates is resampled to this one
    source: str = ""                    # the YAML it came from
    raw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        columns = [e.column for e in self.extractors]
        dup = sorted({c for c in columns if columns.count(c) > 1})
        if dup:
            raise FeatureSetError(f"feature set {self.name!r}: duplicate columns {dup}")

    def of_kind(self, kind: str) -> list[Extractor]:
        return [e for e in self.extractors if e.kind == kind]

    @property
    def facial(self) -> list[Extractor]:
        return self.of_kind("facial")

    @property
    def acoustic(self) -> list[Extractor]:
        return self.of_kind("acoustic")

    @property
    def labels(self) -> list[Extractor]:
        return self.of_kind("label")

    @property
    def networks(self) -> list[Extractor]:
        return [e for e in self.extractors if e.network]

    def modalities(self) -> list[str]:
        """Which clip files this set reads: video, audio, emotion, tdmm."""
        out = []
        if self.facial:
            out.append("video")
        if self.acoustic:
            out.append("audio")
        out += [e.type for e in self.labels]
        return out

    @property
    def specs(self) -> dict[str, FeatureSpec]:
        return {e.column: e.spec for e in self.extractors}

    def resolve(self) -> None:
        """Hash model files and settle widths (driver side, before the job)."""
        for e in self.extractors:
            e.resolve()

    def describe(self, **policy: Any) -> dict[str, Any]:
        return {"version": FEATURES_VERSION, "name": self.name, "sample_rate": self.sample_rate,
                "extractors": {e.name: e.describe() for e in self.extractors}, "policy": policy}

    def hash(self, **policy: Any) -> str:
        """sha256 over what changes the numbers; ``policy`` adds job settings such as fps."""
        desc = self.describe(**policy)
        desc.pop("name")   # renaming a set does not change its features
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()

    def models(self) -> dict[str, dict[str, str]]:
        return {e.name: {"uri": storage.redact(e.uri), "sha256": e.sha256}
                for e in self.extractors if e.uri}


def build_extractor(name: str, spec: dict[str, Any]) -> Extractor:
    """One extractor from its YAML mapping ``{type, uri?, width?, options...}``."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise FeatureSetError(f"extractor {name!r}: expected a mapping with a type "
                              f"(one of {', '.join(sorted(REGISTRY))})")
    spec = dict(spec)
    kind = spec.pop("type")
    if kind not in REGISTRY:
        raise FeatureSetError(f"extractor {name!r}: unknown type {kind!r} (known: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[kind]
    uri = spec.pop("uri", None)
    width = spec.pop("width", None)
    if width is not None and (not isinstance(width, int) or width < 1):
        raise FeatureSetError(f"extractor {name!r}: width must be a positive integer, got {width!r}")
    try:
        options = config_mod.from_dict(cls.Options, spec, prefix=f"features.{name}")
    except config_mod.ConfigError as exc:
        raise FeatureSetError(f"extractor {name!r} ({kind}): {exc}") from None
    if not name.replace("_", "").isalnum():
        raise FeatureSetError(f"extractor name {name!r} must be letters, digits and _ (it names a column)")
    return cls(name, options, uri=uri, width=width)


def feature_set_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    bundled = FEATURE_SET_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    known = ", ".join(sorted(q.stem for q in FEATURE_SET_DIR.glob("*.yaml")))
    raise FeatureSetError(f"feature set not found: {name_or_path} (bundled: {known}; or a path to a .yaml file)")


def load_feature_set(name_or_path: str, models: dict[str, str] | None = None) -> FeatureSet:
    """A feature set from pipeline/data/feature_sets/<name>.yaml or a YAML path; ``models`` maps
    extractor names to model URIs (overriding ``uri:`` in the file)."""
    path = feature_set_path(name_or_path)
    data = config_mod.read_yaml(path)
    return feature_set_from_dict(data, models, source=str(path), default_name=path.stem)


def feature_set_from_dict(data: dict[str, Any], models: dict[str, str] | None = None, source: str = "",
                          default_name: str = "custom") -> FeatureSet:
    unknown = sorted(set(data) - {"name", "sample_rate", "extractors", "description"})
    if unknown:
        raise FeatureSetError(f"feature set {source or default_name}: unknown key {unknown[0]} "
                              "(valid: name, description, sample_rate, extractors)")
    specs = data.get("extractors") or {}
    if not isinstance(specs, dict) or not specs:
        raise FeatureSetError(f"feature set {source or default_name}: 'extractors' must be a non-empty "
                              "mapping name -> {type: ..., ...}")
    models = dict(models or {})
    stray = sorted(set(models) - set(specs))
    if stray:
        raise FeatureSetError(f"--model {stray[0]}=...: the feature set has no extractor {stray[0]!r} "
                              f"(extractors: {', '.join(specs)})")
    extractors = []
    for name, spec in specs.items():
        spec = dict(spec or {})
        if name in models:
            spec["uri"] = models[name]
        extractors.append(build_extractor(str(name), spec))
    rate = data.get("sample_rate", 44100)
    if not isinstance(rate, int) or rate < 8000:
        raise FeatureSetError(f"feature set {source or default_name}: sample_rate must be an integer >= 8000")
    missing = [e.name for e in extractors if e.network and not e.uri]
    if missing:
        raise FeatureSetError(f"feature set {data.get('name', default_name)!r}: extractor(s) {', '.join(missing)} "
                              f"need a model file: pass --model {missing[0]}=URI (local path or s3://). "
                              "Only name files you trust: TorchScript runs code.")
    return FeatureSet(str(data.get("name", default_name)), extractors, rate, source, data)


def feature_set_from_manifest(manifest: Manifest | dict[str, Any], models: dict[str, str] | None = None,
                              ) -> tuple[FeatureSet, dict[str, Any]]:
    """The feature set a snapshot was extracted with, rebuilt from its manifest, and the job's
    policy ``{fps, frames, frame_tolerance, decode_chunk}`` (the keyword arguments of
    ``pipeline.data.extract.extract_clip``), so a new clip gets the snapshot's numbers.

    Network extractors use the model files the extraction recorded, unless ``models``
    (extractor name -> URI) names others. Nothing is resolved here (``Extractor.resolve`` reads
    model files): resolve the extractors you use, and compare their ``describe()`` with
    ``manifest.feature_set.resolved["extractors"]``.
    """
    if isinstance(manifest, dict):          # the JSON as read; only feature_set and config are needed
        manifest = Manifest.from_json({"id": "", **manifest})
    recorded = manifest.feature_set
    extractors = recorded.config.get("extractors", {})
    uris = {name: info.get("uri") for name, info in recorded.models.items()
            if info.get("uri") and name in extractors}
    uris.update(models or {})
    features = feature_set_from_dict(recorded.config, uris, source=recorded.source,
                                     default_name=recorded.name or "snapshot")
    # Pin every model file to the sha256 the extraction recorded, so a file replaced since then is
    # refused by _read_model before anything loads it (TorchScript runs code; resolve() may load
    # it to probe its width before the caller compares descriptions).
    for e in features.extractors:
        pinned = recorded.models.get(e.name, {}).get("sha256")
        if e.uri and pinned:
            e.sha256 = pinned
    policy = recorded.resolved.get("policy") or {}
    extract_cfg = manifest.config
    policy = {"fps": float(policy.get("fps", extract_cfg.get("fps", FPS))),
              "frames": policy.get("frames", extract_cfg.get("frames")),
              "frame_tolerance": int(extract_cfg.get("frame_tolerance", 2)),
              "decode_chunk": int(extract_cfg.get("decode_chunk", 64))}
    return features, policy
