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
  reactdiff train --stage autoencoder --features s3://bucket/snapshots/<id> --storage s3://bucket/ckpt \\
      --set preset=paper --set scaling.use_gpu=true --num-workers 8
  ray job submit --working-dir . -- python -m jobs.train --stage diffusion --features s3://.../<id>
"""

from __future__ import annotations

import sys

HELP = "train stage 1 (autoencoder) or stage 2 (diffusion) on Ray Train with MLflow tracking"


def add_arguments(parser) -> None:
    from pipeline.config import add_config_arguments

    add_config_arguments(parser, default="train")
    parser.add_argument("--stage", choices=["autoencoder", "diffusion"],
                        help="autoencoder = stage 1 (MMT), diffusion = stage 2 (default from the config: autoencoder)")
    parser.add_argument("--features", metavar="SNAPSHOT",
                        help="feature snapshot: URI, id under <workdir>/snapshots, or 'latest'")
    parser.add_argument("--autoencoder", metavar="URI",
                        help="stage 2: stage-1 autoencoder.pt URI or MLflow run id (default: newest for the snapshot)")
    parser.add_argument("--name", help="run name; the same name resumes that run (default: derived)")
    parser.add_argument("--storage", dest="storage_path", metavar="URI",
                        help="checkpoint storage: local path or s3://bucket/prefix (default: <workdir>/checkpoints)")
    parser.add_argument("--preset", help="generator preset: small | paper (default: small)")
    parser.add_argument("--epochs", type=int, help="epochs of the chosen stage")
    parser.add_argument("--batch-size", dest="batch_size", type=int, help="per-worker batch size of the chosen stage")
    parser.add_argument("--num-workers", dest="num_workers", type=int, help="Ray Train workers")
    parser.add_argument("--gpu", dest="use_gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--ray-address", dest="ray_address",
                        help="Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray on 127.0.0.1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def config_from_args(args):
    """--config + --set + explicit options → TrainConfig (explicit options win)."""
    from pipeline import config
    from pipeline.train.job import TrainConfig

    explicit = {k: getattr(args, k) for k in ("stage", "features", "autoencoder", "name", "storage_path",
                                               "preset", "ray_address")}
    # Stage-specific CLI options land in the section of the stage being trained.
    stage = args.stage or config.load(TrainConfig, args.config, args.overrides).stage
    section = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    if section:
        explicit["stage1" if stage == "autoencoder" else "stage2"] = section
    scaling = {k: v for k, v in (("num_workers", args.num_workers), ("use_gpu", args.use_gpu)) if v is not None}
    if scaling:
        explicit["scaling"] = scaling
    return config.load(TrainConfig, args.config, args.overrides, **explicit)


def run(args) -> int:
    import json

    from pipeline.train.job import TrainError, train

    cfg = config_from_args(args)
    try:
        result = train(cfg)
    except TrainError as exc:
        print(f"reactdiff train: {exc}", file=sys.stderr)
        return 1
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
