"""Generate a synthetic REACT dataset: the exact on-disk layout of the licensed corpus, with a
learnable one-to-many speaker -> listener relation.

Each dyad is two person clips of FRAMES frames at 25 fps: an H.264 256x256 face video (2024) or
a folder of PNG frames (2023), a 44.1 kHz wav, the 25-column Emotion csv and the 58-d 3DMM npy.
The listener reacts to the speaker 5-15 frames later in one of several styles, and the split
csvs, data_indices.csv, Approprirate_facial_reaction.npy and mean_face.npy are written too.
The same seed gives the same data. Re-running with identical options on a complete dataset does
nothing; an interrupted run is redone.

examples:
  reactdiff synth                                   # 8/4/4 dyads into the working directory
  reactdiff synth --out /data/react-synth --dyads 80,20,20 --release 2023
  reactdiff synth --out s3://bucket/react-synth --frames 251
"""

from __future__ import annotations

import sys

from pipeline import config, runtime
from pipeline.data import synth

HELP = "generate a synthetic REACT dataset (exact layout, learnable one-to-many reactions)"


def add_arguments(parser) -> None:
    config.add_options(parser, synth.SynthConfig)
    config.add_config_arguments(parser)


def run(args) -> int:
    cfg = config.load_args(synth.SynthConfig, args)
    out = cfg.out or runtime.workspace().data
    summary = synth.generate(out, dyads=tuple(cfg.dyads), frames=cfg.frames, seed=cfg.seed, release=cfg.release,
                             workers=cfg.workers or None, overwrite=cfg.overwrite, behaviour=cfg.behaviour)
    if summary.skipped:
        print(f"{out}: an identical synthetic dataset is already complete (use --overwrite to redo it)")
    else:
        counts = ", ".join(f"{k} {v}" for k, v in summary.dyads.items())
        print(f"wrote a synthetic REACT {summary.release} dataset to {out}: {summary.clips} person clips "
              f"({counts} dyads), {summary.frames} frames each, seed {summary.seed}, "
              f"{summary.seconds:.1f} s with {summary.workers} worker(s)")
    print(f"check it with: reactdiff inspect --data {out}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
