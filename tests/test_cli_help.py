"""Every example a `--help` prints is a command that parses and whose config loads.

The examples are read out of the help text itself (the lines under "Examples:" and the
``--set`` keys listed at the end), so a renamed option or key fails here, not for a user.
Placeholders (``<id>``, ``...``) are filled with harmless values; nothing runs: the dry-run
forms of extract, train and promote are run in tests/train/test_dry_run.py.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from jobs import cli
from pipeline import config

# The config class each command builds from its options (train adds --epochs/--batch-size).
CONFIGS = {"demo": "DemoConfig", "synth": "synth.SynthConfig", "inspect": "InspectConfig",
           "extract": "ExtractConfig", "evaluate": "EvaluateConfig", "promote": "PromoteConfig",
           "generate": "GenerateConfig"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **sub.choices}


def _examples(help_text: str) -> list[str]:
    """The command lines under an "Examples:" heading, continuation lines joined."""
    out, block, pending = [], False, ""
    for line in help_text.splitlines():
        if re.match(r"^\s*examples:\s*$", line, re.I):
            block = True
            continue
        if block and not line.strip():
            block = False
            continue
        if not block:
            continue
        text = pending + " " + line.split("  #")[0].strip() if pending else line.split("  #")[0].strip()
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        out.append(text)
    return out


def _argv(example: str) -> list[str]:
    """`reactdiff CMD ...` or `ray job submit ... -- python -m jobs.CMD ...` -> [CMD, ...]."""
    example = example.replace("<id>", "latest").replace("<snapshot>", "latest")
    tokens = [t for t in shlex.split(example) if t not in ("...", "…")]
    if tokens[:3] == ["ray", "job", "submit"]:
        tokens = tokens[tokens.index("--") + 1:]
        assert tokens[:2] == ["python", "-m"], example
        return [tokens[2].removeprefix("jobs."), *tokens[3:]]
    assert tokens[0] == "reactdiff", example
    return tokens[1:]


def _load_config(command: str, args: argparse.Namespace):
    module = args._module
    if command == "train":
        return module.config_from_args(args)
    owner, _, name = CONFIGS[command].rpartition(".")
    cls = getattr(getattr(module, owner) if owner else module, name)
    return config.load_args(cls, args)


EXAMPLES = [(name, ex) for name, p in _subparsers().items() for ex in _examples(p.format_help())]


def test_every_command_prints_examples():
    documented = {name for name, _ in EXAMPLES}
    assert documented >= {"synth", "inspect", "extract", "train", "evaluate", "promote", "generate"}
    assert any("--dry-run" in ex for name, ex in EXAMPLES if name == "train")


@pytest.mark.parametrize("command,example", EXAMPLES, ids=[f"{n}: {e[:60]}" for n, e in EXAMPLES])
def test_each_help_example_parses_and_its_config_loads(command, example, workdir):
    argv = _argv(example)
    assert argv[0] == command, f"`reactdiff {command} --help` shows an example of another command: {example}"
    args = cli.build_parser().parse_args(argv)          # SystemExit(2) on an unknown option
    _load_config(command, args)                          # ConfigError on an unknown --set key


# "  key=value   help" lines of the epilog add_options writes; a value may be a YAML flow list/map.
SETTING = re.compile(r"^  ([\w.]+=(?:\[.*?\]|\{.*?\}|\S+))(?=\s|$)")
# The options without which a command's config does not validate.
REQUIRED = {"extract": ["--data", "react"], "evaluate": ["--model", "models:/reactdiff/1"],
            "generate": ["--split", "val"]}
SETTINGS = [(name, m.group(1)) for name, p in _subparsers().items() if name and p.epilog
            for m in map(SETTING.match, p.epilog.splitlines()[1:]) if m]


@pytest.mark.parametrize("command,setting", SETTINGS, ids=[f"{n}: {s}" for n, s in SETTINGS])
def test_each_listed_set_key_is_accepted_with_its_default(command, setting, workdir):
    args = cli.build_parser().parse_args([command, *REQUIRED.get(command, []), "--set", setting])
    _load_config(command, args)


def test_verbose_before_or_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "train"]).verbose
    assert parser.parse_args(["train", "-v"]).verbose
    assert parser.parse_args(["extract", "--verbose"]).verbose
    assert not parser.parse_args(["train"]).verbose


def test_top_level_help_lists_every_environment_variable_the_code_reads():
    """Each os.environ key read under pipeline/ and jobs/ (a Ray/MLflow setting the runtime
    exports for local Ray is written, not read) appears in `reactdiff --help`."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    read = set()
    for path in [*root.glob("pipeline/**/*.py"), *root.glob("jobs/*.py")]:
        read |= set(re.findall(r"os\.environ(?:\.get\(|\[)\s*\"([A-Z0-9_]+)\"", path.read_text()))
    text = cli.build_parser().format_help()
    missing = sorted(k for k in read if k not in text and k.removesuffix("_S3") not in text)
    assert not missing, f"not in `reactdiff --help`: {missing}"
