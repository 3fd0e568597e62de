"""ReactDiff: latent diffusion for multiple appropriate facial reaction generation.

The model library (PyTorch + numpy only): the stage-1 Multi-Modality Transformer
auto-encoder, the stage-2 latent diffusion (denoiser, schedule, DDIM sampler), the
``ReactDiffGenerator`` that ties them together, named presets and the REACT metrics.

    import reactdiff
    gen = reactdiff.build_generator("small")
    reaction = gen.generate({"video_pixels": v, "audio_mfcc26": a}, num_samples=10, seed=0)

Exports resolve lazily so ``import reactdiff`` (e.g. for ``__version__`` in the CLI) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_generator": "reactdiff.generator",
    "ReactDiffGenerator": "reactdiff.generator",
    "GeneratorConfig": "reactdiff.generator",
    "LatentStatistics": "reactdiff.generator",
    "SpeakerCondition": "reactdiff.generator",
    "Reaction": "reactdiff.generator",
    "Sampling": "reactdiff.windows",
    "CheckpointError": "reactdiff.generator",
    "PRESETS": "reactdiff.presets",
    "preset_config": "reactdiff.presets",
    "MMTConfig": "reactdiff.mmt",
    "MMTAutoencoder": "reactdiff.mmt",
    "UNetConfig": "reactdiff.unet",
    "UNet1D": "reactdiff.unet",
    "DiffusionConfig": "reactdiff.diffusion",
    "NoiseSchedule": "reactdiff.diffusion",
    "ddim_sample": "reactdiff.diffusion",
    "ddim_step": "reactdiff.diffusion",
    "epsilon_loss": "reactdiff.diffusion",
    "TrainSettings": "reactdiff.training",
    "EMA": "reactdiff.training",
    "make_optimizer": "reactdiff.training",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reactdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers see the real names
    from reactdiff.diffusion import DiffusionConfig, NoiseSchedule, ddim_sample, ddim_step, epsilon_loss
    from reactdiff.generator import (CheckpointError, GeneratorConfig, LatentStatistics, Reaction,
                                     ReactDiffGenerator, SpeakerCondition, build_generator)
    from reactdiff.mmt import MMTAutoencoder, MMTConfig
    from reactdiff.presets import PRESETS, preset_config
    from reactdiff.training import EMA, TrainSettings, make_optimizer
    from reactdiff.unet import UNet1D, UNetConfig
    from reactdiff.windows import Sampling
