"""Promote the challenger to champion if it beats the champion on the same items and seeds.

Evaluates the candidate (alias ``challenger`` or a version number) and the current ``champion``
on one snapshot split with identical seeds (metrics cached per version and protocol in a
model-version tag), applies the gate, and moves the ``champion`` alias only if it passes. The
first model becomes champion when there is none (absolute ``threshold`` rules still apply).
The decision and both metric sets are recorded as tags ``promotion.*`` and in the description
of the candidate version. Concurrent promotions serialise on a registry lock; a promotion that
fails before the alias move leaves the old champion serving.

Gate (default: FRCorr not lower and FRDist not higher than the champion's), in a YAML file::

    FRCorr: {min_absolute_change: 0.0}           # greater is better (the metric's direction)
    FRDist: {min_absolute_change: 0.5}           # must improve by at least 0.5
    FRDiv:  {threshold: 0.01}                    # absolute floor

Exit codes: 0 promoted, first champion or no-op (already champion); 3 refused by the gate;
4 lock busy or champion kept moving (retry later); 1 other errors.

Examples:
  reactdiff promote
  reactdiff promote --dry-run
  reactdiff promote --candidate 7 --gate gate.yaml --features s3://bucket/snapshots/<id>
  ray job submit --working-dir . -- python -m jobs.promote --name reactdiff
"""

from __future__ import annotations

import dataclasses
import sys

from pipeline import config
from pipeline.registry.promote import PromoteConfig, dry_run, parse_gate, run_promotion

HELP = "gate the challenger against the champion on the same val items and seeds; move @champion if better"

# A snapshot or registry state that does not fit is reported (exit 1), not a traceback.
USER_ERRORS = (FileNotFoundError, ValueError)


def add_arguments(parser) -> None:
    config.add_config_arguments(parser, default="promote")
    config.add_options(parser, PromoteConfig)
    parser.add_argument("--gate", metavar="FILE", help="gate YAML (replaces the configured gate)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (candidate, the champion it would be compared with, cached "
                             "metrics, gate); evaluate and change nothing")


def run(args) -> int:
    cfg = config.load_args(PromoteConfig, args)
    if args.gate:
        cfg = dataclasses.replace(cfg, gate=parse_gate(config.read_yaml(args.gate)))
        cfg.validate()
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    return run_promotion(cfg).exit_code


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
