"""Generate listener reactions for a new speaker clip, or predictions for a whole split.

One clip — an ordinary recording: any frame rate (resampled to 25 fps by timestamps), size,
rotation and length from 2 s; the face found, tracked and cropped (or --face-box); the sound
from the container or --speaker-audio (docs/generation.md). The speaker's features are
extracted with the extraction job's own code and the feature set recorded with the model (its
snapshot manifest), the model draws K reactions for every frame of the clip (30-s windows,
overlapping and cross-faded on longer clips), and OUT receives per sample the REACT formats
plus pictures:

  reaction_00.csv ...  25 columns AU1 ... Contempt, one row per frame at 25 fps (a REACT clip:
                       751, the model makes 750 and the last row repeats frame 750); AUs in
                       [0, 1], valence/arousal in [-1, 1], expression probabilities clipped at 0
                       and renormalised to sum to 1
  reaction_00.npy ...  T x 58 FaceVerse v2 coefficients (52 expression, 3 rotation, 3 translation)
  reactions.png        all K reactions' trajectories (AU raster, valence/arousal, expressions)
                       under the speaker's attributes when --speaker-attributes is given
  reaction_00.mp4      the speaker video beside a face animated by one reaction (H.264, 25 fps)
  generation.json      model version, seeds, inputs, the face found, windows, what was clipped
                       or padded, timings

A whole split (--split) writes Parquet predictions (one row per directed item: item, emotion
[K, T, 25], speaker, listener, seed) in the evaluation contract, with the evaluation job's
per-item seeds, so `reactdiff evaluate --predictions OUT` scores them without regenerating.

Examples:
  reactdiff generate --model models:/reactdiff@champion --speaker-video talk.mp4 --out reactions/
  reactdiff generate --speaker-video phone-30fps.mov --face-box 420,300,380,380 --out reactions/
  reactdiff generate --speaker-video talk.mp4 --speaker-audio talk.wav \\
      --speaker-attributes talk.csv --samples 10 --seed 3 --out s3://bucket/reactions/talk
  reactdiff generate --model models:/reactdiff/4 --features s3://bucket/snapshots/<id> \\
      --split test --out s3://bucket/predictions/test
  ray job submit --working-dir . -- python -m jobs.generate --split test --out s3://...
"""

from __future__ import annotations

import sys

from pipeline import config
from pipeline.generate.job import ClipResult, GenerateConfig, run_generation

HELP = "generate reactions for a speaker clip (REACT files, plot, video) or predictions for a split"


def add_arguments(parser) -> None:
    config.add_config_arguments(parser, default="generate")
    config.add_options(parser, GenerateConfig)


def run(args) -> int:
    result = run_generation(config.load_args(GenerateConfig, args))
    if isinstance(result, ClipResult):
        s = result.summary
        print(f"{s['samples']} reactions ({s['frames']['written']} frames each) -> {result.out}")
        for kind in ("attributes", "tdmm", "plot", "video", "summary"):
            uris = result.files.get(kind) or []
            if uris:
                more = f" (+{len(uris) - 1} more)" if len(uris) > 1 else ""
                print(f"  {kind:<10} {uris[0]}{more}")
        for note in s["notes"]:
            print(f"  note: {note}")
    else:
        print(f"predictions for {result.items} items ({result.manifest['samples']} samples each) -> {result.out}")
        if result.skipped:
            print(f"  {len(result.skipped)} item(s) skipped (speaker or listener clip quarantined): "
                  f"{result.skipped[:10]}")
        print(f"  score them: reactdiff evaluate --predictions {result.out} "
              f"--features {result.manifest['model']['snapshot_uri']} --split {result.manifest['split']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
