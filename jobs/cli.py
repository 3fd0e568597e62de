"""The ``reactdiff`` console script: one subcommand per job.

Each command lives in its own module under ``jobs/`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. The same module runs as
``python -m jobs.<name>`` for ``ray job submit``.

Errors the user can fix (``pipeline.errors.UserError``: bad options, missing data, a busy
registry lock) are caught here, once: the message is printed without a traceback and the
command exits with the error's ``exit_code``. A module may widen that with ``USER_ERRORS``
(builtin exception types its library raises for bad inputs) and ``USER_ERROR_EXIT`` (one exit
status for all of them, e.g. extract keeps 1 for "too many clips quarantined").
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.errors import UserError
from reactdiff import __version__

# name -> module; order is the order of `reactdiff --help` (data flows top to bottom).
COMMANDS = {
    "demo": "jobs.demo",
    "synth": "jobs.synth",
    "inspect": "jobs.inspect",
    "extract": "jobs.extract",
    "train": "jobs.train",
    "evaluate": "jobs.evaluate",
    "promote": "jobs.promote",
    "generate": "jobs.generate",
}


def _load(name: str):
    try:
        return importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name == COMMANDS[name]:
            return None  # not built yet
        raise


# Every environment variable the jobs read (grep os.environ), shown by `reactdiff --help`.
ENVIRONMENT = """environment variables:
  REACTDIFF_HOME          working directory: data, snapshots, checkpoints, outputs, mlflow.db, logs
                          (default ./.reactdiff)
  MLFLOW_TRACKING_URI     MLflow server or store (default sqlite:///$REACTDIFF_HOME/mlflow.db)
  RAY_ADDRESS             attach to this Ray cluster instead of starting local Ray on 127.0.0.1
  RAY_AUTH_MODE           local Ray's authentication (default token, Ray's own default; a token
                          in ~/.ray/auth_token); set "disabled" to opt out
  AWS_ENDPOINT_URL[_S3]   S3-compatible endpoint (MinIO); credentials from the standard AWS chain
                          (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles)
  REACTDIFF_GIT_COMMIT    code version recorded in manifests and MLflow where no git checkout is
                          present (a container image)
  OMP_NUM_THREADS         torch threads per Ray task (default 1)

-v/--verbose (before or after the command) shows Ray's own logs on the console; without it they
are in $REACTDIFF_HOME/logs/ray."""


def _verbose_flag(parser: argparse.ArgumentParser, default=False) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging, with Ray's own logs on the console")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reactdiff",
        description="ReactDiff facial-reaction generation: data, training, evaluation and serving on Ray + MLflow.",
        epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"reactdiff-pipeline {__version__}")
    _verbose_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: `reactdiff -v train` keeps the top-level flag when the command has none.
        _verbose_flag(p, default=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


# Libraries whose INFO lines are their internals (schema migrations, executor plans): on the
# console only with -v. Their warnings and errors always show.
# mlflow resets its own logger's level when imported, so its chatty children are named too.
CHATTY = ("mlflow", "mlflow.store", "mlflow.system_metrics", "ray", "alembic", "urllib3", "botocore",
          "aiobotocore", "s3fs", "fsspec")


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def run_module(module, argv: list[str] | None = None) -> int:
    """Entry for ``python -m jobs.<name>``: parse that command's options and run it."""
    name = module.__spec__.name if module.__spec__ else module.__name__
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _verbose_flag(parser)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return _guarded(module, args)


def _guarded(module, args) -> int:
    command = (module.__spec__.name if module.__spec__ else module.__name__).rpartition(".")[2]
    try:
        return int(module.run(args) or 0)
    except (UserError, *getattr(module, "USER_ERRORS", ())) as exc:
        kind = getattr(exc, "kind", "")
        print(f"reactdiff {command}: {kind + ': ' if kind else ''}{exc}", file=sys.stderr)
        return getattr(module, "USER_ERROR_EXIT", None) or getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("reactdiff: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    configure_logging(args.verbose)
    return _guarded(args._module, args)


if __name__ == "__main__":
    sys.exit(main())
