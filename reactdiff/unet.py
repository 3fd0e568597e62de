"""Stage-2 denoiser: the 1-D UNet of the reference (``GDUnet_Latent``, model.md §4.5).

An OpenAI guided-diffusion UNet with ``dims=1`` and an unusual tensor layout: a window's
**frames are the Conv1d channels** (50) and the **latent dimensions are the 1-D length**
(fd = 256), so convolutions slide over the latent-feature index, not over time. Temporal
structure inside a window is mixed by the channel dimension of every convolution.

Paper sizes: widths model_channels × (1, 2, 4, 8) = 256/512/1024/2048, 2 ResBlocks per level
on the way down and 3 on the way up, single-head self-attention after each ResBlock at
downsample factors 1, 2, 4, time embedding sinusoidal(256) → 1024 → 1024 concatenated with the
1024-d speaker condition → 2048, additive (not scale-shift) embedding bias, zero-initialised
output convolutions, GroupNorm(32). 404.31 M parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class UNetConfig:
    model_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2                       # per level going down; the way up uses one more
    attention_resolutions: tuple[int, ...] = (1, 2, 4)   # downsample factors with self-attention
    num_heads: int = 1                            # reference: single-head attention
    dropout: float = 0.0
    cond_dim: int = 1024                          # speaker-window condition width (0 = unconditional)
    time_embed_dim: int | None = None             # default 4 · model_channels
    norm_groups: int = 32                         # GroupNorm groups (reference 32)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        widths = [self.model_channels * m for m in self.channel_mult]
        for w in widths + ([self.cond_dim] if self.cond_dim else []):
            if w % self.norm_groups:
                raise ValueError(f"denoiser: width {w} is not divisible by norm_groups={self.norm_groups}")

    @property
    def emb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.model_channels


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps, cos half then sin half (guided-diffusion order).

    freq_i = max_period^(−i/half); the reference feeds the raw t ∈ {0..T−1}, no rescaling.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer so each residual branch starts as the identity (guided diffusion)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN → SiLU → Conv ; + Linear(SiLU(e)) ; GN → SiLU → Dropout → zero Conv ; + skip."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv1d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv1d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv1d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[..., None]   # plain additive bias (use_scale_shift_norm=False)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention across the length (latent-index) positions: GN → qkv → attention → zero proj."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, length = x.shape
        qkv = self.qkv(self.norm(x))                                   # [N, 3C, L]
        # QKVAttentionLegacy layout: heads are contiguous blocks of 3·C/heads channels.
        q, k, v = qkv.reshape(n, self.num_heads, 3 * c // self.num_heads, length).transpose(2, 3).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)                   # [N, heads, L, C/heads]
        h = h.transpose(2, 3).reshape(n, c, length)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv1d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """A ResBlock, optionally followed by attention, optionally followed by a resampler."""

    def __init__(self, res: ResBlock | None, attn: AttentionBlock | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.resample is not None:
            x = self.resample(x)
        return x


class UNet1D(nn.Module):
    """ε̂ = UNet(x_t [N, frames, fd], t [N], cond [N, cond_dim]) → [N, frames, fd]."""

    def __init__(self, config: UNetConfig, in_channels: int):
        super().__init__()
        self.config = config
        mc, g, emb_in = config.model_channels, config.norm_groups, config.emb_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_in), nn.SiLU(), nn.Linear(emb_in, emb_in))
        emb_dim = emb_in + config.cond_dim           # [time ; cond] concatenated → every ResBlock
        self.downsample_factor = 2 ** (len(config.channel_mult) - 1)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, config.dropout, g)

        def attn(ch: int, ds: int) -> AttentionBlock | None:
            return AttentionBlock(ch, config.num_heads, g) if ds in config.attention_resolutions else None

        self.input_conv = nn.Conv1d(in_channels, mc, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(Level(res(ch, mult * mc), attn(mult * mc, ds)))
                ch = mult * mc
                skips.append(ch)
            if level != len(config.channel_mult) - 1:
                self.down.append(Level(None, resample=Downsample(ch)))
                skips.append(ch)
                ds *= 2

        self.middle = nn.ModuleList([res(ch, ch), AttentionBlock(ch, config.num_heads, g), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                up = Upsample(mult * mc) if (level and i == config.num_res_blocks) else None
                self.up.append(Level(res(ch + skips.pop(), mult * mc), attn(mult * mc, ds), up))
                ch = mult * mc
            if level:
                ds //= 2

        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), zero_module(nn.Conv1d(mc, in_channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.shape[-1] % self.downsample_factor:
            raise ValueError(f"latent width {x.shape[-1]} must be divisible by {self.downsample_factor} "
                             "(the UNet halves it once per level)")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if self.config.cond_dim:
            if cond is None:
                raise ValueError("this denoiser is conditional: pass cond [N, cond_dim]")
            emb = torch.cat([emb, cond.to(emb.dtype)], dim=-1)
        h = self.input_conv(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        h = self.middle[0](h, emb)
        h = self.middle[1](h)
        h = self.middle[2](h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
