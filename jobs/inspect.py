"""Check a REACT dataset root before extracting features from it.

Reads the split csvs and lists the modality trees (Video_files, Audio_files, Emotion,
3D_FV_files) of every split, then opens every file: video frame counts and fps (mp4 container
metadata, or the number of PNG frames), wav length and rate, Emotion csv columns, 3DMM shapes.
Prints counts per split and site, frame counts, the appropriate-neighbour matrices, and every
missing or mismatched file with the reason.

Exit status: 0 when the dataset is usable (per-clip problems are listed; `reactdiff extract`
quarantines those clips), 1 when it is not (no split csv, no clips, no complete dyad, an unsafe
csv path), or with --strict when any problem was found.

examples:
  reactdiff inspect --data /data/REACT2024
  reactdiff inspect --data s3://bucket/REACT2024 --quick
"""

from __future__ import annotations

import logging
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

from pipeline import config, runtime
from pipeline.config import ConfigError, option
from pipeline.data import react
from pipeline.data.snapshot import MEAN_FACE_MISSING

HELP = "check a REACT dataset root: counts per split/site, frame counts, missing or broken files"

log = logging.getLogger(__name__)


@dataclass
class InspectConfig:
    """Options of ``reactdiff inspect`` (YAML/``--set`` keys)."""

    data: str = option("", "dataset root, local path or s3://bucket/prefix (default: <working directory>/data)",
                       flag="--data", metavar="URI")
    quick: bool = option(False, "check the listings only (missing files); do not open every file", flag="--quick")
    frames: int = option(0, "expected frames per clip (REACT: 751); default 0: the most common count",
                         flag="--frames")
    strict: bool = option(False, "exit with status 1 when any problem is found, not only when the dataset is "
                                 "unusable", flag="--strict")
    max_problems: int = option(30, "how many problems to print (all are counted)", flag="--max-problems")
    workers: int = option(16, "threads reading files", flag="--workers")

    def validate(self) -> None:
        if self.frames < 0 or self.max_problems < 0 or self.workers < 1:
            raise ConfigError("frames and max_problems must be >= 0, workers >= 1")


def add_arguments(parser) -> None:
    config.add_options(parser, InspectConfig)
    config.add_config_arguments(parser)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def _counts(values) -> str:
    counts = Counter(values)
    if not counts:
        return "none read"
    return ", ".join(f"{v} ({n} clip{'s' if n > 1 else ''})" if len(counts) > 1 else f"{v} (all {n} clips)"
                     for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def run(args) -> int:
    cfg = config.load_args(InspectConfig, args)
    root = cfg.data or runtime.workspace().data
    try:
        ds = react.open_dataset(root)
        clips = ds.clips()
    except react.ReactLayoutError as exc:
        print(f"unusable: {exc}", file=sys.stderr)
        return 1

    print(f"REACT dataset {ds.root}")
    if not clips:
        print("unusable: the split csvs list no clips", file=sys.stderr)
        return 1
    missing_csv = [f"{s}.csv" for s in react.SPLITS if s not in ds.splits]
    mean_face = "yes" if react.storage.exists(react.storage.join(ds.root, react.MEAN_FACE)) else "no"
    video = {"2024": "mp4 videos", "2023": "PNG frame folders"}[ds.release]
    print(f"  release {ds.release} ({video}); Emotion roles: {ds.emotion_naming}; mean_face.npy: {mean_face}"
          + (f"; no {', '.join(missing_csv)}" if missing_csv else ""))
    if mean_face == "no":
        print(f"  warning: {MEAN_FACE_MISSING}")

    # Counts per split and site.
    rows = []
    for split in ds.splits:
        by_site: dict[str, list] = defaultdict(list)
        for clip in ds.clips(split):
            by_site[clip.site].append(clip)
        dyads_by_site = Counter(react.parse_clip_path(s, "")[0] for s, _ in ds.dyads(split))
        for site in sorted(by_site):
            cs = by_site[site]
            present = [sum(getattr(c, f) is not None for c in cs) for f in ("video", "audio", "emotion", "tdmm")]
            rows.append([split, site, dyads_by_site[site], len(cs), *(f"{n}/{len(cs)}" for n in present)])
    print()
    print(_table(rows, ["split", "site", "dyads", "clips", "video", "audio", "emotion", "3dmm"]))

    # File contents.
    probes = None
    if not cfg.quick:
        step = max(1, len(clips) // 10)

        def progress(done, total):
            if total >= 100 and (done % step == 0 or done == total):
                log.info("read %d/%d clips", done, total)

        probes = ds.probe_all(clips, workers=cfg.workers, progress=progress)
        print()
        print(f"frames per clip: {_counts(p.num_frames for p in probes if p.num_frames is not None)}")
        rates = "PNG frames" if ds.release == "2023" else _counts(f"{p.video_fps:g} fps" for p in probes if p.video_fps)
        print(f"video: {rates}; {_counts(f'{p.video_size[1]}x{p.video_size[0]}' for p in probes if p.video_size)}")
        print(f"audio: {_counts(f'{p.audio_rate} Hz' for p in probes if p.audio_rate)}; "
              f"{_counts(f'{p.audio_seconds:.2f} s' for p in probes if p.audio_seconds is not None)}")
    problems = ds.problems(expected_frames=cfg.frames or None, probes=probes)

    print()
    for split in ds.splits:
        try:
            matrix = ds.neighbours(split)
        except react.ReactLayoutError as exc:
            print(f"neighbours {split}: unreadable ({exc})")
            continue
        if matrix is None:
            print(f"neighbours {split}: none (no {react.split_neighbours_file(split)}, "
                  f"and no {react.DATA_INDICES} + {react.ALL_NEIGHBOURS}); metrics need it for this split")
        else:
            print(f"neighbours {split}: {matrix.shape[0]}x{matrix.shape[1]} from {ds.neighbour_source(split)}, "
                  f"{matrix.sum(1).mean():.2f} appropriate reactions per item, diagonal "
                  f"{'complete' if matrix.diagonal().all() else 'INCOMPLETE'}")

    complete = ds.complete_dyads(problems)
    print()
    if problems:
        print(f"problems ({len(problems)}):")
        for p in problems[:cfg.max_problems]:
            print(f"  {p}")
        if len(problems) > cfg.max_problems:
            print(f"  ... {len(problems) - cfg.max_problems} more (--max-problems to see them)")
    else:
        print("problems: none")
    usable = sum(complete.values())
    summary = ", ".join(f"{s} {n}/{len(ds.dyads(s))}" for s, n in complete.items())
    if not usable:
        print(f"unusable: no complete dyad (complete/listed: {summary})", file=sys.stderr)
        return 1
    print(f"usable: complete dyads {summary}")
    return 1 if cfg.strict and problems else 0


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
