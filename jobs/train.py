"""Train a ReactDiff stage on Ray Train V2 (TorchTrainer, DDP), tracked in MLflow.

  stage 1  --stage autoencoder: the MMT auto-encoder on the snapshot's train clips (own
           features → own emotion + 3DMM), validated on val; writes <storage>/<name>/autoencoder.pt
           with the latent statistics of the train split.
  stage 2  --stage diffusion: latent diffusion over the frozen stage 1 (found automatically: the
           newest finished stage-1 run on the same snapshot, or --autoencoder URI); validated on val
           (losses + REACT metrics on a few items); registers the whole generator in MLflow as a new
           version of `reactdiff` with alias `challenger`.

A run is named (--name, default derived from stage, preset and snapshot); re-running the same
name resumes from its last checkpoint and continues the same MLflow run. Checkpoints go to
--storage (local or s3://), every `checkpoint.every` epochs.

Examples:
  reactdiff train --stage autoencoder --features latest
  reactdiff train --stage diffusion --features latest --epochs 20
  reactdiff train --stage autoencoder --features latest --set stage1.epochs=3 --dry-run
  reactdiff train --stage autoencoder --features s3://bucket/snapshots/<id> --storage s3://bucket/ckpt \\
      --set preset=paper --set scaling.use_gpu=true --num-workers 8
  ray job submit --working-dir . -- python -m jobs.train --stage diffusion --features s3://.../<id>
"""

from __future__ import annotations

import json
import sys

from pipeline import config
from pipeline.train.config import TrainConfig
from pipeline.train.job import dry_run, train

HELP = "train stage 1 (autoencoder) or stage 2 (diffusion) on Ray Train with MLflow tracking"


def add_arguments(parser) -> None:
    config.add_config_arguments(parser, default="train")
    config.add_options(parser, TrainConfig)
    # Not one config field each: they land in the section (stage1/stage2) of the stage trained.
    parser.add_argument("--epochs", type=int, help="epochs of the chosen stage")
    parser.add_argument("--batch-size", dest="batch_size", type=int,
                        help="clips (stage 1) / directed items (stage 2) per optimiser step of the chosen stage, "
                             "all workers together")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (run name, resume point, epochs and steps, storage, MLflow); "
                             "start nothing, write nothing")


def config_from_args(args) -> TrainConfig:
    """--config + --set + explicit options → TrainConfig (explicit options win)."""
    stage = args.stage or config.load(TrainConfig, args.config, args.overrides).stage
    section = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    explicit = {"stage1" if stage == "autoencoder" else "stage2": section} if section else {}
    return config.load_args(TrainConfig, args, **explicit)


def run(args) -> int:
    cfg = config_from_args(args)
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    result = train(cfg)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(f"{result.stage} run {result.name}: epoch {result.epoch}, output {result.output_uri}")
        print(f"  MLflow run {result.mlflow_run_id}; checkpoint {result.checkpoint_uri}")
        shown = {k: v for k, v in result.metrics.items() if k.startswith(("train/loss", "val/"))}
        for k, v in sorted(shown.items()):
            print(f"  {k:<20} {v:.4f}")
        if result.model_version:
            print(f"  registered {cfg.mlflow.model_name} version {result.model_version} "
                  f"(models:/{cfg.mlflow.model_name}@{cfg.mlflow.alias})")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
