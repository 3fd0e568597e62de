"""Sampling throughput: 10 reactions × 750 frames in one batched pass vs 10 sequential passes.

The reference evaluates by running the whole model over the test loader once per sample
("Repeat 9 times", model.md §5): every pass re-encodes the speaker and denoises 15 windows.
``ReactDiffGenerator.generate`` encodes the speaker once and denoises all K·15 windows together
(one UNet call per DDIM step). Both variants run here, in the same process, on the same
weights, so the ratio is comparable across hosts.

    python -m benchmarks.sampling [--quick]     # = python -m benchmarks.run --only sampling [--quick]

The paper preset's UNet costs ≈ 35 GFLOP per window per step (404 M parameters), i.e. ≈ 105
TFLOP for 10 × 15 windows × 20 steps: impractical on a CPU, so on CPU it runs with fewer DDIM
steps (full: 10 samples × 2 steps; quick: 4 samples × 1 step — recorded in each entry); the
batched/sequential ratio is what matters. On CUDA both presets use 10 samples × 20 steps.
Timings are the best of ``repeats`` alternating runs, which keeps them usable on a shared host.
"""

from __future__ import annotations

import sys
import time

import torch

import reactdiff

SAMPLES = 10
FRAMES = 751          # a REACT clip; the model uses the first 750


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case(preset: str, device: torch.device, steps: int, samples: int = SAMPLES, repeats: int = 1) -> dict:
    torch.manual_seed(0)
    gen = reactdiff.build_generator(preset).to(device).eval()
    cfg = gen.config
    # Untrained weights are fine for timing; the statistics only need to be finite.
    gen.latent_stats.update(torch.randn(4, cfg.seq_len, cfg.mmt.feature_dim, device=device))
    g = torch.Generator().manual_seed(0)
    speaker = {name: torch.randn(FRAMES, width, generator=g) for name, width in gen.feature_widths.items()}

    calls: list[int] = []
    seen: dict[str, list[int]] = {}
    hook = gen.denoiser.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))

    def batched() -> float:
        calls.clear()
        _sync(device)
        start = time.perf_counter()
        out = gen.generate(speaker, num_samples=samples, steps=steps, seed=0)
        _sync(device)
        assert out.emotion.shape == (samples, cfg.seq_len, 25)
        seen["batched"] = list(calls)
        return time.perf_counter() - start

    def sequential() -> float:
        calls.clear()
        _sync(device)
        start = time.perf_counter()
        for k in range(samples):     # reference style: one full pass (encode + 15 windows) per sample
            gen.generate(speaker, num_samples=1, steps=steps, seed=k)
        _sync(device)
        seen["sequential"] = list(calls)
        return time.perf_counter() - start

    try:
        gen.generate(speaker, num_samples=1, steps=1, seed=0)          # warm-up (allocator, kernels)
        batched_s, sequential_s = [], []
        # Alternate the two and keep each one's best run: robust to other load on the host.
        for _ in range(repeats):
            batched_s.append(batched())
            sequential_s.append(sequential())
    finally:
        hook.remove()
    counts = gen.parameter_counts()
    del gen
    if device.type == "cuda":
        torch.cuda.empty_cache()
    best_b, best_s = min(batched_s), min(sequential_s)
    return {
        "samples": samples,
        "steps": steps,
        "repeats": repeats,
        "params_m": round(counts["total"] / 1e6, 2),
        "batched_s": round(best_b, 3),
        "sequential_s": round(best_s, 3),
        "speedup": round(best_s / best_b, 2),
        "reactions_per_s_batched": round(samples / best_b, 3),
        "reactions_per_s_sequential": round(samples / best_s, 3),
        "denoiser_calls_batched": len(seen["batched"]),
        "denoiser_calls_sequential": len(seen["sequential"]),
        "windows_per_call_batched": seen["batched"][0],
        "windows_per_call_sequential": seen["sequential"][0],
    }


def run(quick: bool = False) -> dict:
    """Time batched vs sequential sampling for the small and paper presets, on CPU and CUDA."""
    result: dict = {
        "frames": 750,
        "threads": torch.get_num_threads(),
        "note": ("speedup = sequential_s / batched_s (best of `repeats` alternating runs); "
                 "paper on CPU uses fewer DDIM steps, and fewer samples in quick mode (see each entry)"),
    }
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        cuda = device.type == "cuda"
        cases = [("small", dict(steps=20, samples=SAMPLES, repeats=3 if quick else 5))]
        if cuda:
            cases.append(("paper", dict(steps=20, samples=SAMPLES, repeats=2 if quick else 3)))
        else:
            # ≈ 35 GFLOP per window per step: quick = 4 samples × 1 step (≈ 20 s on 2 idle cores),
            # full = 10 samples × 2 steps (≈ 3 min).
            cases.append(("paper", dict(steps=1, samples=4, repeats=1) if quick else dict(steps=2, samples=SAMPLES, repeats=1)))
        for preset, kwargs in cases:
            key = f"{preset}_{device.type}"
            try:
                result[key] = _case(preset, device, **kwargs)
            except (RuntimeError, MemoryError) as exc:   # e.g. out of memory on a small host
                result[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"sampling {key}: {result[key]}", file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":       # = python -m benchmarks.run --only sampling [--quick]
    from benchmarks.run import main

    sys.exit(main(["--only", "sampling", *sys.argv[1:]]))
