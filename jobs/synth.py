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

import argparse
import sys

HELP = "generate a synthetic REACT dataset (exact layout, learnable one-to-many reactions)"


def dyad_counts(text: str) -> list[int]:
    """``"8,4,4"`` -> [8, 4, 4] (train, val, test)."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if len(counts) != 3 or min(counts) < 0 or sum(counts) == 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative counts TRAIN,VAL,TEST such as 8,4,4; got {text!r}")
    return counts


def add_arguments(parser) -> None:
    from pipeline.config import add_config_arguments

    parser.add_argument("--out", default=None, metavar="URI",
                        help="dataset root to write, local path or s3://bucket/prefix "
                             "(default: <working directory>/data)")
    parser.add_argument("--dyads", type=dyad_counts, default=None, metavar="TRAIN,VAL,TEST",
                        help="dyads per split; each dyad is two person clips (default: 8,4,4)")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per clip at 25 fps (default: 751, as in REACT)")
    parser.add_argument("--seed", type=int, default=None, help="random seed; same seed, same data (default: 0)")
    parser.add_argument("--release", choices=["2024", "2023"], default=None,
                        help="2024: mp4 videos, Emotion roles renamed P1/P2; 2023: PNG frame folders, "
                             "original role names, UDIVA dyads too (default: 2024)")
    parser.add_argument("--behaviour", choices=["prototype", "backchannel"], default=None,
                        help="behaviour model: prototype (three speaker prototypes, mirror/complementary/"
                             "dampened listeners; the demo's) or backchannel (speaker groups, listeners "
                             "that smile, raise brows and nod while the partner talks) (default: prototype)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes rendering clips (default: one per CPU for sizeable datasets)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace the files of an existing synthetic dataset at --out")
    add_config_arguments(parser)


def run(args) -> int:
    from pipeline import runtime
    from pipeline.data import synth
    from pipeline.config import load

    cfg = load(synth.SynthConfig, args.config, args.overrides, out=args.out, dyads=args.dyads,
               frames=args.frames, seed=args.seed, release=args.release, workers=args.workers,
               overwrite=args.overwrite, behaviour=args.behaviour)
    out = cfg.out or runtime.workspace().data
    try:
        summary = synth.generate(out, dyads=tuple(cfg.dyads), frames=cfg.frames, seed=cfg.seed,
                                 release=cfg.release, workers=cfg.workers or None, overwrite=cfg.overwrite,
                                 behaviour=cfg.behaviour)
    except synth.SynthError as exc:
        print(f"reactdiff synth: {exc}", file=sys.stderr)
        return 1
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
