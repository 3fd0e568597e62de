"""Distributed training of both ReactDiff stages with Ray Train V2 (TorchTrainer, DDP).

    reactdiff train --stage autoencoder --features latest                 # stage 1
    reactdiff train --stage diffusion   --features latest                 # stage 2 → registry
    python -m jobs.train --stage diffusion --features s3://…/snap --set scaling.num_workers=8 \
        --set scaling.use_gpu=true --set preset=paper                     # under `ray job submit`

The data flows as the paper's two stages (model.md §8):

  stage 1  snapshot clips/train ─ Snapshot.clips_dataset(only the model's columns) ─ crop ─
           streaming_split ─ per worker: iter_torch_batches → MMT auto-encoder (DDP), own
           features → own emotion + 3DMM; EMA; validation losses on clips/val; at every
           checkpoint the per-frame latent min/max over the *train* split (each worker folds its
           shard, then all-reduce MIN/MAX) → ``<storage>/<name>/autoencoder.pt`` + MLflow.
  stage 2  frozen stage 1 ─ Ray Data actor pool encodes every train/val item's speaker and
           listener once (clips read by id, each dyad in one batch so each clip is encoded once)
           ─ ``<storage>/<name>/latent_pairs/<split>/`` Parquet ─ streamed per epoch ─ latent
           diffusion (DDP over the conditioning projection + UNet); validation = diffusion loss
           on val pairs + REACT metrics on the first val items (rank 0) → generator.pt →
           MLflow model → registry version with alias ``challenger`` (from the driver).

Why pre-encode the pairs: stage 1 is frozen and its encoder is deterministic (no dropout; μ
for a variational one), so a latent computed once is exactly the latent every epoch would
compute; the encoder (121 M parameters over 26 k-wide inputs in the paper preset) then runs
once per clip instead of twice per item per epoch, and each epoch streams 2 × [T, fd] floats
per item instead of 2 × the raw features. No join is needed (Ray Data's needs polars): the
snapshot stores one Parquet file per clip, so a batch of items reads exactly its clips
(``Snapshot.load_clips``), never a whole split in one process. The pairs are cached in the
run folder (marker with the autoencoder's digest), so a resume does not re-encode.

Resume semantics (Ray Train V2 has no ``Trainer.restore``): a run is identified by
``RunConfig(name, storage_path)``. Every checkpoint holds model, EMA, optimiser, epoch, step,
the per-epoch metric history, the MLflow run id, the config and the snapshot id. A worker
failure restarts the worker group from the latest checkpoint (``FailureConfig.max_failures``);
re-running the same command (same name) continues where it stopped; a finished run starts no
workers and only re-exports (idempotent: no second registry version). MLflow receives an epoch's metrics once the checkpoint that covers it is
persisted, and only for epochs it does not hold yet — so a restart neither duplicates nor
loses an epoch in the metric history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import yaml

from pipeline import storage, tracking
from pipeline.config import ConfigError, flatten, from_dict, to_dict

log = logging.getLogger(__name__)

STAGES = ("autoencoder", "diffusion")
CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"
PAIRS_DIR = "latent_pairs"
PAIRS_MARKER = "_SUCCESS.json"
OUTPUT_FILE = {"autoencoder": "autoencoder.pt", "diffusion": "generator.pt"}
LABELS = ("emotion", "tdmm")
TAG = tracking.TAG_PREFIX


class TrainError(RuntimeError):
    """Training cannot start or finish; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Configuration (jobs/configs/train.yaml)
# ---------------------------------------------------------------------------------------------

@dataclass
class StageSettings:
    """Optimisation of one stage; ``None`` = the generator preset's value (reference settings)."""

    epochs: int | None = None
    batch_size: int | None = None        # clips (stage 1) / directed items (stage 2) per worker and step
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


@dataclass
class TrainResult:
    stage: str
    name: str
    run_dir: str
    mlflow_run_id: str
    output_uri: str                      # autoencoder.pt / generator.pt
    checkpoint_uri: str | None           # the exported checkpoint
    epoch: int
    metrics: dict[str, float]
    model_version: str | None = None     # stage 2: registered version
    model_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors, loaded with weights_only=True
# ---------------------------------------------------------------------------------------------

def write_checkpoint(directory: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    import torch

    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)


def read_checkpoint(directory: str, map_location="cpu") -> dict[str, Any]:
    """The state dict of a checkpoint directory (``torch.load(weights_only=True)``)."""
    import torch

    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location=map_location, weights_only=True)


def restore_state(checkpoint, run_dir: str) -> dict[str, Any] | None:
    """The state to resume from: Ray's latest checkpoint, or — when its file is unreadable
    (truncated upload, disk error) — the newest previous complete checkpoint of the run."""
    if checkpoint is None:
        return None
    name = os.path.basename(str(checkpoint.path).rstrip("/"))
    try:
        with checkpoint.as_directory() as d:
            return read_checkpoint(d, map_location="cpu")
    except Exception as exc:        # noqa: BLE001 - any unreadable file: fall back, naming it
        bad = storage.redact(storage.join(run_dir, name, CHECKPOINT_FILE))
        log.error("checkpoint %s is unreadable (%s: %s); resuming from the previous checkpoint",
                  bad, type(exc).__name__, " ".join(str(exc).split())[:200])
    for uri, _ in reversed(checkpoint_metas(run_dir)):
        if os.path.basename(uri.rstrip("/")) == name:
            continue
        try:
            state = load_checkpoint_uri(uri)
        except Exception as exc:    # noqa: BLE001
            log.error("previous checkpoint %s is unreadable too (%s)", storage.redact(uri), type(exc).__name__)
            continue
        log.warning("resuming from the previous checkpoint %s (epoch %s)", storage.redact(uri), state.get("epoch"))
        return state
    raise TrainError(f"checkpoint {bad} is unreadable and run {os.path.basename(run_dir)} has no other readable "
                     "checkpoint; start a new run with --set name=<new name>")


def generator_from_state(state: dict[str, Any], *, ema: bool = True):
    """The ReactDiffGenerator a checkpoint holds, with its EMA weights (what is validated/exported)."""
    import torch

    from reactdiff.generator import GeneratorConfig, ReactDiffGenerator

    with torch.device("meta"):
        gen = ReactDiffGenerator(GeneratorConfig.from_dict(state["generator_config"]))
    gen.load_state_dict(state["model"], assign=True)
    if ema:
        params = dict(gen.named_parameters())
        with torch.no_grad():
            for name, value in state["ema"]["shadow"].items():
                params[name].copy_(value.to(params[name].dtype))
    gen.metadata = dict(state.get("metadata") or {})
    gen.eval()
    return gen


def generator_from_checkpoint(checkpoint, *, ema: bool = True):
    """A ``ray.train.Checkpoint`` or a local checkpoint directory → ReactDiffGenerator."""
    if hasattr(checkpoint, "as_directory"):      # (a Checkpoint is os.PathLike but refuses fspath)
        with checkpoint.as_directory() as d:
            return generator_from_state(read_checkpoint(d), ema=ema)
    return generator_from_state(read_checkpoint(os.fspath(checkpoint)), ema=ema)


def _checkpoint_dirs(run_dir: str) -> list[str]:
    return sorted(n for n in storage.listdir(run_dir) if n.startswith("checkpoint_epoch"))


def previous_meta(run_dir: str) -> dict[str, Any] | None:
    """meta.json of the newest complete checkpoint of a run (None for a new run)."""
    metas = checkpoint_metas(run_dir)
    return metas[-1][1] if metas else None


def checkpoint_metas(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(checkpoint URI, meta.json) of every complete checkpoint of a run, oldest first."""
    out = []
    for name in _checkpoint_dirs(run_dir):
        uri = storage.join(run_dir, name)
        if storage.exists(storage.join(uri, META_FILE)) and storage.exists(storage.join(uri, CHECKPOINT_FILE)):
            out.append((uri, storage.read_json(storage.join(uri, META_FILE))))
    return out


# ---------------------------------------------------------------------------------------------
# Datasets (driver side)
# ---------------------------------------------------------------------------------------------

class _CropFrames:
    """Ray Data UDF: keep the model's columns, cropped to the first ``seq_len`` frames → [B, L, D]."""

    def __init__(self, columns: list[str], seq_len: int):
        self.columns, self.seq_len = list(columns), int(seq_len)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for c in self.columns:
            rows = list(batch[c])
            short = [i for i, x in enumerate(rows) if len(x) < self.seq_len]
            if short:
                clip = batch["clip_id"][short[0]] if "clip_id" in batch else short[0]
                raise TrainError(f"clip {clip}: {c} has {len(rows[short[0]])} frames, the model needs "
                                 f"seq_len={self.seq_len} (set model.seq_len lower)")
            out[c] = np.stack([np.asarray(x)[: self.seq_len] for x in rows])
        return out


def clip_dataset(snapshot, split: str, columns: list[str], seq_len: int):
    """Person clips of ``split`` with only ``columns`` (stored dtype; float16 stays float16)."""
    ds = snapshot.clips_dataset(columns, splits=[split], dtype=None, ordered=False)
    return ds.map_batches(_CropFrames(columns, seq_len), batch_format="numpy")


class LatentPairEncoder:
    """Ray Data actor: directed items → (speaker latent, listener latent) with the frozen stage 1."""

    def __init__(self, snapshot_uri: str, autoencoder_uri: str, batch_size: int):
        import torch

        from pipeline.registry import load_generator_file
        from pipeline.snapshot import Snapshot

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.snapshot = Snapshot.open(snapshot_uri)
        self.gen = load_generator_file(autoencoder_uri, map_location=self.device).eval()
        self.columns = list(self.gen.feature_widths)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        clip_ids = sorted(set(batch["speaker"].tolist()) | set(batch["listener"].tolist()))
        clips = self.snapshot.load_clips(clip_ids, self.columns)
        latents: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for i in range(0, len(clip_ids), self.batch_size):
                ids = clip_ids[i:i + self.batch_size]
                feats = {c: torch.from_numpy(np.stack([clips[k][c][: self.gen.config.seq_len] for k in ids]))
                         for c in self.columns}
                z = self.gen.encode(feats).float().cpu().numpy()
                latents.update(zip(ids, z))
        return {"item": batch["item"], "speaker": batch["speaker"], "listener": batch["listener"],
                "speaker_latent": np.stack([latents[s] for s in batch["speaker"]]),
                "listener_latent": np.stack([latents[s] for s in batch["listener"]])}


def _file_digest(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]


def prepare_latent_pairs(snapshot, split: str, autoencoder_uri: str, out_uri: str, *,
                         batch_size: int = 8, actors: int = 1, use_gpu: bool = False) -> tuple[str, int]:
    """Encode every directed item of ``split`` once into ``out_uri`` (Parquet); reused when complete.

    Items are ordered by dyad so an item and its mirror share a batch (each clip encoded once).
    Written under ``out_uri`` with the marker last; an incomplete folder is wiped and redone.
    """
    import ray.data

    digest = _file_digest(autoencoder_uri)
    items = snapshot.items(split)
    marker_uri = storage.join(out_uri, PAIRS_MARKER)
    if storage.exists(marker_uri):
        marker = storage.read_json(marker_uri)
        if marker.get("autoencoder_digest") == digest and marker.get("items") == len(items):
            log.info("latent pairs for %s already encoded at %s", split, out_uri)
            return out_uri, len(items)
    storage.remove(out_uri)
    if not items:
        raise TrainError(f"snapshot {snapshot.id} has no {split} items")
    rows = sorted(({"item": int(i.index), "speaker": i.speaker, "listener": i.listener} for i in items),
                  key=lambda r: (min(r["speaker"], r["listener"]), max(r["speaker"], r["listener"]), r["item"]))
    t0 = time.perf_counter()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / (2 * batch_size))))
    ds = ds.map_batches(LatentPairEncoder, fn_constructor_args=(snapshot.uri, autoencoder_uri, batch_size),
                        batch_size=2 * batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
                        num_gpus=1 if use_gpu else 0)
    fs, path = storage.arrow_filesystem(out_uri)
    storage.makedirs(out_uri)
    ds.write_parquet(path, filesystem=fs)
    storage.write_json(marker_uri, {"autoencoder_uri": autoencoder_uri, "autoencoder_digest": digest,
                                    "items": len(items), "split": split, "snapshot": snapshot.id,
                                    "seconds": round(time.perf_counter() - t0, 2)})
    log.info("encoded %d %s items into latent pairs in %.1fs", len(items), split, time.perf_counter() - t0)
    return out_uri, len(items)


def _read_pair_files(batch, root: str):
    """Ray Data UDF: read whole latent-pair Parquet files (the two latent columns only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's tensor extension type with pyarrow)

    fs, base = storage.arrow_filesystem(root)
    tables = [pq.read_table(f"{base.rstrip('/')}/{rel}", columns=["speaker_latent", "listener_latent"],
                            filesystem=fs) for rel in batch.column("file").to_pylist()]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def pairs_dataset(uri: str):
    """The latent pairs as a Ray Dataset, one block per file.

    The file list is taken once here, so each epoch re-reads the files without
    ``read_parquet``'s per-execution listing and footer-reading tasks (seconds per epoch on a
    small machine — more than a small epoch's compute).
    """
    import ray.data

    files = [{"file": f} for f in storage.walk_files(uri, ".parquet")]
    if not files:
        raise TrainError(f"no latent-pair files under {storage.redact(uri)}")
    ds = ray.data.from_items(files, override_num_blocks=len(files))
    return ds.map_batches(_read_pair_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"root": uri})


def _sharding_config():
    """DataConfig: the train set in equal shards, val/stats in uneven shards with every row.

    DDP all-reduces every step, so the train shards must yield the same number of batches
    (uneven shards deadlock, ray-project/ray PR #42601): ``equal=True`` + ``drop_last``. Val
    losses and latent statistics are reduced once at the end, so those shards may be uneven and
    then no clip is dropped from the statistics.
    """
    from ray.train import DataConfig

    class ShardingDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=(name == "train"),
                                                             locality_hints=hints)):
                    out[i][name] = split
            return out

    return ShardingDataConfig()


# ---------------------------------------------------------------------------------------------
# The training loop (every worker)
# ---------------------------------------------------------------------------------------------

def latent_diffusion_loss(gen, z_speaker, z_listener, generator=None):
    """Stage-2 ε-loss from pre-encoded stage-1 latents (= ReactDiffGenerator.diffusion_loss after
    its frozen encode): normalise, window, condition on the speaker window, 10·L1 on ε."""
    own = getattr(gen, "latent_diffusion_loss", None)
    if callable(own):
        return own(z_speaker, z_listener, generator=generator)
    from reactdiff.diffusion import epsilon_loss

    p_s = gen.latent_stats.normalize(z_speaker)
    p_l = gen.latent_stats.normalize(z_listener)
    d = gen.config.diffusion
    return epsilon_loss(gen.denoiser, gen.to_windows(p_l), gen.schedule, gen.cond(gen.to_windows(p_s)),
                        loss=d.loss, weight=d.loss_weight, generator=generator)


def _objective(gen, stage: str):
    """One nn.Module whose forward is the stage loss, so DDP's gradient hooks see every step."""
    from torch import nn

    class StageObjective(nn.Module):
        def __init__(self):
            super().__init__()
            self.generator = gen

        def forward(self, batch: dict, generator=None):
            g = self.generator
            if stage == "autoencoder":
                feats = {n: batch[n].float() for n in g.feature_widths}
                return g.autoencoder_loss(feats, batch["emotion"].float(), batch["tdmm"].float())
            return latent_diffusion_loss(g, batch["speaker_latent"].float(), batch["listener_latent"].float(),
                                         generator=generator)

    return StageObjective()


def _all_reduce(values: dict[str, float], device, op: str = "sum") -> dict[str, float]:
    import torch
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return dict(zip(keys, t.tolist()))


def _maybe_inject_failure(cfg: TrainConfig, run_dir: str, epoch: int, rank: int, world: int) -> None:
    """Test hook: rank ``fail_rank`` raises once at ``fail_at_epoch`` (a marker file makes it once)."""
    if cfg.debug.fail_at_epoch != epoch or rank != cfg.debug.fail_rank % world:
        return
    marker = storage.join(run_dir, "_debug", f"failed_at_epoch{epoch:04d}")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"rank {rank} failed on purpose at epoch {epoch}\n")
    raise RuntimeError(f"injected failure (debug.fail_at_epoch={epoch}) on rank {rank}")


def _train_epoch(model, gen, optimizer, ema, params, shard, ts: dict, loop: dict, device, bf16: bool):
    import torch

    cfg = loop["config"]
    it = iter(shard.iter_torch_batches(batch_size=loop["batch_size"], drop_last=True,
                                       prefetch_batches=cfg["data"]["prefetch_batches"],
                                       local_shuffle_buffer_size=cfg["data"]["shuffle_buffer"] or None))
    gen.train()
    sums: dict[str, Any] = {}
    items = steps = 0
    wait = first = 0.0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t0
        if steps == 0:
            first = wait                  # pipeline start-up of this epoch (read, decode, split)
        n = next(iter(batch.values())).shape[0]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, parts = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ts["grad_clip"]:
            norm = torch.nn.utils.clip_grad_norm_(params, ts["grad_clip"])
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm.detach().float() * n
        optimizer.step()
        ema.update(gen)
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() * n
        items += n
        steps += 1
    elapsed = time.perf_counter() - start
    local = {k: float(v) for k, v in sums.items()}
    red = _all_reduce({**local, "_items": items, "_steps": steps, "_wait": wait, "_first": first,
                       "_elapsed": elapsed}, device)
    world = max(1, loop["world_size"])
    total = max(1.0, red["_items"])
    out = {f"train/{k}": red[k] / total for k in local}
    out.update({"train/items": red["_items"], "train/steps": red["_steps"] / world,
                "time/train_s": red["_elapsed"] / world,
                "time/data_wait_fraction": red["_wait"] / max(red["_elapsed"], 1e-9),
                "time/first_batch_s": red["_first"] / world,
                "time/data_wait_fraction_steady": (red["_wait"] - red["_first"])
                / max(red["_elapsed"] - red["_first"], 1e-9),
                "throughput/items_per_s": red["_items"] / max(red["_elapsed"] / world, 1e-9)})
    return out


def _validate(model, gen, shard, loop: dict, device, epoch: int) -> dict[str, float]:
    import torch

    gen.eval()
    sums: dict[str, float] = {}
    items = 0
    rng = torch.Generator(device=device).manual_seed(loop["config"]["seed"] * 1000 + loop["rank"])
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=loop["batch_size"],
                                              prefetch_batches=loop["config"]["data"]["prefetch_batches"]):
            n = next(iter(batch.values())).shape[0]
            loss, parts = model.module(batch, generator=rng) if hasattr(model, "module") else model(batch, generator=rng)
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            items += n
    red = _all_reduce({**{k: sums.get(k, 0.0) for k in loop["loss_keys"]}, "_items": items}, device)
    gen.train()
    if red["_items"] == 0:
        return {}
    return {f"val/{k}": red[k] / red["_items"] for k in loop["loss_keys"]}


def _latent_statistics(gen, shard, loop: dict, device) -> int:
    """Per-frame min/max of the train latents: each worker its shard, then all-reduce MIN/MAX."""
    import torch
    import torch.distributed as dist

    gen.eval()
    gen.latent_stats.reset()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=loop["batch_size"]):
            gen.update_statistics({n: batch[n].float() for n in gen.feature_widths})
    stats = gen.latent_stats
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats.minimum, op=dist.ReduceOp.MIN)
        dist.all_reduce(stats.maximum, op=dist.ReduceOp.MAX)
        dist.all_reduce(stats.count, op=dist.ReduceOp.SUM)
    gen.train()
    return int(stats.count)


class _RankZeroValidation:
    """Rank 0's small extras: REACT metrics on the first val items (stage 2) and sample plots."""

    def __init__(self, loop: dict, device):
        from pipeline.snapshot import Snapshot

        self.loop, self.device = loop, device
        self.vcfg = loop["config"]["validation"]
        self.snapshot = Snapshot.open(loop["snapshot_uri"])
        self.subset = loop.get("val_subset")
        self._data = None

    def _load(self, widths):
        if self._data is None:
            s = self.subset
            ids = sorted(set(s["speakers"]) | set(s["listeners"]))
            clips = self.snapshot.load_clips(ids, list(widths) + ["emotion"])
            self._data = clips
        return self._data

    def run(self, gen, epoch: int, plot: bool) -> tuple[dict[str, float], Any]:
        import torch

        if not self.subset:
            return {}, None
        seq_len = gen.config.seq_len
        clips = self._load(gen.feature_widths)
        s = self.subset
        speakers, listeners = s["speakers"], s["listeners"]
        gen.eval()
        with torch.no_grad():
            feats = {n: torch.from_numpy(np.stack([clips[k][n][:seq_len] for k in speakers])).to(self.device)
                     for n in gen.feature_widths}
            if self.loop["stage"] == "autoencoder":
                emotion, _ = gen.decode(gen.encode(feats))
                pred = emotion[:, None].float().cpu().numpy()
            else:
                pred = gen.generate(feats, num_samples=self.vcfg["samples"], seed=self.loop["config"]["seed"],
                                    steps=self.vcfg["steps"]).emotion.float().cpu().numpy()
        gen.train()
        listener = np.stack([clips[k]["emotion"][:seq_len] for k in listeners])
        speaker = np.stack([clips[k]["emotion"][:seq_len] for k in speakers])
        metrics: dict[str, float] = {}
        if self.loop["stage"] == "diffusion" and self.vcfg["react_metrics"]:
            metrics = _react_metrics(pred, listener, speaker, np.asarray(s["neighbours"]))
        fig = None
        if plot:
            first = speakers[0]
            if self.loop["stage"] == "autoencoder":
                fig = tracking.reaction_figure(pred[0], speaker[0], labels=("reconstructed", "real", ""),
                                               title=f"stage 1 reconstruction, val clip {first}, epoch {epoch}")
            else:
                fig = tracking.reaction_figure(pred[0], listener[0], speaker[0],
                                               title=f"generated reactions to val speaker {first}, epoch {epoch}")
        return metrics, fig


def _react_metrics(pred, listener, speaker, neighbours) -> dict[str, float]:
    """Official REACT metrics (pipeline.evaluate.score, same functions as evaluation) on a subset."""
    try:
        from pipeline.evaluate import score

        metrics, _ = score(pred, listener, speaker, neighbours, distributed=False)
    except ImportError as exc:       # the metrics module is optional at training time
        log.warning("REACT metrics unavailable (%s); validation reports losses only", exc)
        return {}
    return {f"val/{k}": float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def train_loop_per_worker(loop: dict) -> None:
    """Ray Train V2 worker: build/restore, train epochs, validate, checkpoint, report, log (rank 0)."""
    import ray.train
    import ray.train.torch
    import torch

    from reactdiff.generator import GeneratorConfig, ReactDiffGenerator
    from reactdiff.training import EMA, TrainSettings, make_optimizer

    cfg = from_dict(TrainConfig, loop["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loop = {**loop, "rank": rank, "world_size": world}
    device = ray.train.torch.get_device()
    bf16 = loop["precision"] == "bf16" and device.type == "cuda"
    torch.manual_seed(cfg.seed)      # identical initialisation on every rank (DDP also broadcasts)
    stage, ts = cfg.stage, loop["settings"]

    # -- resume state (read first: a resumed run keeps the model it was built with) ---------------
    state = restore_state(ray.train.get_checkpoint(), loop["run_dir"])
    gen_config = state["generator_config"] if state else loop["generator_config"]

    # -- model: a fresh generator (stage 1) or the frozen stage 1 + a fresh stage 2 -----------------
    gen = ReactDiffGenerator(GeneratorConfig.from_dict(gen_config))
    if state is None and stage == "diffusion":
        from pipeline.registry import load_generator_file

        trained = load_generator_file(loop["autoencoder_uri"])
        own = gen.state_dict()
        gen.load_state_dict({k: v for k, v in trained.state_dict().items()
                             if not k.startswith(("cond.", "denoiser.")) and k in own}, strict=False)
    elif state is None and loop.get("mean_face") is not None:
        gen.set_mean_face(np.asarray(loop["mean_face"], dtype=np.float32))
    if state is not None:
        try:
            gen.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise TrainError(f"checkpoint of run {cfg.name} does not fit the model code of this version "
                             f"({str(exc)[:300]}…); start a new run with --set name=<new name>") from None
    gen.metadata = dict(loop["metadata"])
    gen.to(device)
    params = gen.set_trainable(stage)
    settings = TrainSettings(**{k: v for k, v in ts.items() if k in {f.name for f in dataclasses.fields(TrainSettings)}})
    optimizer = make_optimizer(params, settings)
    ema = EMA(gen, settings.ema_decay)
    torch.manual_seed(cfg.seed + 1 + rank)   # different noise/dropout per rank from here on

    epoch0, step, history = 0, 0, []
    run_id = loop["mlflow_run_id"]
    if state is not None:
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        epoch0, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        run_id = state.get("mlflow_run_id") or run_id
        del state
        if rank == 0:
            log.info("resumed %s from epoch %d (step %d)", cfg.name, epoch0, step)
    model = ray.train.torch.prepare_model(_objective(gen, stage), move_to_device=False,
                                          parallel_strategy_kwargs={"forward_sync_buffers": False})

    logger = tracking.EpochLogger(run_id, loop["tracking_uri"]) if rank == 0 and run_id else None
    if logger is not None and history:
        logger.log_history(history)       # epochs checkpointed before a crash but not yet in MLflow
    extras = _RankZeroValidation(loop, device) if rank == 0 else None

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    stats_shard = ray.train.get_dataset_shard("stats") if stage == "autoencoder" else None
    epochs = int(ts["epochs"])
    for epoch in range(epoch0 + 1, epochs + 1):
        _maybe_inject_failure(cfg, loop["run_dir"], epoch, rank, world)
        t_epoch = time.perf_counter()
        row: dict[str, float] = {tracking.EPOCH_METRIC: epoch}
        row.update(_train_epoch(model, gen, optimizer, ema, params, train_shard, ts, loop, device, bf16))
        step += int(row["train/steps"])
        is_checkpoint = epoch % cfg.checkpoint.every == 0 or epoch == epochs
        figure = None
        if is_checkpoint or epoch % cfg.validation.every == 0:
            t_val = time.perf_counter()
            with ema.average_parameters(gen):
                row.update(_validate(model, gen, val_shard, loop, device, epoch))
                if extras is not None:      # plots go to MLflow with their checkpoint
                    nth = epoch // cfg.checkpoint.every
                    plot = is_checkpoint and (epoch == epochs or (nth - 1) % max(1, cfg.validation.plot_every) == 0)
                    metrics, figure = extras.run(gen, epoch, plot)
                    row.update(metrics)
            row["time/val_s"] = time.perf_counter() - t_val
        if is_checkpoint and stage == "autoencoder":
            t_stats = time.perf_counter()
            with ema.average_parameters(gen):       # statistics of the weights that are exported
                row["stats/clips"] = _latent_statistics(gen, stats_shard, loop, device)
            row["time/stats_s"] = time.perf_counter() - t_stats
        row["time/epoch_s"] = time.perf_counter() - t_epoch
        history.append(row)
        metrics = {**row, "step": step}
        if not is_checkpoint:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {"model": gen.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch, "step": step, "history": history, "mlflow_run_id": run_id,
                         "generator_config": gen.config.to_dict(), "metadata": dict(gen.metadata),
                         "config": loop["config"], "stage": stage, "snapshot_id": loop["snapshot_id"],
                         "autoencoder_uri": loop.get("autoencoder_uri")}
                write_checkpoint(tmp, state, {"epoch": epoch, "step": step, "stage": stage, "mlflow_run_id": run_id,
                                              "snapshot_id": loop["snapshot_id"], "name": cfg.name,
                                              "autoencoder_uri": loop.get("autoencoder_uri"),
                                              "metrics": dict(row), "history": history})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}")
        if logger is not None:            # the checkpoint is persisted: its epochs may go to MLflow
            logger.log_history(history)
            logger.log_figure(tracking.loss_curve_figure(history, title=f"{cfg.name}"), "plots/loss_curves.png")
        if figure is not None and logger is not None:
            logger.log_figure(figure, f"plots/{'reconstruction' if stage == 'autoencoder' else 'reaction'}"
                                      f"_epoch{epoch:04d}.png")


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def _open_snapshot(ref: str):
    from pipeline.runtime import workspace
    from pipeline.snapshot import Snapshot, SnapshotError

    try:
        return Snapshot.resolve(ref, root=workspace().snapshots)
    except SnapshotError as exc:
        raise TrainError(f"features: {exc}") from None


def _find_autoencoder(cfg: TrainConfig, snapshot, uri: str) -> tuple[str, dict[str, str]]:
    """(generator file URI, tags of the stage-1 MLflow run or {}) for stage 2."""
    ref = cfg.autoencoder
    if ref and not re.fullmatch(r"[0-9a-f]{32}", ref):
        if not storage.exists(ref):
            raise TrainError(f"autoencoder: {ref} does not exist (give an autoencoder.pt URI or a stage-1 "
                             "MLflow run id)")
        return ref, {}
    c = tracking.client(uri)
    if ref:
        runs = [c.get_run(ref)]
    else:
        runs = tracking.find_runs({f"{TAG}stage": "autoencoder", f"{TAG}snapshot_id": snapshot.id},
                                  experiment=cfg.mlflow.experiment, status="FINISHED", uri=uri)
    for run in runs:
        out = run.data.tags.get(f"{TAG}output_uri")
        if out and storage.exists(out):
            return out, dict(run.data.tags)
    raise TrainError(f"no finished stage-1 run for snapshot {snapshot.id} in MLflow experiment "
                     f"{cfg.mlflow.experiment!r} ({uri}): run `reactdiff train --stage autoencoder --features "
                     f"{snapshot.id}` first, or pass --set autoencoder=<autoencoder.pt URI or MLflow run id>")


def _generator_config(cfg: TrainConfig, snapshot, autoencoder_uri: str | None):
    from reactdiff.presets import preset_config

    if cfg.stage == "autoencoder":
        overrides = {"facial": snapshot.facial, "acoustic": snapshot.acoustic, **cfg.model}
        gc = preset_config(cfg.preset, **overrides)
        missing = [n for n in gc.mmt.inputs if n not in snapshot.features]
        if missing:
            raise TrainError(f"snapshot {snapshot.id} lacks the model inputs {missing} "
                             f"(it has {', '.join(snapshot.features)})")
        return gc
    from pipeline.registry import load_generator_file

    trained = load_generator_file(autoencoder_uri)
    if not trained.latent_stats.ready:
        raise TrainError(f"autoencoder {autoencoder_uri} has no latent statistics: it is not a finished stage-1 "
                         "output (autoencoder.pt written by `reactdiff train --stage autoencoder`)")
    fsh = trained.metadata.get("feature_set_hash")
    if fsh and fsh != snapshot.feature_set_hash:
        raise TrainError(f"autoencoder {autoencoder_uri} was trained on feature set {fsh}, snapshot "
                         f"{snapshot.id} has {snapshot.feature_set_hash}: train stage 1 on this snapshot first")
    return trained.config.with_overrides(**cfg.model) if cfg.model else trained.config


def _val_subset(snapshot, max_items: int) -> dict[str, Any] | None:
    if max_items <= 0 or "val" not in snapshot.splits:
        return None
    items = snapshot.items("val")[:max_items]
    if not items:
        return None
    try:
        neighbours = np.asarray(snapshot.neighbours("val"))[: len(items), : len(items)]
    except Exception as exc:            # no neighbour matrix: each item is its only appropriate one
        log.warning("val neighbour matrix unavailable (%s): REACT metrics use the identity", exc)
        neighbours = np.eye(len(items), dtype=np.uint8)
    return {"speakers": [i.speaker for i in items], "listeners": [i.listener for i in items],
            "neighbours": neighbours.astype(np.uint8).tolist()}


def default_name(cfg: TrainConfig, snapshot, autoencoder_tags: dict[str, str], autoencoder_uri: str | None) -> str:
    if cfg.name:
        return cfg.name
    if cfg.stage == "autoencoder":
        return f"autoencoder-{cfg.preset}-{snapshot.id}"
    parent = autoencoder_tags.get(f"{TAG}run_name")
    if parent:
        return f"diffusion-from-{parent}"
    return f"diffusion-{cfg.preset}-{snapshot.id}-{hashlib.sha256(autoencoder_uri.encode()).hexdigest()[:8]}"


def _scaling(cfg: TrainConfig):
    from ray.train import ScalingConfig

    resources = cfg.scaling.resources_per_worker
    if resources is None:
        resources = {"CPU": 1.0, **({"GPU": 1.0} if cfg.scaling.use_gpu else {})}
    return ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                         resources_per_worker=dict(resources))


def _refresh_listings(uri: str) -> None:
    """Drop cached object-store listings: the workers wrote checkpoints behind this process's back."""
    fs, _ = storage.filesystem(uri)
    invalidate = getattr(fs, "invalidate_cache", None)
    if callable(invalidate):
        invalidate()


def export_checkpoint(cfg: TrainConfig, run_dir: str) -> tuple[str, dict[str, Any]]:
    """(URI, state) of the checkpoint to export: best by ``checkpoint.metric`` (``mode``), else
    the latest. An unreadable file (truncated upload, disk error) is named in the log and the
    next in that order is exported instead."""
    metas = checkpoint_metas(run_dir)
    if not metas:
        raise TrainError(f"run {cfg.name} has no complete checkpoint in {storage.redact(run_dir)}")
    metric = cfg.checkpoint.metric
    scored = [(u, m) for u, m in metas if metric and metric in (m.get("metrics") or {})]
    ranked = sorted(scored, key=lambda um: float(um[1]["metrics"][metric]), reverse=cfg.checkpoint.mode == "max")
    ranked += [um for um in reversed(metas) if um not in ranked]          # unscored: newest first
    for uri, _ in ranked:
        try:
            return uri, load_checkpoint_uri(uri)
        except Exception as exc:        # noqa: BLE001 - any unreadable file: try the next one
            log.error("checkpoint %s is unreadable (%s: %s); exporting the next best", storage.redact(uri),
                      type(exc).__name__, " ".join(str(exc).split())[:200])
    raise TrainError(f"run {cfg.name}: none of its {len(ranked)} checkpoints is readable; "
                     "start a new run with --set name=<new name>")


def load_checkpoint_uri(uri: str, map_location="cpu") -> dict[str, Any]:
    """A checkpoint directory URI (local or s3://) → its state (``torch.load(weights_only=True)``)."""
    import io

    import torch

    raw = storage.read_bytes(storage.join(uri, CHECKPOINT_FILE))
    return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)


def train(cfg: TrainConfig) -> TrainResult:
    """Train one stage end to end on Ray (driver side); returns where everything went."""
    from pipeline.runtime import init_ray

    init_ray(cfg.ray_address)
    with tracking.using(cfg.mlflow.tracking_uri) as uri:
        return _train(cfg, uri)


def _datasets(cfg: TrainConfig, snapshot, gen_config, autoencoder_uri, run_dir: str):
    """Ray datasets of the stage, the number of training rows and the loss names."""
    seq_len = gen_config.seq_len
    if cfg.stage == "autoencoder":
        inputs = list(gen_config.mmt.inputs)
        datasets = {"train": clip_dataset(snapshot, "train", inputs + list(LABELS), seq_len).randomize_block_order(),
                    "val": clip_dataset(snapshot, "val", inputs + list(LABELS), seq_len),
                    "stats": clip_dataset(snapshot, "train", inputs, seq_len)}
        keys = ["loss", "emotion_l1", "tdmm_mse"] + (["kl"] if gen_config.mmt.variational else [])
        return datasets, len(snapshot.clip_ids("train")), keys
    pairs, n_train = {}, 0
    for split in ("train", "val"):
        pairs[split], count = prepare_latent_pairs(
            snapshot, split, autoencoder_uri, storage.join(run_dir, PAIRS_DIR, split),
            batch_size=cfg.data.encode_batch_size, actors=cfg.data.encode_actors or cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu)
        n_train = count if split == "train" else n_train
    datasets = {"train": pairs_dataset(pairs["train"]).randomize_block_order(), "val": pairs_dataset(pairs["val"])}
    return datasets, n_train, ["loss", f"eps_{gen_config.diffusion.loss}"]


def _fit(cfg: TrainConfig, loop: dict, datasets: dict, storage_path: str) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    fs, path = (storage.arrow_filesystem(storage_path) if storage.is_remote(storage_path)
                else (None, storage_path))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop, scaling_config=_scaling(cfg),
        run_config=RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                               checkpoint_score_attribute=cfg.checkpoint.metric,
                                               checkpoint_score_order=cfg.checkpoint.mode)),
        datasets=datasets, dataset_config=_sharding_config())
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise TrainError(f"training {cfg.name} failed: {result.error}")
    log.info("trainer.fit of %s took %.1fs", cfg.name, time.perf_counter() - t0)


def _train(cfg: TrainConfig, uri: str) -> TrainResult:
    from pipeline.runtime import workspace

    snapshot = _open_snapshot(cfg.features)
    for split in ("train", "val"):       # model selection uses val, never test
        if split not in snapshot.splits or not snapshot.clip_ids(split):
            raise TrainError(f"snapshot {snapshot.id} has no {split} clips (splits: {', '.join(snapshot.splits)}); "
                             "training needs train and val")
    autoencoder_uri, ae_tags = (None, {})
    if cfg.stage == "diffusion":
        autoencoder_uri, ae_tags = _find_autoencoder(cfg, snapshot, uri)
    gen_config = _generator_config(cfg, snapshot, autoencoder_uri)
    name = default_name(cfg, snapshot, ae_tags, autoencoder_uri)
    cfg = dataclasses.replace(cfg, name=name)
    storage_path = cfg.storage_path or workspace().checkpoints
    if not storage.is_remote(storage_path):
        storage_path = os.path.abspath(storage_path)
    run_dir = storage.join(storage_path, name)
    settings = resolved_settings(cfg, gen_config)
    world = cfg.scaling.num_workers
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cfg.scaling.use_gpu else "fp32")

    _refresh_listings(run_dir)
    previous = previous_meta(run_dir)
    if previous and previous.get("stage") != cfg.stage:
        raise TrainError(f"run {name} in {storage_path} is a {previous.get('stage')} run; choose another --set name")
    if previous and cfg.stage == "diffusion" and previous.get("autoencoder_uri") != autoencoder_uri:
        raise TrainError(f"run {name} was trained from autoencoder {previous.get('autoencoder_uri')}, not "
                         f"{autoencoder_uri}; resume with --set autoencoder={previous.get('autoencoder_uri')} "
                         "or start a new run with --set name=…")
    done = bool(previous) and int(previous["epoch"]) >= int(settings["epochs"])

    # -- MLflow run: created once per Ray run, reopened on every resume -------------------------------
    tags = {f"{TAG}stage": cfg.stage, f"{TAG}preset": cfg.preset, f"{TAG}run_name": name,
            f"{TAG}snapshot_id": snapshot.id, f"{TAG}snapshot_uri": snapshot.uri,
            f"{TAG}feature_set_hash": snapshot.feature_set_hash, f"{TAG}storage_path": storage_path,
            f"{TAG}run_dir": run_dir, f"{TAG}autoencoder_uri": autoencoder_uri,
            f"{TAG}num_workers": world, f"{TAG}precision": precision}
    params = flatten(to_dict(cfg))
    params.update({f"resolved.{k}": v for k, v in settings.items()})
    tracking.ensure_experiment(cfg.mlflow.experiment, uri)
    run_id = previous.get("mlflow_run_id") if previous else None
    if run_id:
        tracking.reopen_run(run_id, tags=tags, params=params, uri=uri)
        log.info("run %s has checkpoints up to epoch %s (MLflow run %s): %s", name, previous.get("epoch"), run_id,
                 "exporting only" if done else "resuming")
    else:
        run_id = tracking.create_run(experiment=cfg.mlflow.experiment, run_name=name, tags=tags,
                                     params=params, uri=uri)
    tracking.log_snapshot_input(run_id, snapshot.uri, snapshot.id, snapshot.feature_set_hash,
                                columns=list(gen_config.mmt.inputs) + list(LABELS), uri=uri)
    tracking.client(uri).log_text(run_id, yaml.safe_dump({"train": to_dict(cfg), "resolved": settings,
                                                          "generator": gen_config.to_dict()}, sort_keys=False),
                                  "config.yaml")
    metadata = {"snapshot_id": snapshot.id, "feature_set_hash": snapshot.feature_set_hash,
                "run_name": name, "mlflow_run_id": run_id, "preset": cfg.preset, "stage": cfg.stage}

    try:
        if not done:
            datasets, n_train, loss_keys = _datasets(cfg, snapshot, gen_config, autoencoder_uri, run_dir)
            per_worker = n_train // world
            if per_worker < 1:
                raise TrainError(f"{n_train} training rows cannot feed {world} workers; lower scaling.num_workers")
            batch_size = min(int(settings["batch_size"]), per_worker)
            if batch_size < settings["batch_size"]:
                log.warning("batch_size %d > %d rows per worker: using %d", settings["batch_size"], per_worker,
                            batch_size)
            mean_face = snapshot.mean_face()
            loop = {"config": to_dict(cfg), "settings": settings, "generator_config": gen_config.to_dict(),
                    "batch_size": batch_size, "precision": precision, "run_dir": run_dir, "mlflow_run_id": run_id,
                    "tracking_uri": uri, "snapshot_uri": snapshot.uri, "snapshot_id": snapshot.id,
                    "autoencoder_uri": autoencoder_uri, "metadata": metadata, "stage": cfg.stage,
                    "mean_face": None if mean_face is None else mean_face.tolist(), "loss_keys": loss_keys,
                    "val_subset": _val_subset(snapshot, cfg.validation.max_items)}
            log.info("training %s: %s stage, %d worker(s), %d epochs, batch %d/worker, storage %s, MLflow %s",
                     name, cfg.stage, world, settings["epochs"], batch_size, storage.redact(run_dir), uri)
            _fit(cfg, loop, datasets, storage_path)
        _refresh_listings(run_dir)
        return _finish(cfg, snapshot, run_dir, run_id, uri, metadata, autoencoder_uri)
    except BaseException:
        tracking.finish_run(run_id, "FAILED", uri)
        raise


def _finish(cfg: TrainConfig, snapshot, run_dir: str, run_id: str, uri: str, metadata: dict,
            autoencoder_uri: str | None) -> TrainResult:
    """Driver: flush history, export the chosen checkpoint, log it, register (stage 2); idempotent."""
    latest_uri, latest = checkpoint_metas(run_dir)[-1]
    # A crash between a checkpoint and rank 0's MLflow flush leaves epochs unlogged: log them now.
    tracking.EpochLogger(run_id, uri).log_history(latest.get("history") or [])
    checkpoint_uri, state = export_checkpoint(cfg, run_dir)
    generator = generator_from_state(state)
    del state
    generator.metadata.update(metadata)
    output_uri = storage.join(run_dir, OUTPUT_FILE[cfg.stage])
    c = tracking.client(uri)
    tags = c.get_run(run_id).data.tags
    version, model_uri = tags.get(f"{TAG}registered_version"), tags.get(f"{TAG}model_uri")
    if tags.get(f"{TAG}exported_checkpoint") != checkpoint_uri or not storage.exists(output_uri):
        storage.write_bytes(output_uri, generator.to_bytes())
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, OUTPUT_FILE[cfg.stage])
            generator.save(local)
            c.log_artifact(run_id, local, cfg.stage)
        if cfg.stage == "diffusion" and cfg.mlflow.register:
            from pipeline.registry import register_generator

            mv = register_generator(generator, name=cfg.mlflow.model_name, run_id=run_id, snapshot=snapshot,
                                    alias=cfg.mlflow.alias,
                                    tags={"stage1_uri": autoencoder_uri, "checkpoint": checkpoint_uri,
                                          "run_name": cfg.name})
            version, model_uri = str(mv.version), f"models:/{cfg.mlflow.model_name}/{mv.version}"
            tracking.set_tags(run_id, {f"{TAG}registered_version": version, f"{TAG}model_uri": model_uri}, uri)
        tracking.set_tags(run_id, {f"{TAG}exported_checkpoint": checkpoint_uri, f"{TAG}output_uri": output_uri}, uri)
    else:
        log.info("run %s had already exported %s; nothing new to log or register", cfg.name, checkpoint_uri)
    tracking.finish_run(run_id, "FINISHED", uri)
    metrics = {k: float(v) for k, v in (latest.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return TrainResult(stage=cfg.stage, name=cfg.name, run_dir=run_dir, mlflow_run_id=run_id, output_uri=output_uri,
                       checkpoint_uri=checkpoint_uri, epoch=int(latest["epoch"]), metrics=metrics,
                       model_version=version, model_uri=model_uri)
