"""Training throughput of both stages on Ray Train, and how much of it is waiting for data.

A synthetic REACT dataset is extracted into a demo snapshot, then ``pipeline.train.job.train``
runs stage 1 and stage 2 exactly as ``reactdiff train`` does (Ray Data streaming →
``iter_torch_batches`` → DDP workers, checkpoints, MLflow). Per epoch the loop records the
items per second over all workers and the fraction of the training time each worker spent
blocked in ``next(batches)`` (``time/data_wait_fraction``), also split into the epoch's
pipeline start-up (``first_batch_s``: read, decode, split until the first batch arrives) and
the wait after it (``data_wait_fraction_after_first_batch``). The first epoch is warm-up.

Baseline in the same process: the same model, per-worker batch and optimiser stepping on
in-memory tensors in one process with one thread (what a CPU worker gets), so
``scaling_efficiency = ray items/s ÷ (workers × single-process items/s)`` shows what ingest,
DDP and reporting cost on this host. On CUDA the paper preset is measured too (1 GPU worker).

    python -m benchmarks.training [--quick]     # = python -m benchmarks.run --only training [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from benchmarks.common import scratch

WARMUP_EPOCHS = 1


def _snapshot(work: str, dyads: tuple[int, int, int], frames: int) -> tuple[str, float]:
    from pipeline.data import synth
    from pipeline.data.extract import ExtractConfig, extract

    t0 = time.perf_counter()
    data = os.path.join(work, "data")
    synth.generate(data, dyads=dyads, frames=frames, seed=0, release="2024")
    result = extract(ExtractConfig(data=data, out=os.path.join(work, "snapshots"), feature_set="demo",
                                   frames=frames))
    return result.uri, time.perf_counter() - t0


def _config(stage: str, snapshot: str, work: str, preset: str, epochs: int, batch: int, workers: int,
            seq_len: int, gpu: bool):
    from pipeline import config
    from pipeline.train.job import TrainConfig

    section = "stage1" if stage == "autoencoder" else "stage2"
    sets = {"stage": stage, "features": snapshot, "preset": preset, "storage_path": os.path.join(work, "ckpt"),
            "mlflow.tracking_uri": f"sqlite:///{work}/mlflow.db", f"{section}.epochs": epochs,
            f"{section}.batch_size": batch, "scaling.num_workers": workers, "scaling.use_gpu": gpu,
            "checkpoint.every": epochs, "validation.every": epochs, "validation.max_items": 2,
            "validation.samples": 1, "validation.steps": 2, "name": f"bench-{preset}-{stage}"}
    if stage == "autoencoder":
        sets["model.seq_len"] = seq_len
    return config.load(TrainConfig, "train", [f"{k}={v}" for k, v in sets.items()])


def _history(run_dir: str) -> list[dict]:
    from pipeline.train.checkpoints import checkpoint_metas

    return checkpoint_metas(run_dir)[-1][1]["history"]


def _single_process_items_per_s(stage: str, gen_file: str, batch: int, steps: int, device: str) -> float:
    """The same model and batch on in-memory tensors: one process, one thread on CPU."""
    import torch

    from pipeline.registry.models import load_generator_file
    from reactdiff.generator import ReactDiffGenerator
    from reactdiff.training import make_optimizer

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        trained = load_generator_file(gen_file)      # the run's own model: same config, statistics
        gen = ReactDiffGenerator(trained.config) if stage == "autoencoder" else trained
        gen.to(device).train()
        params = gen.set_trainable(stage)
        opt = make_optimizer(params, gen.train_settings(stage))
        L, fd = gen.config.seq_len, gen.config.mmt.feature_dim
        if stage == "autoencoder":
            batch_data = {n: torch.randn(batch, L, w, device=device) for n, w in gen.feature_widths.items()}
            emotion, tdmm = torch.rand(batch, L, 25, device=device), torch.randn(batch, L, 58, device=device)
            step = lambda: gen.autoencoder_loss(batch_data, emotion, tdmm)[0]  # noqa: E731
        else:
            zs, zl = torch.randn(batch, L, fd, device=device), torch.randn(batch, L, fd, device=device)
            step = lambda: gen.latent_diffusion_loss(zs, zl)[0]  # noqa: E731
        for i in range(steps + 2):                 # 2 warm-up steps
            if i == 2:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            loss = step()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def _stage(stage: str, snapshot: str, work: str, preset: str, epochs: int, batch: int, workers: int,
           seq_len: int, gpu: bool, baseline_steps: int) -> tuple[dict, str]:
    from pipeline.train.job import train

    cfg = _config(stage, snapshot, work, preset, epochs, batch, workers, seq_len, gpu)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    rows = _history(result.run_dir)[WARMUP_EPOCHS:] or _history(result.run_dir)
    ips = statistics.median(r["throughput/items_per_s"] for r in rows)
    out = {
        "workers": workers, "batch_per_worker": batch, "epochs": epochs, "items_per_epoch": int(rows[-1]["train/items"]),
        "items_per_s": round(ips, 2),
        "data_wait_fraction": round(statistics.median(r["time/data_wait_fraction"] for r in rows), 3),
        "data_wait_fraction_after_first_batch": round(
            statistics.median(r["time/data_wait_fraction_steady"] for r in rows), 3),
        "first_batch_s": round(statistics.median(r["time/first_batch_s"] for r in rows), 3),
        "epoch_s": round(statistics.median(r["time/epoch_s"] for r in rows), 2),
        "train_s": round(statistics.median(r["time/train_s"] for r in rows), 2),
        "job_wall_s": round(wall, 1),
    }
    if stage == "diffusion":
        from pipeline import storage

        marker = storage.read_json(storage.join(result.run_dir, "latent_pairs", "train", "_SUCCESS.json"))
        out["latent_pairs_encode_s"] = marker.get("seconds")
    single = _single_process_items_per_s(stage, result.output_uri, batch, baseline_steps, "cuda" if gpu else "cpu")
    out["single_process_items_per_s"] = round(single, 2)
    out["scaling_efficiency"] = round(ips / (workers * single), 3)
    return out, result.output_uri


def run(quick: bool = False) -> dict:
    import ray
    import torch

    from pipeline import runtime

    frames = 250 if quick else 750
    dyads = (6, 1, 1) if quick else (8, 2, 1)
    epochs = 3 if quick else 5
    batch = 2 if quick else 4
    with scratch("training") as work:
        runtime.init_ray()
        snapshot, prep_s = _snapshot(work, dyads, frames)
        report: dict = {"frames": frames, "train_clips": 2 * dyads[0], "snapshot_s": round(prep_s, 1),
                        "cpu_small": {}}
        for stage in ("autoencoder", "diffusion"):
            report["cpu_small"][stage], _ = _stage(stage, snapshot, work, "small", epochs, batch=batch, workers=2,
                                                   seq_len=frames, gpu=False, baseline_steps=4 if quick else 8)
        if torch.cuda.is_available():
            report["gpu_paper"] = {}
            for stage in ("autoencoder", "diffusion"):
                report["gpu_paper"][stage], _ = _stage(stage, snapshot, work, "paper", epochs, batch=4, workers=1,
                                                       seq_len=frames, gpu=True, baseline_steps=10)
        return report


if __name__ == "__main__":       # = python -m benchmarks.run --only training [--quick]
    from benchmarks.run import main

    sys.exit(main(["--only", "training", *sys.argv[1:]]))
