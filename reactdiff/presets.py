"""Named generator sizes (a registry like DiT's ``DiT_models``).

``paper``  the reference code's sizes (model.md §3–4): MMT hidden 1 024, latent fd 256, paper
           input features (facetorch AU/FE/VA video features, wav2vec2 + MFCC audio);
           stage 1 ≈ 124.7 M parameters (the reference's 124.99 M minus its unused 0.26 M decoder
           MLP), conditioning projection 13.11 M, UNet 404.31 M.
``small``  a CPU-sized model for the demo and tests: raw 32×32 face pixels + MFCC, hidden 128,
           fd 32, UNet widths 32/64/128. Trains in minutes on 2 cores on ~16–32 clips of 750 frames.
``paper-temporal``, ``small-temporal``
           the improved variant at both sizes (docs/model.md): stage 1 with an MSE emotion loss and the
           ``temporal`` stage 2 — a dilated temporal denoiser over the whole clip, conditioned
           frame by frame on the speaker, predicting x₀, with latent statistics shared over time
           (any clip length), and classifier-free guidance (scale 2) at sampling;
           ``small-temporal``'s stage 1 also adds sinusoidal positions. The demo trains
           ``small-temporal``.

Use ``reactdiff.build_generator(name, **overrides)``; ``preset_config`` returns just the config.
"""

from __future__ import annotations

from typing import Any

from reactdiff.diffusion import DiffusionConfig
from reactdiff.generator import GeneratorConfig
from reactdiff.mmt import MMTConfig
from reactdiff.training import TrainSettings
from reactdiff.unet import UNetConfig

PAPER = GeneratorConfig(
    mmt=MMTConfig(
        # Order matters: the first facial group self-attends and then attends the others
        # `depth` times; the first acoustic group attends the remaining acoustic groups.
        facial={"video_au": 25088, "video_fe": 1408, "video_va": 64},
        acoustic={"audio_wav2vec2": 1536, "audio_mfcc26": 26},
        hidden_dim=1024, feature_dim=256, depth=2, heads=4,
        decoder_blocks=2, decoder_layers=2, decoder_heads=4, dropout=0.1,
    ),
    denoiser=UNetConfig(model_channels=256, channel_mult=(1, 2, 4, 8), num_res_blocks=2,
                        attention_resolutions=(1, 2, 4), num_heads=1, dropout=0.0, cond_dim=1024, norm_groups=32),
    diffusion=DiffusionConfig(num_timesteps=20, cosine_s=0.008, max_beta=0.999, loss="l1", loss_weight=10.0),
    seq_len=750,
    window=50,
    # Reference optimisation (§3.6, §4.7): AdamW, no LR schedule, EMA 0.999, 200 epochs, batch 16.
    stage1=TrainSettings(lr=1e-4, weight_decay=5e-4, betas=(0.9, 0.999), ema_decay=0.999, epochs=200, batch_size=16),
    stage2=TrainSettings(lr=5e-5, weight_decay=5e-4, betas=(0.9, 0.999), ema_decay=0.999, epochs=200, batch_size=16),
)

SMALL = GeneratorConfig(
    mmt=MMTConfig(
        facial={"video_pixels": 1024},          # 32×32 grayscale face crop per frame (synthetic demo data)
        acoustic={"audio_mfcc26": 26},           # a single acoustic group self-attends
        hidden_dim=128, feature_dim=32, depth=2, heads=4,
        # Raw pixels and MFCC are mostly the person's constant look and voice: centre each clip
        # so the encoder sees the per-frame expression (mmt.py module doc).
        clip_centering=True,
        # One 2-layer TransformerDecoder with 2 heads instead of 2 × 2 layers × 4 heads: the
        # decoder's attention over all 750 frames (memory-bound at this width) dominated a step.
        decoder_blocks=1, decoder_layers=2, decoder_heads=2, dropout=0.1,
    ),
    # Same layout as the paper's UNet, scaled down: widths 32/64/128 over fd 32 → 16 → 8,
    # one ResBlock per level down (two up), attention at factors 2 and 4, GroupNorm(8)
    # because the widths start at 32. ≈ 1.4 M parameters; 15 windows × 20 steps per clip.
    denoiser=UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                        attention_resolutions=(2, 4), num_heads=1, dropout=0.0, cond_dim=128, norm_groups=8),
    diffusion=DiffusionConfig(),
    seq_len=750,
    window=50,
    # Larger learning rates, lighter EMA and fewer epochs than the reference so that the demo
    # (a few minutes on 2 CPU cores, 16–32 clips) visibly learns; weight decay and betas as the paper.
    stage1=TrainSettings(lr=1e-3, weight_decay=5e-4, betas=(0.9, 0.999), ema_decay=0.99, epochs=30, batch_size=8),
    stage2=TrainSettings(lr=5e-4, weight_decay=5e-4, betas=(0.9, 0.999), ema_decay=0.99, epochs=30, batch_size=8),
)

def _temporal_variant(base: GeneratorConfig, *, channels: int, cond_channels: int,
                      mmt: dict[str, Any] | None = None, **overrides: Any) -> GeneratorConfig:
    """``base`` with the improved stage-1 loss and stage 2; see docs/model.md."""
    return base.with_overrides(
        architecture="temporal",
        mmt={"emotion_loss": "mse", **(mmt or {})},      # MSE: the reconstruction CCC doubles (mmt.py)
        # Classifier-free guidance (cause 9 of docs/model.md): one item in ten trains without its
        # speaker, and sampling doubles the speaker's pull.
        diffusion={"prediction": "x0", "cond_drop": 0.1, "guidance": 2.0},
        temporal={"channels": channels, "cond_channels": cond_channels},
        **overrides)


PRESETS: dict[str, GeneratorConfig] = {
    "paper": PAPER,
    "small": SMALL,
    "paper-temporal": _temporal_variant(PAPER, channels=512, cond_channels=256),
    # Sinusoidal positions in stage 1 (cause 7 of docs/model.md): the MMT attends over all
    # frames, and without positions it cannot tell a frame's neighbours from the rest of the clip.
    # No decoder dropout (cause 8): stage 1 under-fits at this size and budget, and dropping
    # 750 × 750 attention weights was 38 % of a CPU step, so the same time buys 1.6× the steps.
    "small-temporal": _temporal_variant(SMALL, channels=128, cond_channels=64,
                                        mmt={"positional_encoding": True, "dropout": 0.0}),
}


def preset_config(name: str = "small", **overrides: Any) -> GeneratorConfig:
    """A fresh copy of a preset's config with overrides applied (see ``build_generator``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    fresh = GeneratorConfig.from_dict(PRESETS[name].to_dict())   # never hand out the shared instance
    return fresh.with_overrides(**overrides) if overrides else fresh
