"""Configuration of a training run (jobs/configs/train.yaml): TrainConfig, its settings, TrainError.

A module of its own so that the driver (pipeline.train.job), the workers (pipeline.train.loop) and
the checkpoint / latent-pair helpers import it without importing each other; ``pipeline.train.job``
re-exports these classes. ``WorkerPlan`` is what crosses the Ray Train boundary.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config import ConfigError, option
from pipeline.registry import runs as tracking
from reactdiff.training import TrainSettings
from pipeline.errors import UserError

STAGES = ("autoencoder", "diffusion")


class TrainError(UserError, RuntimeError):
    """Training cannot start or finish; the message says what to change."""


def _overrides_of(settings: type, name: str, **defaults: Any) -> type:
    """Dataclass ``name`` with every field of dataclass ``settings`` (same help), each optional and
    None (= keep the preset's value) unless ``defaults`` gives it another default."""
    hints = typing.get_type_hints(settings)
    cls = dataclasses.make_dataclass(name, [
        (f.name, hints[f.name] | None, dataclasses.field(default=defaults.get(f.name), metadata=f.metadata))
        for f in dataclasses.fields(settings)])
    cls.__module__ = __name__            # pickled by reference, like a class written here
    return cls


# A stage's section of train.yaml: overrides of the generator preset's TrainSettings (the
# reference settings), ``TrainSettings.with_overrides`` applies them. Derived from TrainSettings
# so that a setting is declared once; gradient clipping is this pipeline's one different default.
StageSettings = _overrides_of(TrainSettings, "StageSettings", grad_clip=1.0)


@dataclass
class ScalingSettings:
    num_workers: int = option(2, "Ray Train workers", flag="--num-workers")
    use_gpu: bool = option(False, "one GPU per worker", flag="--gpu")
    resources_per_worker: dict[str, float] | None = option(None, "default: {CPU: 1} (+ {GPU: 1} with use_gpu)")


@dataclass
class CheckpointSettings:
    every: int = option(1, "epochs between checkpoints (the last epoch always is one)")
    num_to_keep: int | None = option(2, "checkpoints kept")
    # The last epoch by default, as the reference: a stage 1 picked by its lowest validation
    # loss stopped at 240 of 480 steps on the demo's data and its generator lost a third of its
    # FRCorr (docs/model.md, cause 8), so reconstruction loss does not choose stage 1 well.
    metric: str | None = option(None, "export the best checkpoint by this metric, e.g. val/loss "
                                      "(null: the latest)")
    mode: Literal["min", "max"] = option("min", "whether the best metric is the min or the max")


@dataclass
class ValidationSettings:
    every: int = option(1, "epochs between validations, always on val (checkpoint epochs always validate)")
    react_metrics: bool = option(True, "stage 2: FRCorr, FRDist, ... on the first max_items val items (rank 0)")
    max_items: int = option(8, "val items of those metrics")
    samples: int = option(2, "reactions per item of those metrics")
    steps: int | None = option(None, "sampler steps for those metrics (null = all)")
    plot_every: int = option(5, "sample-reaction plot every N checkpoints (+ the last epoch)")


@dataclass
class DataSettings:
    prefetch_batches: int = option(2, "batches each worker prefetches")
    shuffle_buffer: int = option(16, "rows in the local shuffle buffer of each worker (0 = off)")
    cache_mb: int = option(512, "keep each worker's train shard in memory after the first epoch when every "
                                "worker's fits in this many MB; later epochs reshuffle it locally (0 = stream "
                                "every epoch)")
    encode_batch_size: int = option(8, "stage 2: items per latent-encoding batch")
    encode_actors: int = option(0, "stage 2: latent-encoding actors (0 = scaling.num_workers)")


@dataclass
class MLflowSettings:
    tracking_uri: str | None = option(None, "null: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db")
    experiment: str = option(tracking.DEFAULT_EXPERIMENT, "MLflow experiment of the training runs")
    register: bool = option(True, "stage 2: register the generator as a new version of model_name with alias")
    model_name: str = option("reactdiff", "registered model")
    alias: str = option("challenger", "alias the new version gets")


@dataclass
class DebugSettings:
    fail_at_epoch: int | None = option(None, "tests: rank fail_rank raises once at the start of this epoch")
    fail_rank: int = option(1, "tests: the rank that fails")


@dataclass
class TrainConfig:
    stage: Literal["autoencoder", "diffusion"] = option(
        "autoencoder", "autoencoder = stage 1 (MMT), diffusion = stage 2", flag="--stage")
    features: str = option("latest", "feature snapshot: URI, id under <workdir>/snapshots, or 'latest'",
                           flag="--features", metavar="SNAPSHOT")
    preset: str = option("small-temporal", "generator preset (reactdiff.presets.PRESETS): small-temporal / "
                                           "paper-temporal = the improved variant (docs/model.md), small / "
                                           "paper = the paper's design", flag="--preset")
    model: dict[str, Any] = option({}, "build_generator overrides, e.g. {seq_len: 100}; stage 2: "
                                       "denoiser/diffusion options only")
    autoencoder: str | None = option(None, "stage 2: stage-1 autoencoder.pt URI or MLflow run id (default: the "
                                           "newest for the snapshot)", flag="--autoencoder", metavar="URI")
    name: str | None = option(None, "run name (Ray Train = MLflow); the same name resumes that run "
                                    "(default: derived)", flag="--name")
    storage_path: str | None = option(None, "checkpoint storage: local path or s3://bucket/prefix "
                                            "(default: <workdir>/checkpoints)", flag="--storage", metavar="URI")
    seed: int = option(6, "seed of torch, numpy and the data order")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    max_failures: int = option(2, "worker-group restarts from the last checkpoint before giving up")
    ray_address: str | None = option(None, "Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray "
                                           "on 127.0.0.1)", flag="--ray-address")
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


def resolved_settings(cfg: TrainConfig, generator_config) -> TrainSettings:
    """The stage's TrainSettings: the preset's, overridden by the non-null config values."""
    preset = generator_config.stage1 if cfg.stage == "autoencoder" else generator_config.stage2
    try:
        return preset.with_overrides(dataclasses.asdict(cfg.settings))
    except ValueError as exc:
        raise ConfigError(f"{'stage1' if cfg.stage == 'autoencoder' else 'stage2'}: {exc}") from None


@dataclass
class ValSubset:
    """The first val items, for rank 0's REACT metrics and plots (official order)."""

    speakers: list[str]
    listeners: list[str]
    neighbours: list[list[int]]          # their appropriateness matrix [N, N]


@dataclass
class WorkerPlan:
    """What the driver hands every Ray Train worker: ``train_loop_config={"plan": plan}``.

    Plain values and dataclasses only (Ray pickles it to each worker); everything the worker
    needs besides its dataset shards and the checkpoint it resumes from.
    """

    config: TrainConfig                  # the run's config (name set)
    settings: TrainSettings              # the stage's optimisation: preset + overrides
    generator_config: dict[str, Any]     # GeneratorConfig.to_dict() of the model a fresh run builds
    batch_size: int                      # rows per worker and optimiser step
    precision: Literal["fp32", "bf16"]
    run_dir: str                         # <storage_path>/<name>
    mlflow_run_id: str
    tracking_uri: str
    snapshot_uri: str
    snapshot_id: str
    autoencoder_uri: str | None          # stage 2: the frozen stage-1 file
    metadata: dict[str, Any]             # copied onto the generator (snapshot, feature set, run)
    mean_face: list[float] | None        # stage 1: the snapshot's mean 3DMM face
    loss_keys: list[str]                 # validation losses all ranks reduce
    val_subset: ValSubset | None

    @property
    def stage(self) -> str:
        return self.config.stage
