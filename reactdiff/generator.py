"""The ReactDiff generator: stage-1 MMT auto-encoder + stage-2 latent diffusion in one module.

Data flow (model.md §8), for a speaker clip of ``seq_len`` frames:

    z_s = MMT.encode(speaker features)                    [B, 750, fd]
    p_s = normalise(z_s)  (per-frame, per-dim min-max → [−1, 1], LatentStatistics)
    windows of 50 frames → cond = SiLU(GN(Linear(flatten window)))   [B·15, 1024]
    x̂₀ = DDIM(UNet, x_T ~ N(0, I) [B·K·15, 50, fd], cond)   all samples and windows in one pass
    z_l = denormalise(x̂₀) → MMT.decode → listener emotion [.., 25] and 3DMM [.., 58] (+ mean_face)

With ``architecture="temporal"`` (the ``*-temporal`` presets, docs/model.md) stage 2 has no
windows: cond = SiLU(Linear(p_s)) per frame [B, 750, C], x̂₀ = DDIM(TemporalDenoiser,
x_T [B·K, 750, fd], cond), and the statistics are one min/max per dimension for every frame.

One file holds everything a generator needs (``save``/``load``): the config, stage 1, the
conditioning projection (lost by the reference, §7.1.1), the UNet, the latent statistics and
the 3DMM mean face. Loading never unpickles code (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import numbers
import os
import pickle
import typing
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from reactdiff.config import ConfigError, coerce, from_dict, merge
from reactdiff.diffusion import DiffusionConfig, NoiseSchedule, ddim_sample, epsilon_loss
from reactdiff.mmt import MMTAutoencoder, MMTConfig
from reactdiff.temporal import SequenceCondition, TemporalConfig, TemporalDenoiser
from reactdiff.training import TrainSettings
from reactdiff.unet import UNet1D, UNetConfig

FORMAT = "reactdiff-generator/1"
STAGES = ("autoencoder", "diffusion")
# Stage-2 designs. "reference": the paper's windowed UNet (frames as channels, 15 independent
# 2-s windows, per-frame latent statistics). "temporal": a dilated temporal denoiser over the
# whole clip, conditioned frame by frame on the speaker (reactdiff.temporal, docs/model.md).
ARCHITECTURES = ("reference", "temporal")


class CheckpointError(ValueError):
    """A generator file is not a valid, code-free ReactDiff generator checkpoint."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class GeneratorConfig:
    mmt: MMTConfig = field(default_factory=MMTConfig)
    denoiser: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    architecture: str = "reference"    # stage-2 design, one of ARCHITECTURES
    temporal: TemporalConfig = field(default_factory=TemporalConfig)   # used when architecture="temporal"
    seq_len: int = 750                 # frames per clip the model sees (REACT clips have 751; frames 0..749)
    window: int = 50                   # frames per diffusion window (= UNet channels); 750 → 15 windows
    latent_eps: float = 1e-4           # s in the min-max normalisation, guards a zero range
    reference_normalisation_bug: bool = False   # reproduce the reference's non-inverse normalisation (§4.3)
    stage1: TrainSettings = field(default_factory=TrainSettings)
    stage2: TrainSettings = field(default_factory=lambda: TrainSettings(lr=5e-5))

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}: expected one of {ARCHITECTURES}")
        if self.temporal_denoiser:
            return   # no windows and no UNet: the checks below are the reference design's
        if self.seq_len % self.window:
            raise ValueError(f"seq_len={self.seq_len} must be a multiple of window={self.window}")
        factor = 2 ** (len(self.denoiser.channel_mult) - 1)
        if self.mmt.feature_dim % factor:
            raise ValueError(f"mmt.feature_dim={self.mmt.feature_dim} must be divisible by {factor}: the UNet "
                             f"halves the latent width {len(self.denoiser.channel_mult) - 1} times")
        if self.denoiser.cond_dim <= 0:
            raise ValueError("denoiser.cond_dim must be > 0: ReactDiff conditions every window on the speaker")

    @property
    def temporal_denoiser(self) -> bool:
        return self.architecture == "temporal"

    @property
    def num_windows(self) -> int:
        """Diffusion windows per clip: 15 × 50 frames (reference); the whole clip is one (temporal)."""
        return 1 if self.temporal_denoiser else self.seq_len // self.window

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-compatible dict (tuples become lists)."""
        def plain(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GeneratorConfig":
        return from_dict(cls, data)

    def with_overrides(self, **overrides: Any) -> "GeneratorConfig":
        """A copy with overrides applied; see ``build_generator`` for the accepted forms."""
        routed: dict[str, Any] = {}
        own = {f.name for f in dataclasses.fields(self)}
        nested = {f.name for f in dataclasses.fields(self) if dataclasses.is_dataclass(getattr(self, f.name))}
        for key, value in overrides.items():
            if key in own:
                routed[key] = merge(routed[key], value) if isinstance(routed.get(key), dict) else value
                continue
            # Convenience: a field of exactly one sub-config may be given at top level
            # (``facial=…``, ``hidden_dim=…``, ``model_channels=…``).
            owners = [n for n in sorted(nested) if key in {f.name for f in dataclasses.fields(getattr(self, n))}]
            if len(owners) != 1:
                hint = (f"it belongs to several sections ({', '.join(owners)}): write e.g. {owners[0]}={{{key!r}: …}}"
                        if owners else f"known keys: {', '.join(sorted(own))} or a field of {', '.join(sorted(nested))}")
                raise ValueError(f"unknown generator option {key!r}: {hint}")
            routed.setdefault(owners[0], {})
            if not isinstance(routed[owners[0]], dict):
                raise ValueError(f"{key!r} given together with a full {owners[0]} object")
            routed[owners[0]][key] = value
        return _apply(self, routed, "")


def _apply(obj: Any, overrides: dict[str, Any], prefix: str) -> Any:
    """Recursive dataclasses.replace: dicts merge into dataclass fields, anything else replaces."""
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in overrides.items():
        if key not in hints:
            raise ConfigError(f"unknown option {prefix + key}; known: {', '.join(prefix + k for k in hints)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _apply(current, value, prefix + key + ".")
        else:
            changes[key] = coerce(value, hints[key], prefix + key)
    return dataclasses.replace(obj, **changes)


# ----------------------------------------------------------------------------------------------
# Stage-2 pieces owned by the generator
# ----------------------------------------------------------------------------------------------

class LatentStatistics(nn.Module):
    """Per-frame, per-dimension min/max of the stage-1 latents over the training set (§3.6, §4.3).

    Buffers ``minimum``/``maximum`` [seq_len, fd] and ``count`` (clips seen). ``update`` keeps a
    running min/max, so statistics can be accumulated batch by batch; a distributed trainer
    all-reduces ``minimum`` with MIN, ``maximum`` with MAX and ``count`` with SUM.

    normalise:   p = 2 (z − m) / (R + s) − 1          R = M − m, s = eps
    denormalise: z = (p + 1) (R + s) / 2 + m          (exact inverse)

    The reference codes p = 2·(z − m) + s/(R + s) − 1 (an operator-precedence slip) but
    denormalises with z = (p + 1)·R/2 + m, so the two are not inverses (z ↦ m + R(z − m)) and,
    with x̂₀ clamped to [−1, 1], the decoder sees a distorted latent. We fix it;
    ``reference_bug=True`` reproduces the reference mapping for a faithful reproduction.

    ``seq_len=1`` keeps one min/max per dimension, shared by every frame (the temporal variant):
    then any number of frames can be normalised, which per-frame-index statistics cannot do.
    """

    def __init__(self, seq_len: int, feature_dim: int, eps: float = 1e-4, reference_bug: bool = False):
        super().__init__()
        self.eps = float(eps)
        self.reference_bug = bool(reference_bug)
        self.register_buffer("minimum", torch.full((seq_len, feature_dim), float("inf")))
        self.register_buffer("maximum", torch.full((seq_len, feature_dim), float("-inf")))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def ready(self) -> bool:
        return bool(self.count > 0) and bool(torch.isfinite(self.minimum).all() and torch.isfinite(self.maximum).all())

    @torch.no_grad()
    def reset(self) -> None:
        self.minimum.fill_(float("inf"))
        self.maximum.fill_(float("-inf"))
        self.count.zero_()

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        """Fold latents z [B, seq_len, fd] (or [seq_len, fd]) into the running min/max."""
        z = z.detach()
        if z.dim() == 2:
            z = z[None]
        self._check(z)
        z = z.to(self.minimum.dtype)
        dims = (0, 1) if self.shared_over_time else (0,)
        torch.minimum(self.minimum, z.amin(dim=dims), out=self.minimum)
        torch.maximum(self.maximum, z.amax(dim=dims), out=self.maximum)
        self.count += z.shape[0]

    @property
    def shared_over_time(self) -> bool:
        return self.minimum.shape[0] == 1

    def _check(self, z: Tensor) -> None:
        if self.shared_over_time:
            if z.shape[-1] != self.minimum.shape[-1]:
                raise ValueError(f"latents of width {z.shape[-1]} do not match the statistics' {self.minimum.shape[-1]}")
            return
        if tuple(z.shape[-2:]) != tuple(self.minimum.shape):
            raise ValueError(f"latents of shape {tuple(z.shape)} do not match the statistics "
                             f"[seq_len, fd] = {tuple(self.minimum.shape)}")

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        if not self.ready:
            raise RuntimeError("latent statistics are empty: accumulate them over the training latents "
                               "first (ReactDiffGenerator.update_statistics) before stage 2")
        self._check(like)
        m = self.minimum.to(like.dtype)
        return m, self.maximum.to(like.dtype) - m

    def normalize(self, z: Tensor) -> Tensor:
        m, r = self._stats(z)
        if self.reference_bug:
            return 2 * (z - m) + self.eps / (r + self.eps) - 1
        return 2 * (z - m) / (r + self.eps) - 1

    def denormalize(self, p: Tensor) -> Tensor:
        m, r = self._stats(p)
        if self.reference_bug:
            return (p + 1) * r / 2 + m
        return (p + 1) * (r + self.eps) / 2 + m


class SpeakerCondition(nn.Module):
    """cond = SiLU(GroupNorm(Linear(window · fd → C)(flatten(speaker window)))) (§4.4)."""

    def __init__(self, window: int, feature_dim: int, cond_dim: int, groups: int = 32):
        super().__init__()
        self.proj = nn.Linear(window * feature_dim, cond_dim)
        self.norm = nn.GroupNorm(groups, cond_dim)
        self.act = nn.SiLU()

    def forward(self, speaker_windows: Tensor) -> Tensor:
        return self.act(self.norm(self.proj(speaker_windows.flatten(1))))


class Reaction(NamedTuple):
    """Generated listener reactions: ``emotion`` [K, T, 25] / [B, K, T, 25], ``tdmm`` (absolute) [.., 58]."""
    emotion: Tensor
    tdmm: Tensor


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------

def _as_tensor(x) -> Tensor:
    """A tensor sharing ``x``'s memory, or a copy of a read-only array (Ray's object store,
    memory-mapped files): torch cannot share memory it may not write to."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        return torch.tensor(x)
    return torch.as_tensor(x)


class ReactDiffGenerator(nn.Module):
    """Stage 1 + stage 2 + statistics + mean face; inputs are dicts of named per-frame features."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        fd = config.mmt.feature_dim
        self.autoencoder = MMTAutoencoder(config.mmt)
        if config.temporal_denoiser:
            self.cond = SequenceCondition(fd, config.temporal.cond_channels)
            self.denoiser = TemporalDenoiser(config.temporal, fd)
        else:
            self.cond = SpeakerCondition(config.window, fd, config.denoiser.cond_dim, config.denoiser.norm_groups)
            self.denoiser = UNet1D(config.denoiser, in_channels=config.window)
        stat_frames = 1 if config.temporal_denoiser else config.seq_len
        self.latent_stats = LatentStatistics(stat_frames, fd, config.latent_eps, config.reference_normalisation_bug)
        self.register_buffer("mean_face", torch.zeros(config.mmt.tdmm_dim))
        self.schedule = NoiseSchedule.from_config(config.diffusion)
        self.metadata: dict[str, Any] = {}   # free-form, saved with the file (e.g. feature-set hash)

    # -- small helpers --------------------------------------------------------------------------

    @property
    def feature_widths(self) -> dict[str, int]:
        """The input feature groups the model consumes, name → width (facial, then acoustic)."""
        return self.config.mmt.inputs

    @property
    def dtype(self) -> torch.dtype:
        return self.mean_face.dtype

    @property
    def device(self) -> torch.device:
        return self.mean_face.device

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (stage 1, conditioning projection, UNet) and in total."""
        parts = {name: sum(p.numel() for p in getattr(self, name).parameters())
                 for name in ("autoencoder", "cond", "denoiser")}
        parts["total"] = sum(parts.values())
        return parts

    @torch.no_grad()
    def set_mean_face(self, mean_face: Tensor | Any) -> None:
        """Set the 3DMM mean (58 values; the dataset's mean_face.npy) subtracted from training targets."""
        value = torch.as_tensor(mean_face, dtype=self.dtype).reshape(-1)
        if value.numel() != self.mean_face.numel():
            raise ValueError(f"mean_face needs {self.mean_face.numel()} values, got {value.numel()}")
        self.mean_face.copy_(value.to(self.device))

    def set_trainable(self, stage: str) -> list[nn.Parameter]:
        """Freeze everything but one stage's modules; returns that stage's parameters.

        ``"autoencoder"``: the MMT. ``"diffusion"``: conditioning projection + UNet (stage 1 frozen).
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.requires_grad_(False)
        modules = [self.autoencoder] if stage == "autoencoder" else [self.cond, self.denoiser]
        params = [p for m in modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def train_settings(self, stage: str) -> TrainSettings:
        return self.config.stage1 if stage == "autoencoder" else self.config.stage2

    def _features(self, features: dict[str, Tensor], *, full_clip: bool) -> tuple[dict[str, Tensor], bool]:
        """Select, validate, batch, crop (first seq_len frames) and cast the named inputs.

        Extra keys are ignored. Returns (features [B, T, D], was_batched).
        """
        widths = self.feature_widths
        missing = [n for n in widths if n not in features]
        if missing:
            raise KeyError(f"missing input feature(s) {missing}; the model needs {list(widths)}, got {list(features)}")
        raw = {n: _as_tensor(features[n]) for n in widths}
        ranks = {x.dim() for x in raw.values()}
        if len(ranks) != 1 or ranks.pop() not in (2, 3):
            raise ValueError(f"input features must all be [T, D] or all be [B, T, D], got "
                             f"{ {n: tuple(x.shape) for n, x in raw.items()} }")
        batched = next(iter(raw.values())).dim() == 3
        out: dict[str, Tensor] = {}
        for name, width in widths.items():
            x = raw[name] if batched else raw[name][None]
            if x.shape[-1] != width:
                raise ValueError(f"feature {name!r} has width {x.shape[-1]}, the model expects {width}")
            if full_clip:
                if x.shape[1] < self.config.seq_len:
                    raise ValueError(f"feature {name!r} has {x.shape[1]} frames; the model needs at least "
                                     f"seq_len={self.config.seq_len}")
                x = x[:, : self.config.seq_len]   # REACT clips have 751 frames; the reference uses 0..749
            out[name] = x.to(device=self.device, dtype=self.dtype)
        lengths = {x.shape[:2] for x in out.values()}
        if len(lengths) != 1:
            raise ValueError(f"input features disagree on [batch, frames]: { {n: tuple(x.shape[:2]) for n, x in out.items()} }")
        return out, batched

    def _crop(self, x: Tensor) -> Tensor:
        return x[:, : self.config.seq_len].to(device=self.device, dtype=self.dtype)

    def to_windows(self, z: Tensor) -> Tensor:
        """[B, seq_len, fd] → [B · W, window, fd]: W non-overlapping windows per clip
        (the temporal variant denoises whole clips: unchanged)."""
        if self.config.temporal_denoiser:
            return z
        b, length, fd = z.shape
        return z.reshape(b * (length // self.config.window), self.config.window, fd)

    def from_windows(self, x: Tensor, batch: int) -> Tensor:
        """[batch · W, window, fd] → [batch, W · window, fd]."""
        return x.reshape(batch, -1, x.shape[-1])

    # -- stage 1 ---------------------------------------------------------------------------------

    def encode(self, features: dict[str, Tensor]) -> Tensor:
        """Stage-1 latent z [B, T, fd] of named features [B, T, D] (deterministic: μ if variational)."""
        feats, batched = self._features(features, full_clip=False)
        z = self.autoencoder.encode(feats)
        return z if batched else z[0]

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent → (emotion [.., 25], 3DMM in mean-subtracted space [.., 58])."""
        return self.autoencoder.decode(z)

    def autoencoder_loss(self, features: dict[str, Tensor], emotion: Tensor,
                         tdmm: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """10 · L1 (or MSE) of emotion + 10 · MSE(3DMM − mean_face) (+ KL); targets: the person's own labels.

        Inputs are cropped to the first seq_len frames like everywhere else; ``tdmm`` is absolute.
        """
        feats, batched = self._features(features, full_clip=False)
        feats = {n: x[:, : self.config.seq_len] for n, x in feats.items()}
        emotion, tdmm = (torch.as_tensor(y) if batched else torch.as_tensor(y)[None] for y in (emotion, tdmm))
        out = self.autoencoder(feats)
        return self.autoencoder.loss(out, self._crop(emotion), self._crop(tdmm) - self.mean_face)

    @torch.no_grad()
    def update_statistics(self, features: dict[str, Tensor]) -> Tensor:
        """Encode a batch of training clips and fold their latents into ``latent_stats``; returns z."""
        feats, _ = self._features(features, full_clip=True)
        z = self.autoencoder.encode(feats)
        self.latent_stats.update(z)
        return z

    # -- stage 2 ---------------------------------------------------------------------------------

    def diffusion_loss(self, speaker_features: dict[str, Tensor], listener_features: dict[str, Tensor],
                       generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """ε-prediction loss on listener latent windows conditioned on the aligned speaker windows.

        Stage 1 is frozen (no_grad, deterministic encode). Returns 10 · mean |ε̂ − ε| and parts.
        """
        speaker, _ = self._features(speaker_features, full_clip=True)
        listener, _ = self._features(listener_features, full_clip=True)
        b = next(iter(speaker.values())).shape[0]
        with torch.no_grad():   # one encoder pass for both roles
            z = self.autoencoder.encode({n: torch.cat([speaker[n], listener[n]]) for n in speaker})
        return self.latent_diffusion_loss(z[:b], z[b:], generator=generator)

    def latent_diffusion_loss(self, z_speaker: Tensor, z_listener: Tensor,
                              generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``diffusion_loss`` from already-encoded stage-1 latents [B, seq_len, fd].

        Stage 1 is frozen during stage 2, so a trainer may encode every clip once and train on
        the cached latents: normalise, cut into windows, condition each listener window on the
        time-aligned speaker window, ε-prediction loss.
        """
        z_speaker, z_listener = (self._crop(z.detach()) for z in (z_speaker, z_listener))
        p_s, p_l = self.latent_stats.normalize(z_speaker), self.latent_stats.normalize(z_listener)
        d, frames = self.config.diffusion, self.config.temporal.train_frames
        if self.config.temporal_denoiser and frames and frames < p_l.shape[1]:
            # Random crops: more distinct training sequences from few clips, and the network
            # learns that nothing depends on the absolute frame index (any clip length works).
            gen_device = generator.device if generator is not None else "cpu"
            start = int(torch.randint(0, p_l.shape[1] - frames + 1, (1,), generator=generator, device=gen_device))
            p_s, p_l = p_s[:, start:start + frames], p_l[:, start:start + frames]
        return epsilon_loss(self.denoiser, self.to_windows(p_l), self.schedule, self.cond(self.to_windows(p_s)),
                            loss=d.loss, weight=d.loss_weight, prediction=d.prediction, cond_drop=d.cond_drop,
                            generator=generator)

    @contextlib.contextmanager
    def _sampling_mode(self, decoder_dropout: bool) -> Iterator[None]:
        """Eval mode everywhere (decoder dropout on if asked), restoring every module's mode after."""
        modes = {m: m.training for m in self.modules()}
        self.eval()
        self.autoencoder.decoder.train(decoder_dropout)
        try:
            yield
        finally:
            for m, mode in modes.items():
                m.training = mode

    @torch.no_grad()
    def generate(self, speaker: dict[str, Tensor], num_samples: int = 10, steps: int | None = None,
                 seed: int | Sequence[int] | None = None, eta: float | None = None,
                 decoder_dropout: bool = False, guidance: float | None = None) -> Reaction:
        """Sample ``num_samples`` listener reactions per speaker clip, in one batched pass.

        ``speaker``: named features [T, D] or [B, T, D], T ≥ seq_len (only frames 0..seq_len−1 are
        used). All B · K · W windows are denoised together: one denoiser call per DDIM step.
        ``steps`` < T uses an evenly spaced subset of the training timesteps; ``eta`` defaults to
        the config's (0 = DDIM). ``seed`` makes the result reproducible (noise is drawn on the CPU,
        so it is the same on every device). Each clip of a batch has its own noise stream, seeded
        with ``seed[b]`` (a sequence of B seeds) or ``seed + b`` (an int), so row b of a batched
        call equals an unbatched call with that seed: results never depend on batch composition
        (up to float rounding; with ``decoder_dropout`` the dropout masks are shared by the batch).
        The decoder runs in eval mode unless ``decoder_dropout=True``, which reproduces the
        reference's dropout-at-sampling (§4.2). ``guidance`` (default: the config's) is the
        classifier-free guidance scale. The caller's train/eval modes are restored.
        Returns ``Reaction(emotion [K, T, 25], tdmm [K, T, 58])`` or with a leading B.
        """
        if num_samples < 1:
            raise ValueError("num_samples must be ≥ 1")
        feats, batched = self._features(speaker, full_clip=True)
        cfg, d = self.config, self.config.diffusion
        b, k, w, fd = next(iter(feats.values())).shape[0], num_samples, cfg.num_windows, cfg.mmt.feature_dim
        rngs = self._row_generators(seed, b)

        with self._sampling_mode(decoder_dropout):
            p_s = self.latent_stats.normalize(self.autoencoder.encode(feats))          # [B, L, fd]
            cond = self.cond(self.to_windows(p_s))                                     # [B·W, C]
            # Every sample of a clip shares its speaker windows' condition: order (b, k, w).
            rest = cond.shape[1:]                                                      # [C] or [L, C]
            cond = cond.reshape(b, 1, w, *rest).expand(b, k, w, *rest).reshape(b * k * w, *rest)
            window = cfg.seq_len if cfg.temporal_denoiser else cfg.window
            x0 = ddim_sample(self.denoiser, (b * k * w, window, fd), self.schedule, cond, steps=steps,
                             eta=d.eta if eta is None else float(eta), clip_x0=d.clip_x0, generator=rngs,
                             device=self.device, dtype=self.dtype, prediction=d.prediction,
                             guidance=d.guidance if guidance is None else float(guidance))
            z = self.latent_stats.denormalize(self.from_windows(x0, b * k))            # [B·K, L, fd]
            with self._dropout_rng(decoder_dropout, rngs[0]):
                emotion, tdmm = self.decode(z)
        tdmm = tdmm + self.mean_face
        emotion = emotion.reshape(b, k, cfg.seq_len, -1)
        tdmm = tdmm.reshape(b, k, cfg.seq_len, -1)
        return Reaction(emotion, tdmm) if batched else Reaction(emotion[0], tdmm[0])

    @staticmethod
    def _row_generators(seed: int | Sequence[int] | None, batch: int) -> list[torch.Generator]:
        """One CPU noise stream per clip of the batch (see ``generate``)."""
        if seed is None:
            seeds = [int(torch.Generator().seed()) for _ in range(batch)]   # fresh, non-deterministic
        elif isinstance(seed, numbers.Integral) or (isinstance(seed, Tensor) and seed.dim() == 0):
            seeds = [int(seed) + i for i in range(batch)]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != batch:
                raise ValueError(f"got {len(seeds)} seeds for a batch of {batch} speaker clips")
        return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

    @contextlib.contextmanager
    def _dropout_rng(self, active: bool, rng: torch.Generator) -> Iterator[None]:
        """Dropout draws from the global RNG; seed it from ``rng`` inside a fork so a seed still
        reproduces the samples and the caller's global RNG state is left untouched."""
        if not active:
            yield
            return
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            yield

    # -- persistence -----------------------------------------------------------------------------

    def save(self, target: str | os.PathLike | BinaryIO) -> None:
        """Write one file {"format", "config", "metadata", "state_dict"} to a local path or a file
        object (object stores: ``pipeline.storage.write_bytes(uri, generator.to_bytes())``)."""
        payload = {"format": FORMAT, "config": self.config.to_dict(), "metadata": dict(self.metadata),
                   "state_dict": self.state_dict()}
        if isinstance(target, (str, os.PathLike)):
            path = _local_path(target)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            torch.save(payload, path)
        else:
            torch.save(payload, target)

    @classmethod
    def load(cls, source: str | os.PathLike | BinaryIO, map_location: str | torch.device = "cpu") -> "ReactDiffGenerator":
        """Load a file written by ``save`` (a local path or a file object; ``from_bytes`` for bytes)
        with ``torch.load(weights_only=True)``: never unpickles code."""
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<file object>")
        if isinstance(source, (str, os.PathLike)):
            source = _local_path(source)
        try:
            payload = torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{name}: refusing to load: the file contains pickled objects other than "
                                  f"tensors and plain containers (weights_only=True). Original error: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{name}: not a ReactDiff generator file (format {found!r}, expected {FORMAT!r}); "
                                  "write it with ReactDiffGenerator.save")
        config = GeneratorConfig.from_dict(payload["config"])
        with torch.device("meta"):   # no throw-away random init; the loaded tensors are assigned
            generator = cls(config)
        generator.load_state_dict(payload["state_dict"], assign=True)
        generator.metadata = dict(payload.get("metadata") or {})
        return generator

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.save(buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, map_location: str | torch.device = "cpu") -> "ReactDiffGenerator":
        return cls.load(io.BytesIO(data), map_location=map_location)


def _local_path(path: str | os.PathLike) -> str:
    """A local path (``file://`` stripped); object-store URIs belong to ``pipeline.storage``."""
    path = os.fspath(path)
    if path.startswith("file://"):
        return path[len("file://"):]
    if "://" in path:
        raise ValueError(f"{path}: the generator reads and writes local paths or file objects only; "
                         "read or write object-store files as bytes (from_bytes, to_bytes)")
    return path


def build_generator(preset: str = "small", **overrides: Any) -> ReactDiffGenerator:
    """A fresh generator from a named preset (``reactdiff.presets.PRESETS``) plus overrides.

    Overrides are top-level fields (``seq_len=100``), nested dicts merged into a section
    (``mmt={"hidden_dim": 64}``, ``stage1={"lr": 1e-3}``) or a field of a single section given at
    top level (``facial={"video_pixels": 1024}``, ``acoustic={...}``, ``model_channels=64``).
    Feature-group dicts replace the preset's groups. Works under ``with torch.device("meta"):``.
    """
    from reactdiff.presets import preset_config   # presets imports this module

    return ReactDiffGenerator(preset_config(preset, **overrides))
