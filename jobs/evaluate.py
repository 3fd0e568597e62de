"""Evaluate a generator on a feature-snapshot split with the official REACT metrics.

Generates K reactions per directed item over a Ray Data actor pool (the generator is loaded
once per actor, on GPU when the cluster has one; item k always uses a seed derived from
(seed, k)), then computes FRCorr, FRDist, FRDiv, FRVar, FRDvs and FRSyn with the split's
neighbour matrix — FRDist's DTW rows spread over Ray tasks — and the same metrics for the
baseline rows (ground truth, Mime = copy the speaker, Random, Mean). Writes a JSON report,
logs the metrics to MLflow (to the version's training run for registry URIs, e.g.
val_FRCorr, else a run in experiment "reactdiff-eval") and prints a table.

--predictions scores a Parquet written by batch generation (one row per item: item int64,
emotion float32 [K, T, 25]) without generating; see pipeline/evaluate/job.py.

Examples:
  reactdiff evaluate --model models:/reactdiff@challenger --split val
  reactdiff evaluate --model models:/reactdiff/3 --features s3://bucket/snapshots/<id> --split test
  reactdiff evaluate --predictions s3://bucket/reactions/val --features <snapshot> --baseline gt
  ray job submit --working-dir . -- python -m jobs.evaluate --model models:/reactdiff@champion
"""

from __future__ import annotations

import sys

HELP = "score a model (or saved predictions) with the REACT metrics and baseline rows; log to MLflow"


def add_arguments(parser) -> None:
    from pipeline.config import add_config_arguments

    add_config_arguments(parser, default="evaluate")
    parser.add_argument("--model", metavar="MODEL_URI",
                        help="models:/reactdiff@champion, models:/reactdiff/3, runs:/..., or a generator file")
    parser.add_argument("--features", metavar="SNAPSHOT",
                        help="feature snapshot URI (default: the version's snapshot_uri tag, else the newest)")
    parser.add_argument("--split", choices=["val", "test", "train"], help="split to score (default: val)")
    parser.add_argument("--samples", type=int, help="reactions per item (default: 10, the official protocol)")
    parser.add_argument("--seed", type=int, help="base seed (default: 0)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the generator's schedule)")
    parser.add_argument("--decoder-dropout", dest="decoder_dropout", action="store_true", default=None,
                        help="sample with the frozen decoder's dropout on, as the reference does (more diverse, less faithful; default: off)")
    parser.add_argument("--baseline", dest="baselines", action="extend", nargs="+",
                        choices=["gt", "mime", "random", "mean"],
                        help="baseline rows to score alongside (e.g. --baseline gt mime; default: all four)")
    parser.add_argument("--no-baselines", action="store_true", help="score the model row only")
    parser.add_argument("--predictions", metavar="URI",
                        help="score this predictions Parquet (file or folder) instead of generating")
    parser.add_argument("--save-predictions", dest="save_predictions", metavar="URI",
                        help="also write the generated predictions as Parquet (re-score with --predictions)")
    parser.add_argument("--max-items", dest="max_items", type=int,
                        help="only the first N items (smoke runs; not comparable with full-split numbers)")
    parser.add_argument("--binarize", action="store_true", default=None,
                        help="round the 15 AU dims of the predictions to {0,1} before all metrics")
    parser.add_argument("--out", metavar="FILE", help="JSON report (local path or s3://)")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false", default=None,
                        help="do not log to MLflow")
    parser.add_argument("--ray-address", dest="ray_address",
                        help="Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray on 127.0.0.1)")


def run(args) -> int:
    from pipeline import config
    from pipeline.evaluate.job import EvaluateConfig, run_evaluation
    from pipeline.registry.models import RegistryError
    from pipeline.data.snapshot import SnapshotError

    baselines = [] if args.no_baselines else args.baselines
    cfg = config.load(EvaluateConfig, args.config, args.overrides, model=args.model, features=args.features,
                      split=args.split, samples=args.samples, seed=args.seed, steps=args.steps,
                      decoder_dropout=args.decoder_dropout, baselines=baselines, predictions=args.predictions,
                      save_predictions=args.save_predictions, max_items=args.max_items,
                      binarize=args.binarize, out=args.out, mlflow=args.mlflow, ray_address=args.ray_address)
    try:
        run_evaluation(cfg)
    except (RegistryError, SnapshotError, FileNotFoundError, ValueError) as exc:
        print(f"reactdiff evaluate: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
