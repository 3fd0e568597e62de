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
  reactdiff promote --candidate 7 --gate gate.yaml --features s3://bucket/snapshots/<id>
  ray job submit --working-dir . -- python -m jobs.promote --name reactdiff
"""

from __future__ import annotations

import sys

HELP = "gate the challenger against the champion on the same val items and seeds; move @champion if better"


def add_arguments(parser) -> None:
    from pipeline.config import add_config_arguments

    add_config_arguments(parser, default="promote")
    parser.add_argument("--name", help="registered model (default: reactdiff)")
    parser.add_argument("--candidate", help="alias or version number to promote (default: challenger)")
    parser.add_argument("--champion", help="the serving alias to move (default: champion)")
    parser.add_argument("--gate", metavar="FILE", help="gate YAML (replaces the configured gate)")
    parser.add_argument("--features", metavar="SNAPSHOT",
                        help="feature snapshot URI (default: the candidate's snapshot_uri tag, else the newest)")
    parser.add_argument("--split", choices=["val", "test", "train"], help="split to compare on (default: val)")
    parser.add_argument("--samples", type=int, help="reactions per item (default: 10)")
    parser.add_argument("--max-items", dest="max_items", type=int, help="first N items only (smoke runs)")
    parser.add_argument("--decoder-dropout", dest="decoder_dropout", action="store_true", default=None,
                        help="sample with the frozen decoder's dropout on, as the reference does (more diverse, less faithful; default: off)")
    parser.add_argument("--no-cache", dest="reuse_evaluations", action="store_false", default=None,
                        help="re-evaluate even if a version has cached metrics for this protocol")
    parser.add_argument("--out", metavar="FILE", help="write the decision as JSON")
    parser.add_argument("--ray-address", dest="ray_address",
                        help="Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray on 127.0.0.1)")


def run(args) -> int:
    import dataclasses

    from pipeline import config
    from pipeline.registry.promote import (EXIT_BUSY, LockBusy, PromoteConfig, PromotionConflict, parse_gate,
                                  run_promotion)
    from pipeline.registry.models import RegistryError
    from pipeline.data.snapshot import SnapshotError

    evaluation = {k: v for k, v in {"samples": args.samples, "max_items": args.max_items,
                                    "decoder_dropout": args.decoder_dropout}.items() if v is not None}
    cfg = config.load(PromoteConfig, args.config, args.overrides, name=args.name, candidate=args.candidate,
                      champion=args.champion, features=args.features, split=args.split,
                      evaluation=evaluation or None, reuse_evaluations=args.reuse_evaluations,
                      out=args.out, ray_address=args.ray_address)
    if args.gate:
        cfg = dataclasses.replace(cfg, gate=parse_gate(config.read_yaml(args.gate)))
        cfg.validate()
    try:
        return run_promotion(cfg).exit_code
    except (LockBusy, PromotionConflict) as exc:
        print(f"reactdiff promote: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (RegistryError, SnapshotError, FileNotFoundError, ValueError) as exc:
        print(f"reactdiff promote: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
