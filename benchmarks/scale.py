"""Cost as the work grows (issue 19): extraction against clips, a full-size REACT evaluation, and
stage-1 training input at the paper feature set's widths.

    python -m benchmarks.scale [--quick]     # = python -m benchmarks.run --only scale [--quick]

* ``extraction``: N person clips (full: 16, 64, 256 clips of 50 frames = 2 s each; the per-clip
  work is per frame, so short clips keep 256 of them affordable on 2 cores) through the real
  extraction job (``pipeline.data.extract.extract``, demo feature set, ``limit=N`` on one
  synthetic dataset); time per clip and peak worker RSS against N. Ratios are largest N over
  smallest N: 1.0 = linear cost and streaming memory.
* ``evaluation``: 1 124 items x 10 samples x 750 frames (REACT2024 val) scored by the
  evaluation job's metric path (``pipeline.evaluate`` ``score``: FRDist rows over Ray tasks, the
  other metrics in the driver). Neighbour counts are an assumption (the real matrix is not
  public): the diagonal, the mirrored item and Poisson(3) random others per row (mean ~5). The
  official per-pair structure (``benchmarks.official_reference``, one process) is timed on a
  subset of rows and extrapolated by pair count; per-row values there must be identical.
* ``training``: snapshot clip files with the paper widths (AU 25 088, VA 64, FE 1 408 float16,
  wav2vec2 1 536, MFCC 26, labels; ReLU(normal) values, about as compressible as the real
  features) written by the snapshot writer to local disk and to S3 (moto on loopback), read by the
  stage-1 data path (``Snapshot.clips_dataset``'s per-file reader, the trainer's frame crop and
  its batch source ``_TrainBatches``) feeding a stand-in model that takes ``STEP_S`` per batch of
  4 clips (see below). Reported: data-wait fraction and bytes read per epoch, streaming every
  epoch (``cache_mb`` 0) and as the trainer runs by default (later epochs from memory).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import numpy as np
from benchmarks import official_reference as official
from benchmarks.metrics import synthetic_inputs

# The paper model's stage-1 step on one GPU, the stand-in's cost: 6 x 124.7 M parameters x
# 4 clips x 750 frames = 2.2 TFLOP per step (the 25 088-wide input projection dominates and is
# one dense matmul); an A10G (the gpu-train nodes) sustains ~50 of its 125 bf16 TFLOP/s on such
# matmuls, so ~45 ms per step of 4 clips (the per-GPU batch of train-paper.yaml).
STAGE1_PARAMS = 124.7e6
BATCH_PER_GPU = 4
STEP_S = 6 * STAGE1_PARAMS * BATCH_PER_GPU * 750 / 50e12
REACT_VAL_ITEMS = 1124
REACT_TRAIN_CLIPS = 3186
LOAD_NOTE = "absolute times depend on the host's load (load_average_*); ratios within one run count"


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# 1. extraction against the number of clips


def extraction(sizes: list[int], frames: int) -> dict:
    from pipeline import runtime
    from pipeline.data import synth
    from pipeline.data.extract import ExtractConfig, extract

    work = tempfile.mkdtemp(prefix="reactdiff-bench-scale-extract-")
    try:
        data = os.path.join(work, "data")
        t0 = time.perf_counter()
        synth.generate(data, dyads=(max(sizes) // 2, 0, 0), frames=frames, seed=0)
        synth_s = time.perf_counter() - t0
        runtime.init_ray()
        # Workers warm at the smallest size: otherwise the first measured run pays their start-up
        # (seconds, once per job) and the ratio reads as sub-linear cost.
        extract(ExtractConfig(data=data, out=os.path.join(work, "warm"), limit=min(sizes)))
        rows = {}
        for n in sizes:
            t0 = time.perf_counter()
            m = extract(ExtractConfig(data=data, out=os.path.join(work, f"n{n}"), limit=n)).manifest
            wall = time.perf_counter() - t0
            clips = m.counts.clips
            rows[str(n)] = {"clips": clips, "job_s": round(wall, 2), "s_per_clip": round(wall / clips, 4),
                            "pipeline_s_per_clip": round(m.timings.pipeline_s / clips, 4),
                            "peak_worker_rss_mb": round(m.resources.peak_worker_rss_mb, 1),
                            "quarantined": m.counts.quarantined}
        lo, hi = rows[str(min(sizes))], rows[str(max(sizes))]
        return {"frames_per_clip": frames, "synth_s": round(synth_s, 1), "by_clips": rows,
                "s_per_clip_ratio": round(hi["s_per_clip"] / lo["s_per_clip"], 3),
                "pipeline_s_per_clip_ratio": round(hi["pipeline_s_per_clip"] / lo["pipeline_s_per_clip"], 3),
                # The cost of one more clip between the two largest sizes (no fixed start-up in it).
                "marginal_s_per_clip": round((hi["job_s"] - rows[str(sorted(sizes)[-2])]["job_s"])
                                             / (max(sizes) - sorted(sizes)[-2]), 4),
                "peak_rss_ratio": round(hi["peak_worker_rss_mb"] / lo["peak_worker_rss_mb"], 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# 2. a full-size evaluation


def react_sized_inputs(n_items: int, seed: int = 0):
    """Bidirectional items, neighbours = diagonal + mirrored item + Poisson(3) others (mean ~5)."""
    return synthetic_inputs(n_items, seed=seed, others=lambda rng: rng.poisson(3))


def _score_fn(distributed: bool):
    """The evaluation job's metric path: ``score``, with FRDist rows over Ray tasks when Ray runs."""
    from pipeline.evaluate.protocol import score
    from pipeline.evaluate.scoring import frdist_distributed

    return (lambda *args: score(*args, frdist=frdist_distributed)) if distributed else score


def evaluation(n_items: int, subset_rows: int) -> dict:
    import ray

    from pipeline import runtime
    from reactdiff import metrics

    t0 = time.perf_counter()
    pred, listener, speaker, neighbours = react_sized_inputs(n_items)
    inputs_s = time.perf_counter() - t0
    per_row = neighbours.sum(axis=1).astype(int)
    pairs = int(per_row.sum()) * pred.shape[1]
    try:   # the job's path: FRDist rows over Ray tasks
        runtime.init_ray()
        cpus, distributed = int(ray.cluster_resources().get("CPU", 1)), True
    except Exception as exc:   # an overloaded shared host can time Ray's start-up out
        print(f"Ray did not start ({exc}); scoring in-process (numba threads on all cores)", flush=True)
        cpus, distributed = os.cpu_count(), False
    score = _score_fn(distributed)
    score(pred[:4, :2, :60], listener[:4, :60], speaker[:4, :60], np.eye(4))  # compile, warm workers
    official.frdist_rows(pred[:1, :1, :20], listener[:1, :20], np.eye(1), [0])
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    values, timings = score(pred, listener, speaker, neighbours)
    full_s, driver_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    # Official structure on a subset, against ours on the same rows (one thread, same process).
    rows = np.linspace(0, n_items - 1, subset_rows).round().astype(int)
    subset_pairs = int(per_row[rows].sum()) * pred.shape[1]
    t0, c0 = time.perf_counter(), time.process_time()
    reference = np.asarray(official.frdist_rows(pred, listener, neighbours, rows))
    official_s, official_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    ours = metrics.frdist_rows(pred, listener, neighbours, rows, num_threads=1)
    ours_one_s, ours_one_cpu = time.perf_counter() - t0, time.process_time() - c0
    official_frdist_s = official_s * pairs / subset_pairs
    # To the REACT val size: FRDist grows with DTW pairs (items x samples x neighbours per item,
    # the same assumed distribution), the other metrics with items (FRDvs' closed form too).
    full_scale = REACT_VAL_ITEMS / n_items
    full_val_s = timings["FRDist"] * full_scale + (full_s - timings["FRDist"]) * full_scale
    # The other five metrics' official per-pair loops, from benchmarks.metrics' measured ratios,
    # are a small share; FRDist is what the official evaluation spends its time on (metrics.md §3).
    return {
        "items": n_items, "samples": pred.shape[1], "frames": pred.shape[2], "inputs_s": round(inputs_s, 1),
        "neighbours_per_item": {"assumption": "diagonal + mirrored + Poisson(3) random others",
                                "mean": round(float(per_row.mean()), 2), "max": int(per_row.max())},
        "dtw_pairs": pairs, "cpus": cpus, "frdist_over_ray_tasks": distributed, "load_average_before": round(load, 2),
        "full_val_s": round(full_val_s, 1), "driver_cpu_s": round(driver_cpu_s, 1),
        "timings_s": {k: round(v, 2) for k, v in timings.items()}, "values": values,
        "official_subset": {"rows": int(rows.size), "pairs": subset_pairs, "official_s": round(official_s, 2),
                            "official_ms_per_pair": round(1e3 * official_s / subset_pairs, 3),
                            "ours_one_thread_ms_per_pair": round(1e3 * ours_one_s / subset_pairs, 3),
                            "one_thread_speedup": round(official_s / ours_one_s, 2),
                            "one_thread_cpu_speedup": round(official_cpu / ours_one_cpu, 2),
                            "identical": bool(np.array_equal(ours, reference))},
        "full_val_s_note": ("measured" if n_items == REACT_VAL_ITEMS else
                            f"{n_items} items measured, scaled to {REACT_VAL_ITEMS} by DTW pair count "
                            f"(FRDist) and item count (the rest)"),
        "measured_s": round(full_s, 1),
        "official_frdist_s_extrapolated": round(official_frdist_s * full_scale, 1),
        "speedup_vs_official": round(official_frdist_s / timings["FRDist"], 2),
        "speedup_note": "official FRDist (extrapolated by pair count) over our FRDist in the full run; "
                        "full_val_s is all six metrics end to end",
    }


# --------------------------------------------------------------------------------------------
# 3. stage-1 input at the paper widths


def _paper_clip_rows(n: int, frames: int, seed: int = 0):
    from pipeline.data.features import load_feature_set

    paper = load_feature_set("paper", {n: "unused" for n in ("au", "va", "fe", "wav2vec2")})
    rng = np.random.default_rng(seed)
    for i in range(n):
        row = {"clip_id": f"c{i:04d}", "split": "train", "site": "NoXI", "session": f"s{i}", "role": "P1",
               "index": str(i), "num_frames": frames}
        for e in paper.extractors:
            # Post-ReLU-like activations: half zeros, positive halves (real features compress similarly).
            row[e.column] = np.maximum(rng.standard_normal((frames, e.width), dtype=np.float32), 0)
        yield paper, row


def _feed(root: str, files: list[str], columns: list[str], epochs: int, frames: int, cache_mb: int) -> dict:
    """Epochs of the stage-1 input into the stand-in step, through the trainer's own batch source
    (``_TrainBatches``: the first epoch streams; later ones read memory when the shard fits
    ``cache_mb``, as in training)."""
    from types import SimpleNamespace

    import ray.data
    import torch

    from pipeline.data.snapshot import _read_clip_files
    from pipeline.train.config import DataSettings
    from pipeline.train.job import _CropFrames
    from pipeline.train.loop import _TrainBatches

    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(_read_clip_files, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"root": root, "columns": ["clip_id", "split", "num_frames"] + columns,
                                   "tensors": tuple(columns), "dtype": None})
    ds = ds.map_batches(_CropFrames(columns, frames), batch_format="numpy")
    plan = SimpleNamespace(batch_size=BATCH_PER_GPU, config=SimpleNamespace(
        seed=0, data=DataSettings(prefetch_batches=2, shuffle_buffer=0, cache_mb=cache_mb)))
    # Where a GPU is present the kept tensors live in its memory, as in a GPU train worker.
    source = _TrainBatches(ds, plan, rank=0, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    by_epoch = []
    for epoch in range(1, epochs + 1):
        wait = steps = 0
        start = time.perf_counter()
        it = iter(source.epoch(epoch))
        while True:
            t0 = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            steps += 1
            time.sleep(STEP_S)   # the GPU step: the host thread is free meanwhile, as with CUDA
        if source.device.type == "cuda":
            torch.cuda.synchronize()   # the epoch's gathers are done before it is timed
        total = time.perf_counter() - start
        by_epoch.append({"steps": steps, "epoch_s": round(total, 3), "wait_s": round(wait, 3),
                         "data_wait_fraction": round(wait / total, 3),
                         "from_memory": source.rows is not None and epoch > 1})
    later = by_epoch[1:] or by_epoch
    return {"cache_mb": cache_mb, "by_epoch": by_epoch,
            "first_epoch_data_wait_fraction": by_epoch[0]["data_wait_fraction"],
            "data_wait_fraction": round(float(np.median([e["data_wait_fraction"] for e in later])), 3),
            "clips_per_s": round(float(np.median([e["steps"] * BATCH_PER_GPU / e["epoch_s"] for e in later])), 2)}


def training(n_clips: int, frames: int, epochs: int) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline import runtime
    from pipeline.data.snapshot import SnapshotWriter

    work = tempfile.mkdtemp(prefix="reactdiff-bench-scale-train-")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    try:
        server.start()
        host, port = server.get_host_and_port()
        # Dummy credentials, valid only for this loopback moto server (set before Ray starts so
        # its workers inherit them).
        os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing-secret-not-real", "AWS_DEFAULT_REGION": "us-east-1"})
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        runtime.shutdown_ray()
        runtime.init_ray()
        roots = {"local": os.path.join(work, "snap"), "s3": "s3://bench/snap"}
        files, sizes, columns = [], [], None
        writers = {}
        t0 = time.perf_counter()
        for paper, row in _paper_clip_rows(n_clips, frames):
            if not writers:
                writers = {k: SnapshotWriter(uri, paper.extractors, 25.0) for k, uri in roots.items()}
                columns = [e.column for e in paper.extractors]
            for w in writers.values():
                written = w.write_clip(row)
            files.append(written.file)
            sizes.append(written.bytes)
        write_s = time.perf_counter() - t0
        mb_per_clip = float(np.mean(sizes)) / 1e6
        out = {"clips": n_clips, "frames": frames, "columns": columns, "write_s": round(write_s, 1),
               "stand_in_step_s": round(STEP_S, 4), "batch_per_gpu": BATCH_PER_GPU,
               "stand_in_note": "6 x 124.7 M params x 4 clips x 750 frames / 50 TFLOP/s (A10G bf16, ~40 % of peak)",
               "mb_per_clip": round(mb_per_clip, 2),
               "bytes_per_epoch": int(sum(sizes)),
               "react_epoch_gb": round(REACT_TRAIN_CLIPS * mb_per_clip / 1e3, 1),
               "clips_per_s_needed_per_gpu": round(BATCH_PER_GPU / STEP_S, 1),
               "mb_per_s_needed_per_gpu": round(BATCH_PER_GPU / STEP_S * mb_per_clip, 1)}
        # Streaming every epoch (cache_mb 0: what a shard larger than the cache gets) and the
        # trainer's default (the first epoch streams, later ones read the kept tensors).
        cache_mb = 2 * int(sum(sizes) / 2 ** 20) + 512       # decoded float16 is ~1.6x the zstd files
        for name, root in roots.items():
            out[name] = {"streamed": _feed(root, files, columns, epochs, frames, cache_mb=0),
                         "cached": _feed(root, files, columns, epochs, frames, cache_mb=cache_mb)}
        out["streamed_data_wait_fraction"] = max(out[k]["streamed"]["data_wait_fraction"] for k in roots)
        out["paper_width_data_wait_fraction"] = max(out[k]["cached"]["data_wait_fraction"] for k in roots)
        return out
    finally:
        runtime.shutdown_ray()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)


def run(quick: bool = False) -> dict:
    from pipeline import runtime

    report: dict = {"machine_note": LOAD_NOTE, "load_average_start": round(os.getloadavg()[0], 2)}
    # Sizes are environment-tunable: SCALE_EVAL_ITEMS=1124 scores the whole val set (the default
    # full run measures a quarter and extrapolates by DTW pair count when the host is shared).
    sizes, frames = ([4, 8, 16], 50) if quick else ([16, 64, 256], 50)
    items = int(os.environ.get("SCALE_EVAL_ITEMS", 64 if quick else 282))
    steps = {
        "extraction": lambda: extraction(sizes, frames),
        "evaluation": lambda: evaluation(items, 2 if quick else 4),
        "training": lambda: training(4 if quick else 16, 750, 3),
    }
    for name, step in steps.items():
        if os.environ.get("SCALE_ONLY") and name not in os.environ["SCALE_ONLY"].split(","):
            continue
        t0 = time.perf_counter()
        try:
            report[name] = step()
        except Exception as exc:   # one broken part must not hide the others' numbers
            import traceback

            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, report[name], flush=True)
    runtime.shutdown_ray()
    report["driver_peak_rss_mb"] = round(_rss_mb(), 1)
    # The keys are paths in the results JSON: scale.extraction.s_per_clip_ratio, …
    return report


if __name__ == "__main__":       # = python -m benchmarks.run --only scale [--quick]
    from benchmarks.run import main

    sys.exit(main(["--only", "scale", *sys.argv[1:]]))
