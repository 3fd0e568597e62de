"""Generate listener reactions for a new speaker clip, or predictions for a whole split.

One clip: the speaker's features are extracted with the extraction job's own code and the
feature set recorded with the model (its snapshot manifest), the model draws K reactions, and
OUT receives per sample the REACT formats plus pictures:

  reaction_00.csv ...  25 columns AU1 ... Contempt, one row per frame (751: the model makes 750,
                       the last row repeats frame 750); AUs in [0, 1], valence/arousal in [-1, 1],
                       expression probabilities clipped at 0 and renormalised to sum to 1
  reaction_00.npy ...  751 x 58 FaceVerse v2 coefficients (52 expression, 3 rotation, 3 translation)
  reactions.png        all K reactions' trajectories (AU raster, valence/arousal, expressions)
                       under the speaker's attributes when --speaker-attributes is given
  reaction_00.mp4      the speaker video beside a face animated by one reaction (H.264, 25 fps)
  generation.json      model version, seeds, inputs, what was clipped or padded, timings

A whole split (--split) writes Parquet predictions (one row per directed item: item, emotion
[K, T, 25], speaker, listener, seed) in the evaluation contract, with the evaluation job's
per-item seeds, so `reactdiff evaluate --predictions OUT` scores them without regenerating.

Examples:
  reactdiff generate --model models:/reactdiff@champion --speaker-video talk.mp4 --out reactions/
  reactdiff generate --speaker-video talk.mp4 --speaker-audio talk.wav \\
      --speaker-attributes talk.csv --samples 10 --seed 3 --out s3://bucket/reactions/talk
  reactdiff generate --model models:/reactdiff/4 --features s3://bucket/snapshots/<id> \\
      --split test --out s3://bucket/predictions/test
  ray job submit --working-dir . -- python -m jobs.generate --split test --out s3://...
"""

from __future__ import annotations

import sys

HELP = "generate reactions for a speaker clip (REACT files, plot, video) or predictions for a split"


def _key_value(text: str) -> tuple[str, str]:
    import argparse

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=URI, got {text!r}")
    name, uri = text.split("=", 1)
    return name.strip(), uri.strip()


def add_arguments(parser) -> None:
    from pipeline.config import add_config_arguments

    add_config_arguments(parser, default="generate")
    parser.add_argument("--model", metavar="MODEL_URI",
                        help="models:/reactdiff@champion (default), models:/reactdiff/3, runs:/..., or a generator file")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder, local or s3:// (default: <workdir>/outputs/generate-<time>)")
    parser.add_argument("--samples", type=int, help="reactions per speaker (default: 10)")
    parser.add_argument("--seed", type=int,
                        help="seed (default 0); with --split, item k uses pipeline.evaluate.job.item_seed(seed, k)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the generator's schedule)")
    parser.add_argument("--decoder-dropout", dest="decoder_dropout", action="store_true", default=None,
                        help="sample with the frozen decoder's dropout on, as the reference does (more diverse, less faithful; default: off)")
    parser.add_argument("--features", metavar="SNAPSHOT",
                        help="feature snapshot URI or id: the model's feature set (one clip) or the split's "
                             "features (--split); default: the model version's snapshot_uri tag")
    clip = parser.add_argument_group("one speaker clip")
    clip.add_argument("--speaker-video", dest="speaker_video", metavar="FILE",
                      help="the speaker's face video (mp4), local or s3://; at least 64x64 px, 25 fps, "
                           "as long as the model's window (30 s)")
    clip.add_argument("--speaker-audio", dest="speaker_audio", metavar="FILE",
                      help="the speaker's audio (wav); default: the video's own audio stream")
    clip.add_argument("--speaker-attributes", dest="speaker_attributes", metavar="CSV",
                      help="the speaker's 25-column REACT attributes, drawn above the reactions in the plot")
    clip.add_argument("--speaker-3dmm", dest="speaker_3dmm", metavar="NPY",
                      help="the speaker's 58-d 3DMM (T x 58); only models that consume it need it")
    clip.add_argument("--binarize", action="store_true", default=None,
                      help="write the 15 AU columns as 0/1 (threshold 0.5) instead of scores in [0, 1]")
    clip.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="skip reactions.png")
    clip.add_argument("--no-video", dest="video", action="store_false", default=None, help="skip the mp4")
    clip.add_argument("--video-sample", dest="video_sample", type=int, metavar="K",
                      help="which reaction drives the face in the video (default: 0)")
    clip.add_argument("--renderer", metavar="MODULE:FACTORY",
                      help="face renderer: 'cartoon' (built-in 2D face) or a factory taking size= and "
                           "returning an object with render(emotion, tdmm) -> frames (e.g. FaceVerse)")
    clip.add_argument("--feature-model", dest="feature_models", action="append", type=_key_value,
                      metavar="NAME=URI",
                      help="model file of a network extractor (as for `reactdiff extract --model`), repeatable")
    split = parser.add_argument_group("a whole split (Ray Data)")
    split.add_argument("--split", choices=["train", "val", "test"],
                       help="generate for every directed item of this snapshot split")
    split.add_argument("--max-items", dest="max_items", type=int, help="only the first N items (smoke runs)")
    split.add_argument("--batch-size", dest="batch_size", type=int, help="items per actor call (default: 8)")
    split.add_argument("--actors", type=int, help="generation actors (default: one per GPU, else up to 2)")
    split.add_argument("--ray-address", dest="ray_address",
                       help="Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray on 127.0.0.1)")


def run(args) -> int:
    from pipeline import config
    from pipeline.generate.job import ClipResult, GenerateConfig, GenerationError, run_generation
    from pipeline.registry.models import RegistryError
    from pipeline.data.snapshot import SnapshotError

    cfg = config.load(GenerateConfig, args.config, args.overrides, model=args.model, out=args.out,
                      samples=args.samples, seed=args.seed, steps=args.steps, features=args.features,
                      decoder_dropout=args.decoder_dropout,
                      speaker_video=args.speaker_video, speaker_audio=args.speaker_audio,
                      speaker_attributes=args.speaker_attributes, speaker_3dmm=args.speaker_3dmm,
                      binarize=args.binarize, plot=args.plot, video=args.video, video_sample=args.video_sample,
                      renderer=args.renderer, feature_models=dict(args.feature_models) if args.feature_models else None,
                      split=args.split, max_items=args.max_items, batch_size=args.batch_size,
                      actors=args.actors, ray_address=args.ray_address)
    try:
        result = run_generation(cfg)
    except (GenerationError, RegistryError, SnapshotError) as exc:
        print(f"reactdiff generate: {exc}", file=sys.stderr)
        return 1
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
