"""Extract per-frame features from a REACT dataset into an immutable Parquet snapshot.

A Ray Data job, one person clip per row, streaming: decode (decord / soundfile) -> feature
extractors (CPU tasks; TorchScript and wav2vec2 networks in actor pools, on GPU when the
cluster has one) -> one Parquet file per clip -> items, neighbours, quarantine -> manifest,
written last. The snapshot lands in <out>/<UTC time>-<feature-set hash>/.

Feature sets (pipeline/data/feature_sets/):
  demo    32x32 grayscale face crops, Kaldi MFCC 26, emotion + 3DMM labels (no weights needed)
  paper   the reference features: AU/VA/FE TorchScript networks, MFCC 26, wav2vec2 base;
          name the model files with --model au=URI --model va=URI --model fe=URI
          --model wav2vec2=URI (TorchScript runs code: only name files you trust)

Incremental: --incremental-from latest (or a snapshot URI/id) carries over every clip whose
source files (size + mtime/ETag) and feature set are unchanged; only new or changed clips are
decoded. Broken clips are quarantined with file and reason; the exit code is 1 only when the
quarantined fraction exceeds max_failure_fraction (then the snapshot is not published).

Examples:
  reactdiff extract --data .reactdiff/data --out .reactdiff/snapshots
  reactdiff extract --data .reactdiff/data --incremental-from latest --dry-run
  reactdiff extract --data s3://bucket/REACT2024 --out s3://bucket/snapshots --feature-set paper \\
      --model au=s3://bucket/models/au.pt ... --incremental-from latest
  ray job submit --working-dir . -- python -m jobs.extract --config jobs/configs/extract.yaml \\
      --set data=s3://bucket/REACT2024 --set out=s3://bucket/snapshots
"""

from __future__ import annotations

import json
import sys

from pipeline import config
from pipeline.data.extract import ExtractConfig, dry_run, extract
from pipeline.registry import runs as tracking

HELP = "extract per-frame features (video, audio, labels) into a Parquet feature snapshot with Ray Data"

# A user error (bad data root, layout, feature set or snapshot) exits 2: 1 is reserved for "too
# many clips quarantined, nothing published".
USER_ERROR_EXIT = 2


def add_arguments(parser) -> None:
    config.add_config_arguments(parser, default="extract")
    config.add_options(parser, ExtractConfig)
    parser.add_argument("--json", action="store_true", help="print the manifest counts and timings as JSON")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false",
                        help="record no MLflow run (by default one per extraction in experiment reactdiff-data: "
                             "counts, quarantine, timings, the report)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (clips to decode or carry over, where the snapshot goes); write nothing")


def run(args) -> int:
    cfg = config.load_args(ExtractConfig, args)
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    result = extract(cfg)
    print(result.report)
    if args.mlflow:
        run_id = tracking.log_extraction(result.manifest, result.uri, result.published, result.report)
        print(f"MLflow run {run_id} (experiment {tracking.DATA_EXPERIMENT}, {tracking.tracking_uri()})")
    if args.json:
        m = result.manifest.to_json()
        print(json.dumps({"id": m["id"], "uri": result.uri, "published": result.published,
                          "counts": m["counts"], "timings": m["timings"], "bytes": m["bytes"]}, indent=2))
    else:
        print(result.uri)
    return result.exit_code


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
