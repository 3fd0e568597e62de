"""Distributed training of both ReactDiff stages with Ray Train V2 (TorchTrainer, DDP).

    reactdiff train --stage autoencoder --features latest                 # stage 1
    reactdiff train --stage diffusion   --features latest                 # stage 2 → registry
    python -m jobs.train --stage diffusion --features s3://…/snap --set scaling.num_workers=8 \
        --set scaling.use_gpu=true --set preset=paper                     # under `ray job submit`

This module is the driver: ``train()`` opens the snapshot, creates or reopens the MLflow run,
builds the datasets, runs the TorchTrainer, then exports and registers. The rest lives in
pipeline.train.loop (what every Ray Train worker runs), pipeline.train.config (TrainConfig, its
settings and TrainError, re-exported here), pipeline.train.checkpoints (a run's checkpoint files) and
pipeline.train.latent_pairs (stage 2's encoded pairs).

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

Why pre-encode the pairs (pipeline.train.latent_pairs): stage 1 is frozen and its encoder is
deterministic (no dropout; μ for a variational one), so a latent computed once is exactly the
latent every epoch would compute; the encoder (121 M parameters over 26 k-wide inputs in the
paper preset) then runs once per clip instead of twice per item per epoch, and each epoch
streams 2 × [T, fd] floats per item instead of 2 × the raw features. No join is needed (Ray
Data's needs polars): the snapshot stores one Parquet file per clip, so a batch of items reads
exactly its clips (``Snapshot.load_clips``), never a whole split in one process. The pairs are
cached in the run folder (marker with the autoencoder's digest), so a resume does not re-encode.

Resume semantics (Ray Train V2 has no ``Trainer.restore``): a run is identified by
``RunConfig(name, storage_path)``. Every checkpoint (pipeline.train.checkpoints) holds model, EMA,
optimiser, epoch, step, the per-epoch metric history, the MLflow run id, the config and the
snapshot id. A worker failure restarts the worker group from the latest checkpoint
(``FailureConfig.max_failures``); re-running the same command (same name) continues where it
stopped; a finished run starts no workers and only re-exports (idempotent: no second registry
version). MLflow receives an epoch's metrics once the checkpoint that covers it is persisted,
and only for epochs it does not hold yet — so a restart neither duplicates nor loses an epoch in
the metric history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from pipeline import progress, storage
from pipeline.config import flatten, to_dict
from pipeline.data.snapshot import Snapshot, SnapshotError
from pipeline.registry import runs as tracking
from pipeline.registry.models import load_generator_file, register_generator
from pipeline.runtime import init_ray, workspace
from pipeline.train.checkpoints import checkpoint_metas, export_checkpoint, generator_from_state, previous_meta
from pipeline.train.config import (CheckpointSettings, DataSettings, DebugSettings, MLflowSettings, ScalingSettings,
                                   StageSettings, TrainConfig, TrainError, ValidationSettings, ValSubset,
                                   WorkerPlan, resolved_settings)
from pipeline.train.latent_pairs import pairs_dataset, prepare_latent_pairs
# train_loop takes its config from train_config and never imports this module: no import cycle.
from pipeline.train.loop import train_loop_per_worker

__all__ = ["train", "TrainConfig", "TrainResult", "TrainError", "StageSettings", "ScalingSettings",
           "CheckpointSettings", "ValidationSettings", "DataSettings", "MLflowSettings", "DebugSettings",
           "default_name"]

log = logging.getLogger(__name__)

PAIRS_DIR = "latent_pairs"
OUTPUT_FILE = {"autoencoder": "autoencoder.pt", "diffusion": "generator.pt"}
LABELS = ("emotion", "tdmm")
TAG = tracking.TAG_PREFIX


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

def _sharding_config():
    """DataConfig: the train set in equal shards, val/stats in uneven shards with every row.

    DDP all-reduces every step, so the train shards must yield the same number of batches
    (uneven shards deadlock, ray-project/ray PR #42601): ``equal=True`` + ``drop_last``. Val
    losses and latent statistics are reduced once at the end, so those shards may be uneven and
    then no clip is dropped from the statistics. Only public DataConfig API is used (the
    ``configure`` hook and ``default_ingest_options``), with shard locality always on.
    """
    from ray.train import DataConfig

    class ShardingDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = DataConfig.default_ingest_options()
                for i, split in enumerate(ds.streaming_split(world_size, equal=(name == "train"),
                                                             locality_hints=worker_node_ids)):
                    out[i][name] = split
            return out

    return ShardingDataConfig()

# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def _open_snapshot(ref: str):
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
    from reactdiff.mmt import ACOUSTIC_ROLES, FACIAL_ROLES, in_role_order
    from reactdiff.presets import preset_config

    if cfg.stage == "autoencoder":
        # The snapshot's feature groups, in the attention roles of the model's definition
        # (mmt.in_role_order), never in the snapshot's (sorted) column order.
        gc = preset_config(cfg.preset, facial=in_role_order(snapshot.facial, FACIAL_ROLES),
                           acoustic=in_role_order(snapshot.acoustic, ACOUSTIC_ROLES))
        if cfg.model:
            gc = gc.with_overrides(**cfg.model)
        missing = [n for n in gc.mmt.inputs if n not in snapshot.features]
        if missing:
            raise TrainError(f"snapshot {snapshot.id} lacks the model inputs {missing} "
                             f"(it has {', '.join(snapshot.features)})")
        return gc
    trained = load_generator_file(autoencoder_uri)
    if not trained.latent_stats.ready:
        raise TrainError(f"autoencoder {autoencoder_uri} has no latent statistics: it is not a finished stage-1 "
                         "output (autoencoder.pt written by `reactdiff train --stage autoencoder`)")
    fsh = trained.metadata.get("feature_set_hash")
    if fsh and fsh != snapshot.feature_set_hash:
        raise TrainError(f"autoencoder {autoencoder_uri} was trained on feature set {fsh}, snapshot "
                         f"{snapshot.id} has {snapshot.feature_set_hash}: train stage 1 on this snapshot first")
    return trained.config.with_overrides(**cfg.model) if cfg.model else trained.config


def _val_subset(snapshot, max_items: int) -> ValSubset | None:
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
    return ValSubset(speakers=[i.speaker for i in items], listeners=[i.listener for i in items],
                     neighbours=neighbours.astype(np.uint8).tolist())


def default_name(cfg: TrainConfig, snapshot, autoencoder_tags: dict[str, str], autoencoder_uri: str | None) -> str:
    if cfg.name:
        return cfg.name
    if cfg.stage == "autoencoder":
        return f"autoencoder-{cfg.preset}-{snapshot.id}"
    parent = autoencoder_tags.get(f"{TAG}run_name")
    if parent:
        return f"diffusion-from-{parent}"
    return f"diffusion-{cfg.preset}-{snapshot.id}-{hashlib.sha256(autoencoder_uri.encode()).hexdigest()[:8]}"


def worker_batch_size(batch_size: int, world: int, n_train: int) -> int:
    """Rows per worker and optimiser step for a *global* ``batch_size`` (the reference's 16 items
    per step, whatever the number of workers): the same optimisation on 1 or 8 GPUs."""
    if batch_size % world:
        raise TrainError(f"batch_size {batch_size} (items per optimiser step, all workers together) does not "
                         f"divide over {world} workers; choose a multiple of {world} or another scaling.num_workers")
    per_worker = n_train // world
    if per_worker < 1:
        raise TrainError(f"{n_train} training rows cannot feed {world} workers; lower scaling.num_workers")
    if batch_size // world > per_worker:
        log.warning("batch_size %d needs %d rows per worker, each worker has %d: using %d per worker",
                    batch_size, batch_size // world, per_worker, per_worker)
    return min(batch_size // world, per_worker)


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

def train(cfg: TrainConfig) -> TrainResult:
    """Train one stage end to end on Ray (driver side); returns where everything went."""
    init_ray(cfg.ray_address)
    with tracking.using(cfg.mlflow.tracking_uri) as uri:
        return _train(cfg, uri)


def _shuffled(ds, seed: int):
    """Training order: blocks shuffled from ``seed`` (the run's ``seed`` param), a new order each
    epoch (reseeded per execution), the same sequence of orders on a re-run."""
    from ray.data import RandomSeedConfig

    return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def _datasets(cfg: TrainConfig, snapshot, gen_config, autoencoder_uri, run_dir: str):
    """Ray datasets of the stage, the number of training rows and the loss names."""
    seq_len = gen_config.seq_len
    if cfg.stage == "autoencoder":
        inputs = list(gen_config.mmt.inputs)
        datasets = {"train": _shuffled(clip_dataset(snapshot, "train", inputs + list(LABELS), seq_len), cfg.seed),
                    "val": clip_dataset(snapshot, "val", inputs + list(LABELS), seq_len),
                    "stats": clip_dataset(snapshot, "train", inputs, seq_len)}
        keys = ["loss", *gen_config.mmt.loss_parts]
        return datasets, len(snapshot.clip_ids("train")), keys
    pairs, n_train = {}, 0
    for split in ("train", "val"):
        pairs[split], count = prepare_latent_pairs(
            snapshot, split, autoencoder_uri, storage.join(run_dir, PAIRS_DIR, split),
            batch_size=cfg.data.encode_batch_size, actors=cfg.data.encode_actors or cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu)
        n_train = count if split == "train" else n_train
    datasets = {"train": _shuffled(pairs_dataset(pairs["train"]), cfg.seed), "val": pairs_dataset(pairs["val"])}
    d = gen_config.diffusion
    return datasets, n_train, ["loss", f"{'eps' if d.prediction == 'epsilon' else 'x0'}_{d.loss}"]


def _epoch_progress(plan: WorkerPlan, n_train: int):
    """Poll of the stage's bar: epochs rank 0 has logged to MLflow (at each checkpoint), with the
    last train loss and training items/s."""
    c, t0 = tracking.client(plan.tracking_uri), time.perf_counter()
    first = None

    def poll() -> tuple[int, dict]:
        nonlocal first
        epochs = c.get_metric_history(plan.mlflow_run_id, tracking.EPOCH_METRIC)
        done = max((int(m.step) for m in epochs), default=0)
        first = done if first is None else first       # a resumed run starts past 0
        if not done:
            return 0, {}
        loss = c.get_metric_history(plan.mlflow_run_id, "train/loss")
        postfix = {"loss": f"{max(loss, key=lambda m: m.step).value:.4f}"} if loss else {}
        seconds = time.perf_counter() - t0
        if done > first and seconds > 0:
            postfix["items/s"] = f"{(done - first) * n_train / seconds:.1f}"
        return done, postfix

    return poll


def _fit(cfg: TrainConfig, plan: WorkerPlan, datasets: dict, storage_path: str, n_train: int) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.backend import LoopbackTorchConfig

    fs, path = (storage.arrow_filesystem(storage_path) if storage.is_remote(storage_path)
                else (None, storage_path))
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"plan": plan}, scaling_config=_scaling(cfg),
        torch_config=LoopbackTorchConfig(),     # DDP store/gloo on 127.0.0.1 when Ray is local
        run_config=RunConfig(
            name=cfg.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep,
                                               checkpoint_score_attribute=cfg.checkpoint.metric,
                                               checkpoint_score_order=cfg.checkpoint.mode)),
        datasets=datasets, dataset_config=_sharding_config())
    t0 = time.perf_counter()
    with tracking.system_metrics(plan.mlflow_run_id, plan.tracking_uri), \
            progress.Poller(_epoch_progress(plan, n_train), total=plan.settings.epochs, desc=f"train {cfg.stage}",
                            unit="epoch"):
        result = trainer.fit()
    if result.error:
        raise TrainError(f"training {cfg.name} failed: {result.error}")
    log.debug("trainer.fit of %s took %.1fs", cfg.name, time.perf_counter() - t0)   # time/* metrics have it


@dataclass(frozen=True)
class _Run:
    """One training run resolved from its config, before anything is written."""

    cfg: TrainConfig            # with the resolved name
    snapshot: Any
    autoencoder_uri: str | None
    gen_config: Any
    storage_path: str
    run_dir: str
    settings: Any
    world: int
    precision: str
    previous: dict
    done: bool


def _resolve(cfg: TrainConfig, uri: str) -> _Run:
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
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cfg.scaling.use_gpu else "fp32")

    _refresh_listings(run_dir)
    previous = previous_meta(run_dir)
    if previous and previous.get("stage") != cfg.stage:
        raise TrainError(f"run {name} in {storage_path} is a {previous.get('stage')} run; choose another --set name")
    if previous and cfg.stage == "diffusion" and previous.get("autoencoder_uri") != autoencoder_uri:
        raise TrainError(f"run {name} was trained from autoencoder {previous.get('autoencoder_uri')}, not "
                         f"{autoencoder_uri}; resume with --set autoencoder={previous.get('autoencoder_uri')} "
                         "or start a new run with --set name=…")
    done = bool(previous) and int(previous["epoch"]) >= settings.epochs
    return _Run(cfg, snapshot, autoencoder_uri, gen_config, storage_path, run_dir, settings,
                cfg.scaling.num_workers, precision, previous or {}, done)


def dry_run(cfg: TrainConfig) -> str:
    """The plan of ``train(cfg)``: run name, resume point, epochs and steps, workers, storage and
    MLflow. Starts no Ray and writes nothing (stage 2 reads MLflow to find its stage 1)."""
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    if cfg.stage == "diffusion" and not cfg.autoencoder and uri.startswith("sqlite:///") \
            and not os.path.exists(uri.removeprefix("sqlite:///")):
        raise TrainError(f"no MLflow store at {uri} yet, so no stage-1 run to start from: train "
                         "--stage autoencoder first, or pass --set autoencoder=<autoencoder.pt URI>")
    with tracking.using(uri):
        r = _resolve(cfg, uri)
    n_train = (len(r.snapshot.clip_ids("train")) if cfg.stage == "autoencoder"
               else len(r.snapshot.items("train")))
    per_worker = worker_batch_size(r.settings.batch_size, r.world, n_train)
    steps = max(1, -(-n_train // (per_worker * r.world)))
    start = int(r.previous.get("epoch", 0))
    epochs = (f"already trained to epoch {start}: would only export and log it" if r.done else
              f"{f'resume after epoch {start}' if start else 'new run'}: epochs {start + 1}-{r.settings.epochs}")
    lines = [f"train (dry run): {cfg.stage} run {r.cfg.name} on snapshot {r.snapshot.id}",
             f"  {epochs}, {steps} steps/epoch ({n_train} {'clips' if cfg.stage == 'autoencoder' else 'items'}, "
             f"batch {per_worker * r.world} = {r.world} worker(s) x {per_worker}), {r.precision}",
             f"  checkpoints {storage.redact(r.run_dir)} every {cfg.checkpoint.every} epoch(s), keep {cfg.checkpoint.num_to_keep}",
             f"  MLflow {uri}, experiment {cfg.mlflow.experiment!r}"]
    if cfg.stage == "diffusion":
        lines.append(f"  stage 1 {r.autoencoder_uri}; registers {cfg.mlflow.model_name} @{cfg.mlflow.alias}"
                     if cfg.mlflow.register else f"  stage 1 {r.autoencoder_uri}; no registration")
    return "\n".join(lines)


def _train(cfg: TrainConfig, uri: str) -> TrainResult:
    r = _resolve(cfg, uri)
    cfg, snapshot, autoencoder_uri, gen_config = r.cfg, r.snapshot, r.autoencoder_uri, r.gen_config
    name, storage_path, run_dir, settings = cfg.name, r.storage_path, r.run_dir, r.settings
    world, precision, previous, done = r.world, r.precision, r.previous, r.done

    # -- MLflow run: created once per Ray run, reopened on every resume -------------------------------
    tags = {f"{TAG}stage": cfg.stage, f"{TAG}preset": cfg.preset, f"{TAG}run_name": name,
            f"{TAG}snapshot_id": snapshot.id, f"{TAG}snapshot_uri": snapshot.uri,
            f"{TAG}feature_set_hash": snapshot.feature_set_hash, f"{TAG}storage_path": storage_path,
            f"{TAG}run_dir": run_dir, f"{TAG}autoencoder_uri": autoencoder_uri,
            f"{TAG}num_workers": world, f"{TAG}precision": precision}
    params = flatten(to_dict(cfg))
    params.update({f"resolved.{k}": v for k, v in settings.to_dict().items()})
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
    tracking.client(uri).log_text(run_id, yaml.safe_dump({"train": to_dict(cfg), "resolved": settings.to_dict(),
                                                          "generator": gen_config.to_dict()}, sort_keys=False),
                                  "config.yaml")
    metadata = {"snapshot_id": snapshot.id, "feature_set_hash": snapshot.feature_set_hash,
                "run_name": name, "mlflow_run_id": run_id, "preset": cfg.preset, "stage": cfg.stage}

    try:
        if not done:
            datasets, n_train, loss_keys = _datasets(cfg, snapshot, gen_config, autoencoder_uri, run_dir)
            batch_size = worker_batch_size(settings.batch_size, world, n_train)
            mean_face = snapshot.mean_face()
            plan = WorkerPlan(
                config=cfg, settings=settings, generator_config=gen_config.to_dict(), batch_size=batch_size,
                precision=precision, run_dir=run_dir, mlflow_run_id=run_id, tracking_uri=uri,
                snapshot_uri=snapshot.uri, snapshot_id=snapshot.id, autoencoder_uri=autoencoder_uri,
                metadata=metadata, mean_face=None if mean_face is None else mean_face.tolist(),
                loss_keys=loss_keys, val_subset=_val_subset(snapshot, cfg.validation.max_items))
            log.info("training %s: %s stage, %d worker(s), %d epochs, batch %d (%d/worker), storage %s, MLflow %s",
                     name, cfg.stage, world, settings.epochs, batch_size * world, batch_size,
                     storage.redact(run_dir), uri)
            _fit(cfg, plan, datasets, storage_path, n_train)
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
    checkpoint_uri, state = export_checkpoint(run_dir, name=cfg.name, metric=cfg.checkpoint.metric,
                                              mode=cfg.checkpoint.mode)
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
