"""Extract per-frame features from a REACT dataset into an immutable Parquet snapshot.

A Ray Data job, one person clip per row, streaming: decode (decord / soundfile) -> feature
extractors (CPU tasks; TorchScript and wav2vec2 networks in actor pools, on GPU when the
cluster has one) -> one Parquet file per clip -> items, neighbours, quarantine -> manifest,
written last. The snapshot lands in <out>/<UTC time>-<feature-set hash>/.

Feature sets (jobs/configs/features/):
  demo    32x32 grayscale face crops, Kaldi MFCC 26, emotion + 3DMM labels (no weights needed)
  paper   the reference features: AU/VA/FE TorchScript networks, MFCC 26, wav2vec2 base;
          name the model files with --model au=URI --model va=URI --model fe=URI
          --model wav2vec2=URI (TorchScript runs code: only name files you trust)

Incremental: --incremental-from latest (or a snapshot URI/id) carries over every clip whose
source files (size + mtime/ETag) and feature set are unchanged; only new or changed clips are
decoded. Broken clips are quarantined with file and reason; the exit code is 1 only when the
quarantined fraction exceeds max_failure_fraction (then the snapshot is not published).

Other settings (--set KEY=VALUE; defaults in jobs/configs/extract.yaml):
  frames=751             crop/pad every clip to this many frames (default: each clip's own)
  frame_tolerance=2      frames the modalities of one clip may differ by before quarantine
  max_failure_fraction   quarantined fraction above which nothing is published (0.05)
  device=auto|cpu|cuda   where networks run (auto: GPU when the cluster has one)
  network_actors=N       max actors per network stage; cpus_per_actor=1.0
  decode_chunk=64        frames decoded at once; compression_level=3 (zstd)
  models.NAME=URI        same as --model NAME=URI

Examples:
  reactdiff extract --data .reactdiff/data --out .reactdiff/snapshots
  reactdiff extract --data s3://bucket/REACT2024 --out s3://bucket/snapshots --feature-set paper \\
      --model au=s3://bucket/models/au.pt ... --incremental-from latest
  ray job submit --working-dir . -- python -m jobs.extract --config jobs/configs/extract.yaml \\
      --set data=s3://bucket/REACT2024 --set out=s3://bucket/snapshots
"""

from __future__ import annotations

import sys

HELP = "extract per-frame features (video, audio, labels) into a Parquet feature snapshot with Ray Data"


def add_arguments(parser) -> None:
    from pipeline.config import add_config_arguments

    add_config_arguments(parser, default="extract")
    parser.add_argument("--data", help="REACT dataset root: local path or s3://bucket/prefix")
    parser.add_argument("--out", help="snapshots root (default: <workdir>/snapshots)")
    parser.add_argument("--feature-set", dest="feature_set",
                        help="demo | paper | path to a feature-set YAML (default: demo)")
    parser.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=URI",
                        help="model file of extractor NAME (repeatable), e.g. au=s3://models/au.pt")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT",
                        help="only these splits (train val test; default: every split with a csv)")
    parser.add_argument("--incremental-from", dest="incremental_from", metavar="SNAPSHOT",
                        help="carry unchanged clips over from this snapshot (URI, id, or 'latest')")
    parser.add_argument("--limit", type=int, help="only the first N clips (smoke runs)")
    parser.add_argument("--ray-address", dest="ray_address",
                        help="Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray on 127.0.0.1)")
    parser.add_argument("--json", action="store_true", help="print the manifest counts and timings as JSON")


def _models(pairs: list[str]) -> dict[str, str] | None:
    from pipeline.config import ConfigError

    out = {}
    for pair in pairs or []:
        name, sep, uri = pair.partition("=")
        if not sep or not name or not uri:
            raise ConfigError(f"--model {pair!r} must look like NAME=URI (e.g. au=s3://models/au.pt)")
        out[name.strip()] = uri.strip()
    return out or None


def run(args) -> int:
    import json

    from pipeline import config
    from pipeline.data.extract import ExtractConfig, extract
    from pipeline.data.features import FeatureSetError
    from pipeline.data.react import ReactLayoutError
    from pipeline.data.snapshot import SnapshotError

    splits = None
    if args.splits:
        splits = [s for part in args.splits for s in part.split(",") if s]
    cfg = config.load(ExtractConfig, args.config, args.overrides, data=args.data, out=args.out,
                      feature_set=args.feature_set, splits=splits, incremental_from=args.incremental_from,
                      limit=args.limit, ray_address=args.ray_address)
    models = _models(args.models)
    if models:
        cfg.models = {**cfg.models, **models}
    try:
        result = extract(cfg)
    except (ReactLayoutError, SnapshotError) as exc:
        print(f"reactdiff extract: {exc}", file=sys.stderr)
        return 2
    except FeatureSetError as exc:
        print(f"reactdiff extract: feature set: {exc}", file=sys.stderr)
        return 2
    print(result.report)
    if args.json:
        m = result.manifest
        print(json.dumps({"id": m["id"], "uri": result.uri, "published": result.published,
                          "counts": m["counts"], "timings": m["timings"], "bytes": m["bytes"]}, indent=2))
    else:
        print(result.uri)
    return result.exit_code


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
