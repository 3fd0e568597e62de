"""Model quality: does the trained generator follow the speaker? (``make bench``, issue #15)

Every variant is trained **in-process** (no Ray: the comparison is about the model, and one
process on a fixed thread count makes runs comparable) on the same feature snapshot, with the
same optimiser-step budget as ``make demo`` and several seeds, then scored on the val items with
the official REACT metrics beside the GT / Mime / Random / Mean rows, plus the *jitter ratio*:

    jitter = mean |x[t+1] − x[t]| over valence, arousal and the 8 expression probabilities,
             of the generated reactions ÷ the same of the real listeners of the same items.

Variants (``VARIANTS``; ``DEFAULT`` runs unless ``--only`` names others): the paper architecture at
small size (``reference``, preset ``small``), the improved variant (``temporal``, preset
``small-temporal``, the demo's), and ablations that isolate one cause each — ``reconstruction``
(decode each listener's own stage-1 latent: the ceiling of any stage 2), ``*-shuffled`` (every
item conditioned on the speaker of a non-appropriate item: does the speaker change the output at
all?), ``temporal-attributes`` (stage 2 conditioned on the speaker's real 25 attributes instead of
the latent of their video and audio: is speaker perception the limit?), ``temporal-eps`` /
``reference-x0`` (the prediction target), ``temporal-no-guidance`` (no classifier-free guidance),
``temporal-3x`` (three times the optimiser steps),
``temporal-no-positions`` (stage 1 without its sinusoidal positions), ``temporal-dropout`` (stage 1
with the reference's decoder dropout) and ``temporal-480`` (the demo's earlier stage-1 budget).
``--quick`` is a smoke run: 8/4/4 dyads, a quarter of the steps, one seed.

    python -m benchmarks.quality [--quick] [--snapshot URI] [--seeds 0 1] [--only temporal reference]
                                 [--guidance 1 1.5 2 3] [--stage1-steps 480]

Data: a synthetic REACT dataset made by ``reactdiff synth`` with the *backchannel* behaviour
model (``--behaviour``), which the demo never trains on, so a variant cannot win by being tuned
to the demo's generator. Results: ``benchmarks/results/quality-<date>.json`` and a table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
JITTER_COLUMNS = slice(15, 25)          # valence, arousal, 8 expression probabilities


def jitter(x: np.ndarray) -> float:
    """mean |x[t+1] − x[t]| over the affect columns of [..., T, 25] sequences."""
    x = np.asarray(x, dtype=np.float64)[..., JITTER_COLUMNS]
    return float(np.abs(np.diff(x, axis=-2)).mean())


@dataclass
class Variant:
    """One trained configuration: a preset plus overrides, and how it is probed."""

    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    stage1_steps: int = 800              # 40 training clips; the demo's 16 over-fit after 480
    stage2_steps: int = 400              # 100 epochs × 4 steps of 4 items
    stage1_batch: int = 2
    stage2_batch: int = 4
    probe: str = "generate"              # generate | reconstruct | shuffled (condition of another item)
    #                                      | attributes (condition on the speaker's real 25 attributes)


VARIANTS: dict[str, Variant] = {
    "reference": Variant(preset="small"),                  # the paper's design at CPU size
    "temporal": Variant(preset="small-temporal"),          # the improved variant (the demo's)
    "reconstruction": Variant(probe="reconstruct"),        # stage 1 alone: the ceiling of any stage 2
    "temporal-reconstruction": Variant(preset="small-temporal", probe="reconstruct"),   # its MSE stage 1
    "temporal-shuffled": Variant(preset="small-temporal", probe="shuffled"),
    "reference-shuffled": Variant(probe="shuffled"),
    "temporal-attributes": Variant(preset="small-temporal", probe="attributes"),
    "temporal-eps": Variant(preset="small-temporal", overrides={"diffusion": {"prediction": "epsilon"}}),
    # without classifier-free guidance (the variant before cause 9 of docs/model.md)
    "temporal-no-guidance": Variant(preset="small-temporal",
                                    overrides={"diffusion": {"cond_drop": 0.0, "guidance": 1.0}}),
    "reference-x0": Variant(overrides={"diffusion": {"prediction": "x0"}}),
    "temporal-3x": Variant(preset="small-temporal", stage1_steps=3 * 800, stage2_steps=3 * 400),
    # stage 1 with the reference's decoder dropout (the variant before cause 8 of docs/model.md),
    # and the variant at the budget before it (60 epochs, 480 steps)
    "temporal-dropout": Variant(preset="small-temporal", overrides={"mmt": {"dropout": 0.1}}),
    "temporal-480": Variant(preset="small-temporal", stage1_steps=480),
    # stage 1 without positions (the variant before cause 7 of docs/model.md)
    "temporal-no-positions": Variant(preset="small-temporal", overrides={"mmt": {"positional_encoding": False}}),
}
DEFAULT = ["reference", "temporal", "reconstruction", "temporal-reconstruction", "temporal-shuffled",
           "temporal-attributes", "temporal-no-positions", "temporal-no-guidance"]
QUICK = ["reference", "temporal", "reconstruction", "temporal-shuffled"]


# ---------------------------------------------------------------------------------------------
# Data

@dataclass
class SplitData:
    features: dict[str, np.ndarray]      # clip-major [C, T, D] per feature group
    emotion: np.ndarray                  # [C, T, 25]
    tdmm: np.ndarray                     # [C, T, 58]
    clip_index: dict[str, int]
    speakers: np.ndarray                 # [N] clip index of each directed item's speaker
    listeners: np.ndarray                # [N]
    neighbours: np.ndarray               # [N, N]


def load_split(snapshot, split: str, columns: list[str], frames: int) -> SplitData:
    items = list(snapshot.items(split))
    ids = sorted({i.speaker for i in items} | {i.listener for i in items})
    clips = snapshot.load_clips(ids, columns + ["emotion", "tdmm"])
    stack = lambda c: np.stack([np.asarray(clips[k][c][:frames], dtype=np.float32) for k in ids])  # noqa: E731
    index = {k: n for n, k in enumerate(ids)}
    return SplitData({c: stack(c) for c in columns}, stack("emotion"), stack("tdmm"), index,
                     np.array([index[i.speaker] for i in items]), np.array([index[i.listener] for i in items]),
                     np.asarray(snapshot.neighbours(split)))


def _batch(data: SplitData, clips: np.ndarray) -> dict[str, torch.Tensor]:
    return {c: torch.from_numpy(x[clips]) for c, x in data.features.items()}


# ---------------------------------------------------------------------------------------------
# Training (the same library calls the Ray Train workers make, in one process)

_STAGE1_CACHE: dict[str, tuple[dict, float]] = {}


def _stage1_key(gen, variant: Variant, seed: int) -> str:
    c = gen.config
    return json.dumps([dataclasses.asdict(c.mmt), dataclasses.asdict(c.stage1), c.seq_len, variant.stage1_steps,
                       variant.stage1_batch, seed], sort_keys=True, default=str)


def train_stage1(gen, variant: Variant, train: SplitData, seed: int) -> float:
    """Stage 1 and its latent statistics; variants with the same stage 1 and seed share one run."""
    from reactdiff import EMA, make_optimizer

    key = _stage1_key(gen, variant, seed)
    if key in _STAGE1_CACHE:
        weights, seconds = _STAGE1_CACHE[key]
        gen.autoencoder.load_state_dict(weights)
        _statistics(gen, train)      # cheap, and their shape depends on the stage-2 design
        return seconds
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    settings = gen.train_settings("autoencoder")
    opt = make_optimizer(gen.set_trainable("autoencoder"), settings)
    ema = EMA(gen, settings.ema_decay)
    gen.train()
    n_clips = len(train.emotion)
    for _ in range(variant.stage1_steps):
        clips = rng.choice(n_clips, variant.stage1_batch, replace=False)
        loss, _ = gen.autoencoder_loss(_batch(train, clips), torch.from_numpy(train.emotion[clips]),
                                       torch.from_numpy(train.tdmm[clips]))
        _step(gen, opt, ema, loss)
    ema.copy_to(gen)
    _statistics(gen, train)
    seconds = time.perf_counter() - t0
    _STAGE1_CACHE[key] = ({k: v.clone() for k, v in gen.autoencoder.state_dict().items()}, seconds)
    return seconds


GRAD_CLIP = 1.0        # the training pipeline's default (train.yaml stage*.grad_clip)


def _step(gen, opt, ema, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in gen.parameters() if p.requires_grad], GRAD_CLIP)
    opt.step()
    ema.update(gen)


def _statistics(gen, train: SplitData) -> None:
    gen.eval()
    gen.latent_stats.reset()
    n = len(train.emotion)
    with torch.no_grad():
        for i in range(0, n, 8):
            gen.update_statistics(_batch(train, np.arange(i, min(i + 8, n))))


def train_variant(variant: Variant, train: SplitData, mean_face: np.ndarray | None, seed: int):
    from reactdiff import EMA, build_generator, make_optimizer

    torch.manual_seed(seed)
    gen = build_generator(variant.preset, **copy.deepcopy(variant.overrides))
    if mean_face is not None:
        gen.set_mean_face(mean_face)
    times = {"stage1_s": train_stage1(gen, variant, train, seed), "stage2_s": 0.0}
    if variant.probe == "reconstruct":       # stage 1 alone
        return gen.eval(), times
    gen.eval()
    n_clips = len(train.emotion)
    with torch.no_grad():
        z = torch.cat([gen.encode(_batch(train, np.arange(i, min(i + 8, n_clips)))) for i in range(0, n_clips, 8)])

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    if variant.probe == "attributes":
        _attribute_condition(gen)
    settings = gen.train_settings("diffusion")
    opt = make_optimizer(gen.set_trainable("diffusion"), settings)
    ema = EMA(gen, settings.ema_decay)
    gen.train()
    noise_rng = torch.Generator().manual_seed(seed)
    n_items = len(train.speakers)
    for _ in range(variant.stage2_steps):
        items = rng.choice(n_items, min(variant.stage2_batch, n_items), replace=False)
        if variant.probe == "attributes":
            loss = _attribute_loss(gen, torch.from_numpy(train.emotion[train.speakers[items]]),
                                   z[train.listeners[items]], noise_rng)
        else:
            loss, _ = gen.latent_diffusion_loss(z[train.speakers[items]], z[train.listeners[items]],
                                                generator=noise_rng)
        _step(gen, opt, ema, loss)
    ema.copy_to(gen)
    gen.eval()
    times["stage2_s"] = time.perf_counter() - t0
    return gen, times


# -- the "attributes" probe: what if the model perceived the speaker perfectly? -------------------
# Stage 2 is conditioned on the speaker's real 25 attributes (REACT ships them for every person)
# instead of the stage-1 latent of their video and audio; only for the temporal design, whose
# condition is a per-frame sequence of any width.

def _attribute_condition(gen) -> None:
    from reactdiff.temporal import SequenceCondition

    if not gen.config.temporal_denoiser:
        raise ValueError("the attributes probe needs architecture=temporal")
    gen.cond = SequenceCondition(25, gen.config.temporal.cond_channels)


def _attribute_loss(gen, attributes: torch.Tensor, z_listener: torch.Tensor, generator) -> torch.Tensor:
    from reactdiff.diffusion import epsilon_loss

    d = gen.config.diffusion
    loss, _ = epsilon_loss(gen.denoiser, gen.latent_stats.normalize(z_listener), gen.schedule, gen.cond(attributes),
                           loss=d.loss, weight=d.loss_weight, prediction=d.prediction, cond_drop=d.cond_drop,
                           generator=generator)
    return loss


@torch.no_grad()
def _attribute_generate(gen, attributes: torch.Tensor, samples: int, seed: int) -> np.ndarray:
    from reactdiff.diffusion import ddim_sample

    d, (b, t, _) = gen.config.diffusion, attributes.shape
    cond = gen.cond(attributes).repeat_interleave(samples, dim=0)
    x0 = ddim_sample(gen.denoiser, (b * samples, t, gen.config.mmt.feature_dim), gen.schedule, cond,
                     prediction=d.prediction, clip_x0=d.clip_x0, guidance=d.guidance,
                     generator=torch.Generator().manual_seed(seed))
    emotion, _ = gen.decode(gen.latent_stats.denormalize(x0))
    return emotion.reshape(b, samples, t, -1).numpy()


def predict(gen, variant: Variant, val: SplitData, samples: int, seed: int,
            guidance: float | None = None) -> np.ndarray:
    """[N, K, T, 25] reactions for the val items, as the variant's probe defines them;
    ``guidance`` (generate probes): the scale to sample with, None: the model's own."""
    n = len(val.speakers)
    if variant.probe == "reconstruct":
        with torch.no_grad():
            z = gen.encode(_batch(val, val.listeners))
            emotion, _ = gen.decode(z)
        return np.repeat(emotion.numpy()[:, None], samples, axis=1)
    if variant.probe == "attributes":
        return np.concatenate([_attribute_generate(gen, torch.from_numpy(val.emotion[val.speakers[i:i + 4]]),
                                                   samples, seed * 1000 + i) for i in range(0, n, 4)])
    speakers = val.speakers
    if variant.probe == "shuffled":
        # Each item gets the speaker of an item that is NOT its appropriateness neighbour.
        speakers = np.array([val.speakers[next((j for j in np.roll(np.arange(n), -(k + n // 2))
                                                if not val.neighbours[k, j]), k)] for k in range(n)])
    out = []
    for i in range(0, n, 4):
        rows = np.arange(i, min(i + 4, n))
        r = gen.generate(_batch(val, speakers[rows]), num_samples=samples, seed=[seed * 1000 + int(k) for k in rows],
                         guidance=guidance)
        out.append(r.emotion.numpy())
    return np.concatenate(out)


def score(pred: np.ndarray, val: SplitData) -> dict[str, float]:
    from reactdiff import metrics as M

    listener, speaker = val.emotion[val.listeners], val.emotion[val.speakers]
    out = M.compute_all(pred, listener, speaker, val.neighbours)
    out["jitter_ratio"] = jitter(pred) / jitter(listener)
    return out


def baselines(val: SplitData, samples: int) -> dict[str, dict[str, float]]:
    from reactdiff import metrics as M

    listener, speaker = val.emotion[val.listeners], val.emotion[val.speakers]
    return {kind: score(np.array(M.baseline_predictions(kind, listener, speaker, num_samples=samples)), val)
            for kind in ("gt", "mime", "random", "mean")}


# ---------------------------------------------------------------------------------------------
# Harness

def dataset(root: Path, behaviour: str, dyads: tuple[int, int, int], seed: int):
    """Synthesise (once) and extract (once) the benchmark's dataset; returns the snapshot."""
    from pipeline import runtime
    from pipeline.data import extract
    from pipeline.data import synth
    from pipeline.data.snapshot import Snapshot

    data, snaps = root / f"data-{behaviour}", root / f"snapshots-{behaviour}"
    synth.generate(str(data), dyads=dyads, seed=seed, behaviour=behaviour)
    snap = Snapshot.latest(str(snaps))
    if snap is None:
        import ray

        ours = not ray.is_initialized()
        runtime.init_ray()
        snap = extract.extract(extract.ExtractConfig(data=str(data), out=str(snaps), feature_set="demo")).snapshot
        if ours:    # its idle workers would take CPU from the training that follows
            runtime.shutdown_ray()
    return snap


def run(quick: bool = False, *, snapshot=None, names: list[str] | None = None, seeds: list[int] | None = None,
        samples: int = 10, root: str | None = None, behaviour: str = "backchannel",
        guidance: list[float] | None = None, stage1_steps: int | None = None) -> dict:
    """Train and score every variant of ``names`` for every seed. ``guidance``: score each trained
    generator at these classifier-free guidance scales too (rows ``<name>@g<scale>``; no retraining);
    ``stage1_steps`` overrides the variants' stage-1 budget (the demo's 16 clips take 480)."""
    from pipeline.data.snapshot import Snapshot

    torch.set_num_threads(int(os.environ.get("QUALITY_THREADS", "2")))
    names = names or (QUICK if quick else DEFAULT)
    seeds = seeds or ([0] if quick else [0, 1])
    if snapshot is None:
        base = Path(root or os.environ.get("REACTDIFF_HOME", ".reactdiff")) / "bench-quality"
        snapshot = dataset(base, behaviour, (8, 4, 4) if quick else (20, 6, 6), seed=11)
    elif isinstance(snapshot, str):
        snapshot = Snapshot.open(snapshot)
    from reactdiff import preset_config

    columns = list(preset_config("small").mmt.inputs)
    frames = preset_config("small").seq_len
    train, val = load_split(snapshot, "train", columns, frames), load_split(snapshot, "val", columns, frames)
    result: dict[str, Any] = {"snapshot": snapshot.uri, "behaviour": behaviour, "samples": samples,
                              "seeds": seeds, "baselines": baselines(val, samples), "variants": {}}
    for name in names:
        variant = VARIANTS[name]
        if stage1_steps:
            variant = dataclasses.replace(variant, stage1_steps=stage1_steps)
        if quick:
            variant = dataclasses.replace(variant, stage1_steps=variant.stage1_steps // 4,
                                          stage2_steps=variant.stage2_steps // 4)
        scales = [None] + [g for g in guidance or [] if variant.probe == "generate"]
        per_seed: dict[str, list[dict]] = {}
        for seed in seeds:
            gen, times = train_variant(variant, train, snapshot.mean_face(), seed)
            for g in scales:
                row = name if g is None else f"{name}@g{g:g}"
                t0 = time.perf_counter()
                metrics = score(predict(gen, variant, val, samples, seed, guidance=g), val)
                per_seed.setdefault(row, []).append({**metrics, **times, "predict_s": time.perf_counter() - t0})
                print(f"{row} seed {seed}: " + " ".join(f"{k} {v:.3f}" for k, v in per_seed[row][-1].items()),
                      flush=True)
        for row, runs in per_seed.items():
            result["variants"][row] = {
                "mean": {k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
                "per_seed": runs,
                "stage1_steps": variant.stage1_steps, "stage2_steps": variant.stage2_steps,
            }
    return result


def table(result: dict) -> str:
    cols = ["FRCorr", "FRDist", "FRDiv", "FRVar", "FRSyn", "jitter_ratio"]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = [(f"{n} (mean of {len(r['per_seed'])} seeds)", r["mean"]) for n, r in result["variants"].items()]
    rows += [(k.upper() if k == "gt" else k.capitalize(), v) for k, v in result["baselines"].items()]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" if not math.isnan(m[c]) else "nan" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--snapshot", help="feature snapshot URI (default: synthesise the benchmark's own)")
    parser.add_argument("--behaviour", default="backchannel", help="synthetic behaviour model of the dataset")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int)
    parser.add_argument("--guidance", nargs="*", type=float, help="also score at these guidance scales")
    parser.add_argument("--stage1-steps", type=int, help="stage-1 optimiser steps of every variant")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.quick, snapshot=args.snapshot, names=args.only, seeds=args.seeds, behaviour=args.behaviour,
                 guidance=args.guidance, stage1_steps=args.stage1_steps)
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"quality-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
