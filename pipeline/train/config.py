"""Configuration of a training run (jobs/configs/train.yaml): TrainConfig, its settings, TrainError.

A module of its own so that the driver (pipeline.train.job), the workers (pipeline.train.loop) and
the checkpoint / latent-pair helpers import it without importing each other; ``pipeline.train.job``
re-exports these classes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.registry import runs as tracking
from pipeline.config import ConfigError

STAGES = ("autoencoder", "diffusion")


class TrainError(RuntimeError):
    """Training cannot start or finish; the message says what to change."""


@dataclass
class StageSettings:
    """Optimisation of one stage; ``None`` = the generator preset's value (reference settings)."""

    epochs: int | None = None
    batch_size: int | None = None        # clips (stage 1) / directed items (stage 2) per optimiser step, all workers together
    lr: float | None = None
    weight_decay: float | None = None
    ema_decay: float | None = None
    grad_clip: float | None = 1.0        # max global grad norm; null = no clipping (reference)


@dataclass
class ScalingSettings:
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None   # default: 1 CPU (+ 1 GPU with use_gpu)


@dataclass
class CheckpointSettings:
    every: int = 1                       # epochs between checkpoints (the last epoch always is one)
    num_to_keep: int | None = 2
    metric: str | None = "val/loss"      # score of the "best" checkpoint, which is exported; null = latest
    mode: Literal["min", "max"] = "min"


@dataclass
class ValidationSettings:
    every: int = 1                       # epochs between validations (checkpoint epochs always validate)
    react_metrics: bool = True           # stage 2: REACT metrics on the first val items (rank 0)
    max_items: int = 8
    samples: int = 2
    steps: int | None = None             # sampler steps for those metrics (null = all)
    plot_every: int = 5                  # sample-reaction plot every N checkpoints (+ the last epoch)


@dataclass
class DataSettings:
    prefetch_batches: int = 2
    shuffle_buffer: int = 16             # rows in the local shuffle buffer of each worker (0 = off)
    encode_batch_size: int = 8           # stage 2: items per latent-encoding batch
    encode_actors: int = 0               # stage 2: encoding actors (0 = num_workers)


@dataclass
class MLflowSettings:
    tracking_uri: str | None = None      # null: $MLFLOW_TRACKING_URI, else the workspace sqlite
    experiment: str = tracking.DEFAULT_EXPERIMENT
    register: bool = True                # stage 2: register the generator
    model_name: str = "reactdiff"
    alias: str = "challenger"


@dataclass
class DebugSettings:
    fail_at_epoch: int | None = None     # rank ``fail_rank`` raises once at the start of this epoch
    fail_rank: int = 1


@dataclass
class TrainConfig:
    stage: Literal["autoencoder", "diffusion"] = "autoencoder"
    features: str = "latest"             # snapshot URI, id under the workspace snapshots, or "latest"
    preset: str = "small"                # generator preset (reactdiff.presets)
    model: dict[str, Any] = field(default_factory=dict)   # build_generator overrides, e.g. {seq_len: 100}
    autoencoder: str | None = None       # stage 2: stage-1 file/URI or MLflow run id; null = newest for the snapshot
    name: str | None = None              # Ray Train run name = MLflow run name; same name = resume
    storage_path: str | None = None      # local or s3://; null = the workspace checkpoints
    seed: int = 6
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    max_failures: int = 2
    ray_address: str | None = None
    stage1: StageSettings = field(default_factory=StageSettings)
    stage2: StageSettings = field(default_factory=StageSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    data: DataSettings = field(default_factory=DataSettings)
    mlflow: MLflowSettings = field(default_factory=MLflowSettings)
    debug: DebugSettings = field(default_factory=DebugSettings)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage: must be one of {list(STAGES)}, got {self.stage!r}")
        if self.scaling.num_workers < 1:
            raise ConfigError("scaling.num_workers: must be ≥ 1")
        for key, value in (("checkpoint.every", self.checkpoint.every), ("validation.every", self.validation.every)):
            if value < 1:
                raise ConfigError(f"{key}: must be ≥ 1")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"name: {self.name!r} may hold only letters, digits, '.', '_' and '-'")
        if self.stage == "diffusion":
            bad = sorted(set(self.model) - {"denoiser", "diffusion", "stage2", "model_channels", "channel_mult",
                                            "num_res_blocks", "attention_resolutions", "cond_dim"})
            if bad:
                raise ConfigError(f"model.{bad[0]}: stage 2 keeps the stage-1 model as trained; only "
                                  "denoiser/diffusion/stage2 options may change")

    @property
    def settings(self) -> StageSettings:
        return self.stage1 if self.stage == "autoencoder" else self.stage2


def resolved_settings(cfg: TrainConfig, generator_config) -> dict[str, Any]:
    """The stage's TrainSettings: preset values overridden by the non-null config values."""
    preset = generator_config.stage1 if cfg.stage == "autoencoder" else generator_config.stage2
    out = dataclasses.asdict(preset)
    out["betas"] = list(out["betas"])
    out["grad_clip"] = cfg.settings.grad_clip
    for key in ("epochs", "batch_size", "lr", "weight_decay", "ema_decay"):
        value = getattr(cfg.settings, key)
        if value is not None:
            out[key] = value
    return out
