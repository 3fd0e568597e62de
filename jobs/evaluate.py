"""Evaluate a generator on a feature-snapshot split with the official REACT metrics.

Generates K reactions per directed item over a Ray Data actor pool (the generator is loaded
once per actor, on GPU when the cluster has one; item k always uses a seed derived from
(seed, k)), then computes FRCorr, FRDist, FRDiv, FRVar, FRDvs and FRSyn with the split's
neighbour matrix — FRDist's DTW rows spread over Ray tasks — and the same metrics for the
baseline rows (ground truth, Mime = copy the speaker, Random, Mean). Writes a JSON report,
logs the metrics to MLflow (to the version's training run for registry URIs, e.g.
val_FRCorr, else a run in experiment "reactdiff-eval") and prints a table.

--predictions scores a Parquet written by batch generation (one row per item: item int64,
emotion float32 [K, T, 25]) without generating; see pipeline/evaluate/predictions.py.

Examples:
  reactdiff evaluate --model models:/reactdiff@challenger --split val
  reactdiff evaluate --model models:/reactdiff/3 --features s3://bucket/snapshots/<id> --split test
  reactdiff evaluate --predictions s3://bucket/reactions/val --features <snapshot> --baseline gt
  ray job submit --working-dir . -- python -m jobs.evaluate --model models:/reactdiff@champion
"""

from __future__ import annotations

import sys

from pipeline import config
from pipeline.evaluate.job import EvaluateConfig, run_evaluation

HELP = "score a model (or saved predictions) with the REACT metrics and baseline rows; log to MLflow"

# Predictions or snapshots that do not fit the split are reported (exit 1), not a traceback.
USER_ERRORS = (FileNotFoundError, ValueError)


def add_arguments(parser) -> None:
    config.add_config_arguments(parser, default="evaluate")
    config.add_options(parser, EvaluateConfig)
    parser.add_argument("--no-baselines", action="store_true", help="score the model row only")


def run(args) -> int:
    run_evaluation(config.load_args(EvaluateConfig, args, baselines=[] if args.no_baselines else None))
    return 0


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
