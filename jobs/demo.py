"""The main job on embedded defaults: synthetic REACT data → features → stage 1 → stage 2 →
evaluation with baseline rows → MLflow registry → promotion → reactions for one test speaker.

Everything lives in the working directory (``.reactdiff/`` or ``$REACTDIFF_HOME``); Ray runs
in-process on 127.0.0.1 and MLflow uses ``sqlite:///.reactdiff/mlflow.db``.
"""

from __future__ import annotations

import sys

from pipeline import config
from pipeline.demo import DemoConfig, run_demo, verdict

HELP = "run the whole pipeline end to end on embedded defaults (synthetic data, local Ray, sqlite MLflow)"


def add_arguments(parser) -> None:
    config.add_config_arguments(parser, default="demo")
    config.add_options(parser, DemoConfig)


def run(args) -> int:
    cfg = config.load_args(DemoConfig, args)
    summary = run_demo(cfg)
    print("\n== reactdiff demo: done in {total_s:.0f} s".format(**summary))
    for line in verdict(summary["metrics"], summary["baselines"]):
        print("   " + line)
    print(f"   per step (s): {summary['timings_s']}")
    print(f"   model:   {summary['model']} (alias champion after promotion)")
    out = summary["outputs"]
    print(f"   reactions: {out['folder']}")
    for kind in ("plot", "video", "summary"):
        for path in out["files"].get(kind, []):
            print(f"     {kind:8s} {path}")
    print(f"     + {len(out['files'].get('attributes', []))} attribute csv and 3DMM npy files, one per sample")
    print(f"   look at runs and models: {summary['mlflow_ui']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
