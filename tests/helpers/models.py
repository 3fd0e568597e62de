"""Tiny networks for the tests: the generator (model library, evaluation) and the feature
extractors' networks (TorchScript, wav2vec2), all going through the real loaders."""

from __future__ import annotations

import os

import torch

import reactdiff

# Three facial and two acoustic groups: exercises the named-group fusion of the paper layout
# (first facial group self-attends, then cross-attends the others; first acoustic group
# attends the second) at toy widths. 40 frames = 4 windows of 10.
TINY = dict(
    seq_len=40,
    window=10,
    facial={"video_a": 12, "video_b": 6, "video_c": 4},
    acoustic={"audio_x": 5, "audio_y": 3},
    mmt={"hidden_dim": 32, "feature_dim": 16, "heads": 2, "decoder_heads": 2, "decoder_blocks": 1},
    denoiser={"model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
              "attention_resolutions": (2,), "cond_dim": 32, "norm_groups": 8},
)


def tiny_generator(seed: int = 0, layout: dict = TINY, *, random_stats: bool = False,
                   **overrides) -> reactdiff.ReactDiffGenerator:
    """An untrained ``small`` generator: ``layout`` with ``overrides`` on top, weights from ``seed``.

    Its latent statistics are empty (the model tests fill them from features). ``random_stats``
    fills them from 4 random latents and returns the model in eval mode: enough to sample,
    register and evaluate it without a stage 1.
    """
    torch.manual_seed(seed)
    gen = reactdiff.build_generator("small", **{**layout, **overrides})
    if random_stats:
        gen.latent_stats.update(torch.randn(4, gen.config.seq_len, gen.config.mmt.feature_dim))
        gen.eval()
    return gen


def features(widths: dict[str, int], batch: int | None, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random named features [batch, frames, width] (or [frames, width] when batch is None)."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch is not None else ()
    return {name: torch.randn(*shape, frames, w, generator=g) for name, w in widths.items()}


# ---------------------------------------------------------------------------------------------
# Feature extractors' networks


def save_tiny_torchscript(path: str | os.PathLike, width: int = 8, seed: int = 0) -> str:
    """A per-frame TorchScript network: [n, 3, 224, 224] -> [n, width] (conv, pool, linear)."""
    torch.manual_seed(seed)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
            self.fc = torch.nn.Linear(4 * 4 * 4, width)

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
            return self.fc(x.flatten(1))

    scripted = torch.jit.script(Tiny().eval())
    scripted.save(str(path))
    return str(path)


TINY_WAV2VEC2 = dict(
    extractor_mode="group_norm",
    # The base model's strides (5 x 2^6 = 320 samples = 20 ms at 16 kHz) with few channels.
    extractor_conv_layer_config=[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2,
    extractor_conv_bias=False, encoder_embed_dim=32, encoder_projection_dropout=0.0,
    encoder_pos_conv_kernel=16, encoder_pos_conv_groups=4, encoder_num_layers=1, encoder_num_heads=2,
    encoder_attention_dropout=0.0, encoder_ff_interm_features=64, encoder_ff_interm_dropout=0.0,
    encoder_dropout=0.0, encoder_layer_norm_first=False, encoder_layer_drop=0.0,
)


def tiny_wav2vec2(seed: int = 0):
    import torchaudio

    torch.manual_seed(seed)
    return torchaudio.models.wav2vec2_model(**TINY_WAV2VEC2, aux_num_out=None).eval()


def save_tiny_wav2vec2(path: str | os.PathLike, seed: int = 0) -> str:
    """A randomly initialised small wav2vec2 as {"config", "state_dict"} (torch.save, weights only)."""
    model = tiny_wav2vec2(seed)
    torch.save({"config": {k: (list(v) if isinstance(v, list) else v) for k, v in TINY_WAV2VEC2.items()},
                "state_dict": model.state_dict()}, str(path))
    return str(path)
