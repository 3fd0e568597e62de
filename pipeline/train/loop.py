"""The training loop every Ray Train worker runs (``train_loop_per_worker``), with its helpers.

Ray pickles ``train_loop_per_worker`` by reference, so it stays a top-level function of this
module. Its one input is the driver's ``WorkerPlan`` (``train_loop_config={"plan": plan}``). It
imports the configuration from pipeline.train.config, never the driver (pipeline.train.job), so
the graph has no cycle: job → loop → config, checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np

from pipeline import plots, storage
from pipeline.evaluate import protocol
from pipeline.registry import runs as tracking
from pipeline.config import to_dict
from pipeline.data.snapshot import Snapshot
from pipeline.registry.models import load_generator_file
from pipeline.train.checkpoints import restore_state, write_checkpoint
from pipeline.train.config import TrainConfig, TrainError, WorkerPlan

log = logging.getLogger(__name__)


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
            return g.latent_diffusion_loss(batch["speaker_latent"].float(), batch["listener_latent"].float(),
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


class _TrainBatches:
    """One worker's train batches, epoch by epoch: streamed from its Ray Data shard, or from memory.

    Streaming restarts the shard's pipeline every epoch, about 1 s of start-up before the first
    batch however small the shard (a fifth of a demo epoch). So the first epoch also keeps what
    it reads, and when every worker's shard fits in ``data.cache_mb`` (tensors where they
    arrived: GPU memory on GPU) the later epochs read memory. The decision is collective
    (all-reduce MAX), because a worker that stopped consuming its ``streaming_split`` would stall
    the others. A cached worker keeps its first-epoch rows (no new split across workers) and
    draws a new order every epoch from (seed, epoch, rank); the tail that ``drop_last`` leaves
    out of one epoch takes part in the next. A larger shard streams, every epoch, as before.
    """

    def __init__(self, shard, plan: WorkerPlan, rank: int, device):
        self.shard, self.plan, self.rank, self.device = shard, plan, rank, device
        self.budget = plan.config.data.cache_mb * 2 ** 20
        self.rows: dict[str, Any] | None = None

    def epoch(self, epoch: int):
        if self.rows is not None:
            yield from self._from_memory(epoch)
            return
        data, size = self.plan.config.data, self.plan.batch_size
        kept: list[dict] = []
        nbytes = 0
        # On the worker's device (what Ray Train's "auto" picks too): the kept rows stay there.
        for batch in self.shard.iter_torch_batches(batch_size=size, drop_last=not self.budget, device=self.device,
                                                   prefetch_batches=data.prefetch_batches,
                                                   local_shuffle_buffer_size=data.shuffle_buffer or None):
            if self.budget:
                nbytes += sum(v.element_size() * v.nelement() for v in batch.values())
                if nbytes <= self.budget:
                    kept.append(batch)
                else:
                    kept = []               # it will not be cached: hold no memory for it
            if next(iter(batch.values())).shape[0] == size:     # drop_last, decided per batch
                yield batch
        if self.budget:
            largest = _all_reduce({"bytes": float(nbytes)}, self.device, op="max")["bytes"]
            if 0 < largest <= self.budget:
                import torch
                self.rows = {k: torch.cat([b[k] for b in kept]) for k in kept[0]} if kept else {}
            self.budget = 0                 # decided once: cache from now on, or always stream

    def _from_memory(self, epoch: int):
        import torch

        if not self.rows:
            return
        n = next(iter(self.rows.values())).shape[0]
        order = torch.from_numpy(np.random.default_rng((self.plan.config.seed, epoch, self.rank)).permutation(n))
        size = self.plan.batch_size
        for i in range(0, n - size + 1, size):
            index = order[i:i + size]
            # index_select: a copy per row (memcpy on CPU), 1.4x advanced indexing here
            yield {k: torch.index_select(v, 0, index.to(v.device)) for k, v in self.rows.items()}


def _train_epoch(model, gen, optimizer, ema, params, batches, plan: WorkerPlan, world: int, device, bf16: bool):
    import torch

    grad_clip = plan.settings.grad_clip
    it = iter(batches)
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
        if grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
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
    world = max(1, world)
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


def _validate(model, gen, shard, plan: WorkerPlan, rank: int, device) -> dict[str, float]:
    import torch

    gen.eval()
    sums: dict[str, float] = {}
    items = 0
    rng = torch.Generator(device=device).manual_seed(plan.config.seed * 1000 + rank)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=plan.batch_size,
                                              prefetch_batches=plan.config.data.prefetch_batches):
            n = next(iter(batch.values())).shape[0]
            loss, parts = model.module(batch, generator=rng) if hasattr(model, "module") else model(batch, generator=rng)
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            items += n
    red = _all_reduce({**{k: sums.get(k, 0.0) for k in plan.loss_keys}, "_items": items}, device)
    gen.train()
    if red["_items"] == 0:
        return {}
    return {f"val/{k}": red[k] / red["_items"] for k in plan.loss_keys}


def _latent_statistics(gen, shard, batch_size: int, device) -> int:
    """Per-frame min/max of the train latents: each worker its shard, then all-reduce MIN/MAX."""
    import torch
    import torch.distributed as dist

    gen.eval()
    gen.latent_stats.reset()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size):
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

    def __init__(self, plan: WorkerPlan, device):
        self.plan, self.device = plan, device
        self.snapshot = Snapshot.open(plan.snapshot_uri)
        self.subset = plan.val_subset
        self._data = None

    def _load(self, widths):
        if self._data is None:
            s = self.subset
            ids = sorted(set(s.speakers) | set(s.listeners))
            clips = self.snapshot.load_clips(ids, list(widths) + ["emotion"])
            self._data = clips
        return self._data

    def run(self, gen, epoch: int, plot: bool) -> tuple[dict[str, float], Any]:
        import torch

        if not self.subset:
            return {}, None
        if self.device.type != "cpu":
            return self._run(gen, epoch, plot)
        # The other workers wait at their next collective while rank 0 samples reactions, so on
        # CPU it may use every core of its node, not the one thread Ray gave it for training.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
        try:
            return self._run(gen, epoch, plot)
        finally:
            torch.set_num_threads(threads)

    def _run(self, gen, epoch: int, plot: bool) -> tuple[dict[str, float], Any]:
        import torch

        seq_len = gen.config.seq_len
        clips = self._load(gen.feature_widths)
        s, validation, stage = self.subset, self.plan.config.validation, self.plan.stage
        speakers, listeners = s.speakers, s.listeners
        gen.eval()
        with torch.no_grad():
            feats = {n: torch.from_numpy(np.stack([clips[k][n][:seq_len] for k in speakers])).to(self.device)
                     for n in gen.feature_widths}
            if stage == "autoencoder":
                emotion, _ = gen.decode(gen.encode(feats))
                pred = emotion[:, None].float().cpu().numpy()
            else:
                pred = gen.generate(feats, num_samples=validation.samples, seed=self.plan.config.seed,
                                    steps=validation.steps).emotion.float().cpu().numpy()
        gen.train()
        listener = np.stack([clips[k]["emotion"][:seq_len] for k in listeners])
        speaker = np.stack([clips[k]["emotion"][:seq_len] for k in speakers])
        metrics: dict[str, float] = {}
        if stage == "diffusion" and validation.react_metrics:
            metrics = _react_metrics(pred, listener, speaker, np.asarray(s.neighbours))
        fig = None
        if plot:
            first = speakers[0]
            if stage == "autoencoder":
                fig = plots.plot_reactions(pred[0], real_emotion=speaker[0], label="reconstructed", real_label="real",
                                           title=f"stage 1 reconstruction, val clip {first}, epoch {epoch}")
            else:
                fig = plots.plot_reactions(pred[0], speaker[0], real_emotion=listener[0],
                                           title=f"generated reactions to val speaker {first}, epoch {epoch}")
        return metrics, fig


def _react_metrics(pred, listener, speaker, neighbours) -> dict[str, float]:
    """Official REACT metrics (``protocol.score``, the evaluation's own scoring) on a subset."""
    metrics, _ = protocol.score(pred, listener, speaker, neighbours)
    return {f"val/{k}": float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def train_loop_per_worker(train_loop_config: dict) -> None:
    """Ray Train V2 worker: build/restore, train epochs, validate, checkpoint, report, log (rank 0)."""
    import ray.train
    import ray.train.torch
    import torch

    from reactdiff.generator import GeneratorConfig, ReactDiffGenerator
    from reactdiff.training import EMA, make_optimizer

    plan: WorkerPlan = train_loop_config["plan"]
    cfg, settings = plan.config, plan.settings
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    bf16 = plan.precision == "bf16" and device.type == "cuda"
    torch.manual_seed(cfg.seed)      # identical initialisation on every rank (DDP also broadcasts)
    stage = cfg.stage

    # -- resume state (read first: a resumed run keeps the model it was built with) ---------------
    state = restore_state(ray.train.get_checkpoint(), plan.run_dir)
    gen_config = state["generator_config"] if state else plan.generator_config

    # -- model: a fresh generator (stage 1) or the frozen stage 1 + a fresh stage 2 -----------------
    gen = ReactDiffGenerator(GeneratorConfig.from_dict(gen_config))
    if state is None and stage == "diffusion":
        trained = load_generator_file(plan.autoencoder_uri)
        own = gen.state_dict()
        gen.load_state_dict({k: v for k, v in trained.state_dict().items()
                             if not k.startswith(("cond.", "denoiser.")) and k in own}, strict=False)
    elif state is None and plan.mean_face is not None:
        gen.set_mean_face(np.asarray(plan.mean_face, dtype=np.float32))
    if state is not None:
        try:
            gen.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise TrainError(f"checkpoint of run {cfg.name} does not fit the model code of this version "
                             f"({str(exc)[:300]}…); start a new run with --set name=<new name>") from None
    gen.metadata = dict(plan.metadata)
    gen.to(device)
    params = gen.set_trainable(stage)
    optimizer = make_optimizer(params, settings)
    ema = EMA(gen, settings.ema_decay)
    torch.manual_seed(cfg.seed + 1 + rank)   # different noise/dropout per rank from here on

    epoch0, step, history = 0, 0, []
    run_id = plan.mlflow_run_id
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

    logger = tracking.EpochLogger(run_id, plan.tracking_uri) if rank == 0 and run_id else None
    if logger is not None and history:
        logger.log_history(history)       # epochs checkpointed before a crash but not yet in MLflow
    extras = _RankZeroValidation(plan, device) if rank == 0 else None

    train_batches = _TrainBatches(ray.train.get_dataset_shard("train"), plan, rank, device)
    val_shard = ray.train.get_dataset_shard("val")
    stats_shard = ray.train.get_dataset_shard("stats") if stage == "autoencoder" else None
    epochs = settings.epochs
    for epoch in range(epoch0 + 1, epochs + 1):
        _maybe_inject_failure(cfg, plan.run_dir, epoch, rank, world)
        t_epoch = time.perf_counter()
        row: dict[str, float] = {tracking.EPOCH_METRIC: epoch}
        row.update(_train_epoch(model, gen, optimizer, ema, params, train_batches.epoch(epoch), plan, world,
                                device, bf16))
        step += int(row["train/steps"])
        is_checkpoint = epoch % cfg.checkpoint.every == 0 or epoch == epochs
        figure = None
        if is_checkpoint or epoch % cfg.validation.every == 0:
            t_val = time.perf_counter()
            with ema.average_parameters(gen):
                row.update(_validate(model, gen, val_shard, plan, rank, device))
                if extras is not None:      # plots go to MLflow with their checkpoint
                    nth = epoch // cfg.checkpoint.every
                    plot = is_checkpoint and (epoch == epochs or (nth - 1) % max(1, cfg.validation.plot_every) == 0)
                    metrics, figure = extras.run(gen, epoch, plot)
                    row.update(metrics)
            row["time/val_s"] = time.perf_counter() - t_val
        if is_checkpoint and stage == "autoencoder":
            t_stats = time.perf_counter()
            with ema.average_parameters(gen):       # statistics of the weights that are exported
                row["stats/clips"] = _latent_statistics(gen, stats_shard, plan.batch_size, device)
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
                         "config": to_dict(cfg), "stage": stage, "snapshot_id": plan.snapshot_id,
                         "autoencoder_uri": plan.autoencoder_uri}
                write_checkpoint(tmp, state, {"epoch": epoch, "step": step, "stage": stage, "mlflow_run_id": run_id,
                                              "snapshot_id": plan.snapshot_id, "name": cfg.name,
                                              "autoencoder_uri": plan.autoencoder_uri,
                                              "metrics": dict(row), "history": history})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}")
        if logger is not None:            # the checkpoint is persisted: its epochs may go to MLflow
            logger.log_history(history)
            logger.log_figure(plots.loss_curve_figure(history, title=f"{cfg.name}"), "plots/loss_curves.png")
        if figure is not None and logger is not None:
            logger.log_figure(figure, f"plots/{'reconstruction' if stage == 'autoencoder' else 'reaction'}"
                                      f"_epoch{epoch:04d}.png")
