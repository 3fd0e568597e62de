"""Stage-2 denoiser of the ``temporal`` variant: a dilated 1-D convolution network over *time*.

The reference UNet (``reactdiff.unet``) sees a 2-s window's 50 frames as Conv1d channels and
convolves over the latent-feature index, and the 15 windows of a clip are denoised
independently. Measured on REACT-layout synthetic data (docs/model.md), that design has no
temporal inductive bias — reactions jitter ~10× more than real listeners from frame to frame —
and it reads the speaker only through one flattened 50-frame projection per window, so the
trained generator barely follows the speaker. This network fixes both causes:

* layout [N, fd, T]: latent dimensions are channels and **frames are the length axis**, so a
  convolution is a temporal filter and a smooth output is the easy solution;
* the whole clip is denoised at once (no windows, no seams every 2 s) and, being fully
  convolutional, the same weights serve any number of frames;
* the speaker condition is **frame-aligned**: the speaker's latent sequence enters every block
  through a 1×1 projection, and the dilated stack (receptive field ≈ 2 · Σ dilations · (k − 1)
  frames; ≈ 10 s with the defaults) lets the network learn reaction lags and context;
* FiLM (scale and shift) from the diffusion-timestep embedding in every block.

    ε̂ or x̂₀ = TemporalDenoiser(x_t [N, T, fd], t [N], speaker [N, T, C])  → [N, T, fd]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reactdiff.unet import timestep_embedding, zero_module


@dataclass
class TemporalConfig:
    channels: int = 128                        # width of the residual stream
    dilations: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 1, 2, 4, 8)   # one residual block each
    kernel_size: int = 3
    cond_channels: int = 64                    # per-frame speaker projection width
    norm_groups: int = 8
    dropout: float = 0.0
    train_frames: int | None = None            # random crop length while training (None = whole clip)

    def __post_init__(self) -> None:
        self.dilations = tuple(int(d) for d in self.dilations)
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError("temporal.dilations: need at least one dilation, all ≥ 1")
        if self.kernel_size % 2 == 0:
            raise ValueError("temporal.kernel_size must be odd (same-length convolutions)")
        if self.channels % self.norm_groups:
            raise ValueError(f"temporal.channels={self.channels} is not divisible by norm_groups={self.norm_groups}")

    @property
    def receptive_field(self) -> int:
        """Frames seen by one output frame (two dilated convolutions per block)."""
        return 1 + 2 * (self.kernel_size - 1) * sum(self.dilations)


class TemporalBlock(nn.Module):
    """x + zero-conv(SiLU(GN(FiLM(conv_d(SiLU(GN(x))) + W·speaker, emb))))."""

    def __init__(self, channels: int, emb_dim: int, cond_channels: int, dilation: int, kernel_size: int,
                 groups: int, dropout: float):
        super().__init__()
        pad = dilation * (kernel_size - 1) // 2
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv1d(channels, channels, kernel_size, padding=pad, dilation=dilation))
        self.cond = nn.Conv1d(cond_channels, channels, 1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv1d(channels, channels, kernel_size, padding=pad,
                                                              dilation=dilation)))

    def forward(self, x: Tensor, emb: Tensor, speaker: Tensor) -> Tensor:
        h = self.in_layers(x) + self.cond(speaker)
        scale, shift = self.film(emb)[..., None].chunk(2, dim=1)
        return x + self.out_layers(h * (1 + scale) + shift)


class TemporalDenoiser(nn.Module):
    """Denoiser over whole latent sequences [N, T, fd], conditioned frame by frame on the speaker."""

    def __init__(self, config: TemporalConfig, feature_dim: int):
        super().__init__()
        c = config
        self.config = config
        emb_dim = 4 * c.channels
        self.time_embed = nn.Sequential(nn.Linear(c.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv1d(feature_dim + c.cond_channels, c.channels, c.kernel_size,
                                    padding=c.kernel_size // 2)
        self.blocks = nn.ModuleList(
            TemporalBlock(c.channels, emb_dim, c.cond_channels, d, c.kernel_size, c.norm_groups, c.dropout)
            for d in c.dilations)
        self.out = nn.Sequential(nn.GroupNorm(c.norm_groups, c.channels), nn.SiLU(),
                                 zero_module(nn.Conv1d(c.channels, feature_dim, c.kernel_size,
                                                       padding=c.kernel_size // 2)))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("the temporal denoiser is conditional: pass the speaker sequence [N, T, C]")
        if cond.shape[:2] != x.shape[:2]:
            raise ValueError(f"speaker condition {tuple(cond.shape)} does not align with x_t {tuple(x.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.config.channels).to(x.dtype))
        speaker = cond.transpose(1, 2).to(x.dtype)                     # [N, C, T]
        h = self.input_conv(torch.cat([x.transpose(1, 2), speaker], dim=1))
        for block in self.blocks:
            h = block(h, emb, speaker)
        return self.out(h).transpose(1, 2)


class SequenceCondition(nn.Module):
    """Per-frame speaker condition: SiLU(Linear(fd → C)) on the normalised speaker latent [N, T, fd]."""

    def __init__(self, feature_dim: int, cond_channels: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, cond_channels)
        self.act = nn.SiLU()

    def forward(self, speaker: Tensor) -> Tensor:
        return self.act(self.proj(speaker))
