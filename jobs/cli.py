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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reactdiff",
        description="ReactDiff facial-reaction generation: data, training, evaluation and serving on Ray + MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"reactdiff-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_module(module, argv: list[str] | None = None) -> int:
    """Entry for ``python -m jobs.<name>``: parse that command's options and run it."""
    name = module.__spec__.name if module.__spec__ else module.__name__
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
