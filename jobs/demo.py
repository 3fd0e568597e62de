"""The main job on embedded defaults: synthetic REACT data → features → stage 1 → stage 2 →
evaluation with baseline rows → MLflow registry → promotion → reactions for one test speaker.

Everything lives in the working directory (``.reactdiff/`` or ``$REACTDIFF_HOME``); Ray runs
in-process on 127.0.0.1 and MLflow uses ``sqlite:///.reactdiff/mlflow.db``.
"""

from __future__ import annotations

HELP = "run the whole pipeline end to end on embedded defaults (synthetic data, local Ray, sqlite MLflow)"


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default=None, help="working directory (default: $REACTDIFF_HOME or .reactdiff)")


def run(args) -> int:
    from pipeline import runtime

    ws = runtime.workspace(args.workdir)
    print(f"reactdiff demo: working directory {ws.root}")
    print("stages not built yet: synth, extract, train, evaluate, promote, generate")
    return 0


if __name__ == "__main__":
    import sys

    from jobs.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
