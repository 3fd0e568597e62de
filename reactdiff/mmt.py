"""Stage 1: the Multi-Modality Transformer (MMT) auto-encoder (model.md §3).

A per-person "behaviour → own facial attributes" auto-encoder. Its encoder fuses a person's
per-frame facial and acoustic features into a latent z [B, T, fd]; its decoder maps z back to
the same person's 25-d emotion and 58-d (mean-subtracted) 3DMM coefficients. Stage 2 then
runs diffusion in the space of z.

Encoder, reading as the reference (§3.3) but over *named* feature groups:

    V = Attn(q = F₁, kv = F₁)                        intra-class (facial) self-attention
    depth × for g in F₂..F_n:  V = Attn(q = V, kv = g)    intra-class (facial) cross-attention
    A = Attn(q = A₁, kv = A₂..)  (self-attention when there is a single acoustic group)
    depth × V = Attn(q = V, kv = A)                  inter-class: facial attends acoustic
    z = latent_mlp(map_mlp(V))

with Attn(q, kv) = LayerNorm(MHA(W_q q, W_k kv, W_v kv) + W_q q) (§3.2; W = identity when the
width is already the hidden width). Paper groups, in order: facial video_au 25 088,
video_fe 1 408, video_va 64; acoustic audio_wav2vec2 1 536, audio_mfcc26 26.

There is no positional encoding and no mask in the reference, so the whole model is
permutation-equivariant over time; ``positional_encoding=True`` adds a sinusoidal encoding
wherever a raw feature group is projected to the hidden width. The reference is also not
variational despite its "TransformerVAE" name; ``variational=True`` adds a Gaussian posterior
(μ, log σ²) with a KL term.

``clip_centering=True`` subtracts each input group's mean over the clip's frames before anything
else (cepstral mean normalisation, per feature). With raw, weightless features (face pixels,
MFCC) a person's static look and recording channel are most of the signal: without centring the
small preset's encoder learns that constant and decodes the same frame for the whole clip
(synthetic demo data: reconstruction CCC 0.00 after 720 steps; with centring 0.20 after the
demo's 480). The price is each feature's clip-level offset, which the decoder then cannot see.

All three options are off by default (= reference, whose pretrained features already describe
expression); the small preset turns on ``clip_centering``, and ``small-temporal`` also
``positional_encoding``: at the demo's step budget it lifts the val reconstruction CCC from
0.345 to 0.388 on the demo's data and the reconstruction ceiling FRCorr from 2.86 to 3.30 on a
behaviour model nothing was tuned on (docs/model.md, cause 7).

``emotion_loss="mse"`` replaces the reference's L1 on the 25 attributes. Most of them are sparse
(AUs are 0 most of the time, expression probabilities near 0 or 1) and L1's minimiser is the
median, so an L1 decoder learns to output the resting value and little of the movement: on a
behaviour model nothing was tuned on (``reactdiff synth --behaviour backchannel``, 20 train
dyads, the demo's 480 steps) the mean CCC of the reconstructed attributes was 0.18 on train clips
and 0.16 on val with L1, 0.43 and 0.32 with MSE — under-fitting, not a failure to generalise
across people. The ``*-temporal`` presets use MSE (docs/model.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MMTConfig:
    facial: dict[str, int] = field(default_factory=lambda: {"video_au": 25088, "video_fe": 1408, "video_va": 64})
    acoustic: dict[str, int] = field(default_factory=lambda: {"audio_wav2vec2": 1536, "audio_mfcc26": 26})
    hidden_dim: int = 1024           # attention width H
    feature_dim: int = 256           # latent width fd (HEAD; 128 in the first commit)
    depth: int = 2                   # repeats of the facial cross-attention and of the inter-class attention
    heads: int = 4
    decoder_blocks: int = 2          # TransformerDecoders applied in sequence (tgt = memory = previous)
    decoder_layers: int = 2          # layers per TransformerDecoder
    decoder_heads: int = 4
    dropout: float = 0.1             # decoder dropout (the encoder has none)
    emotion_dim: int = 25
    tdmm_dim: int = 58
    positional_encoding: bool = False
    clip_centering: bool = False      # subtract each input group's per-clip mean (see the module doc)
    variational: bool = False
    kl_weight: float = 1e-4          # only used when variational
    emotion_weight: float = 10.0     # loss = 10 · L1(emotion) + 10 · MSE(3DMM)  (HEAD weights)
    emotion_loss: str = "l1"         # the reference's L1; "mse" for the improved variant (module doc)
    tdmm_weight: float = 10.0

    @property
    def loss_parts(self) -> list[str]:
        """The names ``MMTAutoencoder.loss`` reports its parts under (and training validates)."""
        return [f"emotion_{self.emotion_loss}", "tdmm_mse"] + (["kl"] if self.variational else [])

    def __post_init__(self) -> None:
        self.facial = {str(k): int(v) for k, v in self.facial.items()}
        self.acoustic = {str(k): int(v) for k, v in self.acoustic.items()}
        if not self.facial:
            raise ValueError("mmt.facial needs at least one feature group (the facial stream is the query)")
        if self.emotion_loss not in ("l1", "mse"):
            raise ValueError(f"mmt.emotion_loss must be 'l1' or 'mse', got {self.emotion_loss!r}")
        bad = [n for n in self.inputs if not n or "." in n]
        if bad:
            raise ValueError(f"feature group names must be non-empty and contain no '.': {bad}")
        overlap = set(self.facial) & set(self.acoustic)
        if overlap:
            raise ValueError(f"feature groups listed as both facial and acoustic: {sorted(overlap)}")
        if self.hidden_dim % self.heads or self.feature_dim % self.decoder_heads:
            raise ValueError("mmt: hidden_dim must divide by heads and feature_dim by decoder_heads")

    @property
    def inputs(self) -> dict[str, int]:
        """Every input feature group, name → width (facial first)."""
        return {**self.facial, **self.acoustic}


# The reference's attention roles (§3.3), by feature name: the first facial group is the query
# that self-attends (AU), then attends the others in this order; the first acoustic group
# (wav2vec2) is the query over the others (MFCC). Names not listed keep their given order after
# the listed ones.
FACIAL_ROLES = ("video_au", "video_fe", "video_va")
ACOUSTIC_ROLES = ("audio_wav2vec2", "audio_mfcc26")


def in_role_order(groups: dict[str, int], roles: tuple[str, ...]) -> dict[str, int]:
    """``groups`` reordered so the attention roles follow the model's definition, not dict order.

    A feature snapshot lists its columns in its own (sorted) order; building the MMT from that
    would make MFCC the acoustic query and wav2vec2 its key/value, the reverse of the reference.
    """
    rank = {name: i for i, name in enumerate(roles)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), list(groups).index(kv[0]))))


class MMTOutput(NamedTuple):
    emotion: Tensor               # [B, T, 25]
    tdmm: Tensor                  # [B, T, 58], mean-subtracted space
    z: Tensor                     # [B, T, fd], the latent that was decoded
    mu: Tensor | None = None      # posterior mean and log-variance when variational
    logvar: Tensor | None = None


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> Tensor:
    """Transformer positional encoding (Vaswani et al. 2017 §3.5): sin on even, cos on odd dims."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe.to(dtype) if dtype is not None else pe


def _project(width: int, hidden: int) -> nn.Module:
    return nn.Identity() if width == hidden else nn.Linear(width, hidden)


class Attention(nn.Module):
    """LayerNorm(MHA(q, k, v) + q) with q = W_q·query, k = W_k·context, v = W_v·context (§3.2).

    No feed-forward, no dropout, no mask. ``pos`` (when given) is added to the projections of
    the *raw* inputs (``query_raw``/``context_raw``), i.e. where a modality enters the hidden width.
    """

    def __init__(self, query_dim: int, context_dim: int, hidden: int, heads: int):
        super().__init__()
        self.to_q = _project(query_dim, hidden)
        self.to_k = _project(context_dim, hidden)
        self.to_v = _project(context_dim, hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, query: Tensor, context: Tensor, pos: Tensor | None = None,
                query_raw: bool = False, context_raw: bool = False) -> Tensor:
        q, k, v = self.to_q(query), self.to_k(context), self.to_v(context)
        if pos is not None:
            if query_raw:
                q = q + pos
            if context_raw:
                k, v = k + pos, v + pos
        a, _ = self.attn(q, k, v, need_weights=False)   # need_weights=False → fused SDPA kernel
        return self.norm(a + q)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear → LayerNorm → SiLU → Linear, the reference's MLP shape everywhere in stage 1."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class MMTEncoder(nn.Module):
    """Named per-frame features {name: [B, T, D]} → latent z [B, T, fd] (or μ, log σ²)."""

    def __init__(self, config: MMTConfig):
        super().__init__()
        c, H = config, config.hidden_dim
        self.config = config
        facial, acoustic = list(c.facial.items()), list(c.acoustic.items())
        width, others = facial[0][1], facial[1:]
        self.facial_self = Attention(width, width, H, c.heads)
        self.facial_cross = nn.ModuleList(
            nn.ModuleDict({name: Attention(H, w, H, c.heads) for name, w in others}) for _ in range(c.depth)
        ) if others else nn.ModuleList()
        if acoustic:
            # The first acoustic group queries the others (reference: wav2vec2 attends MFCC);
            # with a single group (demo: MFCC only) it attends itself.
            a_width = acoustic[0][1]
            contexts = acoustic[1:] or acoustic[:1]
            self.acoustic_attn = nn.ModuleDict({
                name: Attention(a_width if i == 0 else H, w, H, c.heads) for i, (name, w) in enumerate(contexts)
            })
            self.inter = nn.ModuleList(Attention(H, H, H, c.heads) for _ in range(c.depth))
        else:
            self.acoustic_attn = nn.ModuleDict()
            self.inter = nn.ModuleList()
        self.map_mlp = mlp(H, 2 * H, c.feature_dim)
        out = 2 * c.feature_dim if c.variational else c.feature_dim
        self.latent_mlp = mlp(c.feature_dim, 2 * c.feature_dim, out)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Returns (μ or z, log σ² or None)."""
        c = self.config
        if c.clip_centering:
            features = {n: x - x.mean(dim=1, keepdim=True) for n, x in features.items()}
        facial_names, acoustic_names = list(c.facial), list(c.acoustic)
        first = features[facial_names[0]]
        pos = (sinusoidal_positions(first.shape[1], c.hidden_dim, first.device, first.dtype)
               if c.positional_encoding else None)

        v = self.facial_self(first, first, pos, query_raw=True, context_raw=True)
        for block in self.facial_cross:
            for name in facial_names[1:]:
                v = block[name](v, features[name], pos, context_raw=True)

        if acoustic_names:
            a_query = features[acoustic_names[0]]
            context_names = acoustic_names[1:] or acoustic_names[:1]
            # One attention per context group; with the reference's two groups this is exactly
            # Attn(q=W2V; kv=MFCC). With ≥ 3 groups the query group attends each in turn,
            # the later ones receiving the already-fused stream as query.
            a = a_query
            for i, name in enumerate(context_names):
                a = self.acoustic_attn[name](a, features[name], pos, query_raw=(i == 0), context_raw=True)
            for block in self.inter:
                v = block(v, a)

        h = self.latent_mlp(self.map_mlp(v))
        if c.variational:
            mu, logvar = h.chunk(2, dim=-1)
            return mu, logvar
        return h, None


class MMTDecoder(nn.Module):
    """z [B, T, fd] → emotion [B, T, 25], 3DMM [B, T, 58] (§3.4).

    ``decoder_blocks`` TransformerDecoders in sequence, each with tgt = memory = previous output
    (post-norm, ReLU FF of width 2·fd, dropout, batch-first, no masks), then two MLP heads.
    The reference's unused extra MLP and ALiBi mask buffer are deliberately left out.
    """

    def __init__(self, config: MMTConfig):
        super().__init__()
        fd = config.feature_dim

        def stack() -> nn.TransformerDecoder:
            layer = nn.TransformerDecoderLayer(fd, config.decoder_heads, dim_feedforward=2 * fd,
                                               dropout=config.dropout, batch_first=True)
            return nn.TransformerDecoder(layer, config.decoder_layers)

        self.blocks = nn.ModuleList(stack() for _ in range(config.decoder_blocks))
        self.tdmm_head = mlp(fd, 2 * fd, config.tdmm_dim)
        self.emotion_head = mlp(fd, 2 * fd, config.emotion_dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h = z
        for block in self.blocks:
            h = block(h, h)
        return self.emotion_head(h), self.tdmm_head(h)


class MMTAutoencoder(nn.Module):
    """The stage-1 model: ``encode`` → z, ``decode`` → (emotion, centred 3DMM), ``loss``."""

    def __init__(self, config: MMTConfig):
        super().__init__()
        self.config = config
        self.encoder = MMTEncoder(config)
        self.decoder = MMTDecoder(config)

    def encode(self, features: dict[str, Tensor], sample: bool = False) -> Tensor:
        """Latent z [B, T, fd]. Deterministic unless variational and ``sample`` (reparameterised draw)."""
        mu, logvar = self.encoder(features)
        if sample and logvar is not None:
            return mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return mu

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoder(z)

    def forward(self, features: dict[str, Tensor]) -> MMTOutput:
        """Encode and decode; variational models sample z in training mode and use μ in eval mode."""
        mu, logvar = self.encoder(features)
        z = mu
        if logvar is not None and self.training:
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        emotion, tdmm = self.decoder(z)
        return MMTOutput(emotion, tdmm, z, mu if logvar is not None else None, logvar)

    def loss(self, out: MMTOutput, emotion: Tensor, tdmm_centered: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """10 · L1(emotion) (or MSE) + 10 · MSE(3DMM) (+ kl_weight · KL when variational), plain means.

        KL(N(μ, σ²) ‖ N(0, I)) is summed over the latent dims and averaged over batch and frames.
        Parts are named by ``MMTConfig.loss_parts`` (``emotion_l1`` or ``emotion_mse``, ...).
        """
        c = self.config
        fn = F.l1_loss if c.emotion_loss == "l1" else F.mse_loss
        emotion_term = fn(out.emotion, emotion)
        tdmm_mse = F.mse_loss(out.tdmm, tdmm_centered)
        loss = c.emotion_weight * emotion_term + c.tdmm_weight * tdmm_mse
        values = [emotion_term, tdmm_mse]
        if out.logvar is not None:
            kl = (-0.5 * (1 + out.logvar - out.mu.pow(2) - out.logvar.exp())).sum(-1).mean()
            loss = loss + c.kl_weight * kl
            values.append(kl)
        return loss, {name: v.detach() for name, v in zip(c.loss_parts, values)}
