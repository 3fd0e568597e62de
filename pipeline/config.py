"""Typed job configuration: YAML files + ``--set key=value`` overrides → dataclasses.

Configs are validated once, here, at the edge; inner code receives typed objects. An unknown
key or a value of the wrong type raises ``ConfigError`` naming the dotted key (the coercion is
``reactdiff.config``'s, shared with generator files).

Each option is declared once, on its dataclass field: ``option(default, "help", flag="--x")``.
``add_options`` turns the flagged fields into argparse options (and lists the others in the
epilog as ``--set`` keys); ``load_args`` reads them back. Precedence: dataclass default <
``--config`` YAML < ``--set`` < command-line options.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import UserError
from reactdiff import config as coercion
from reactdiff.config import merge, option  # noqa: F401  (re-exported: option is the field helper of every job config)

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"


class ConfigError(UserError, coercion.ConfigError):
    """A configuration file or override is invalid; the message names the key."""

    exit_code = 2
    kind = "configuration error"


def config_path(name_or_path: str) -> Path:
    """A config file path, or the name of a bundled one in jobs/configs (``demo`` → demo.yaml)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    # "jobs/configs/train.yaml" from any working directory (a job driver need not run in the checkout)
    repo_relative = CONFIG_DIR.parent.parent / p
    if p.parts[:2] == ("jobs", "configs") and repo_relative.exists():
        return repo_relative
    bundled = CONFIG_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if bundled.exists():
        return bundled
    raise ConfigError(f"config file not found: {name_or_path} (bundled configs: "
                      f"{', '.join(sorted(q.stem for q in CONFIG_DIR.glob('*.yaml')))})")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["a.b=3", "c=[1,2]"]`` → nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping (``reactdiff.config.from_dict``); unknown keys and
    wrong types raise :class:`ConfigError` naming the dotted key."""
    try:
        return coercion.from_dict(cls, data, prefix)
    except coercion.ConfigError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None


def load(cls: type[T], path: str | None = None, overrides: list[str] | None = None,
         **explicit: Any) -> T:
    """YAML file (optional) < ``--set`` overrides < explicit CLI options (non-None) → ``cls``."""
    data: dict[str, Any] = read_yaml(config_path(path)) if path else {}
    data = merge(data, parse_overrides(overrides))
    data = merge(data, {k: v for k, v in explicit.items() if v is not None})
    return from_dict(cls, data)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → ``{"a.b": v}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def add_config_arguments(parser, default: str | None = None) -> None:
    """The ``--config``/``--set`` pair every job accepts."""
    parser.add_argument("--config", default=default,
                        help=f"YAML config file or bundled name in jobs/configs (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (dotted), repeatable; the keys without an option are listed below")


# ---------------------------------------------------------------------------------------------
# Command-line options generated from the fields declared with ``option(..., flag="--x")``


def _fields(cls: type, prefix: tuple[str, ...] = ()):
    """(dotted path, field, type) of every leaf field of ``cls``, nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], (*prefix, f.name))
        else:
            yield (*prefix, f.name), f, hints[f.name]


def _non_optional(tp: Any) -> Any:
    """``int | None`` → ``int``: a command-line value is never null."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value: Any) -> Any:
    """A default as YAML would hold it (dataclasses as mappings, tuples as lists)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


class _ListOption(argparse.Action):
    """A list field: ``--dyads 8,4,4`` or ``--splits train val``; commas and spaces both separate."""

    def __init__(self, *args, convert=str, **kwargs):
        self.convert = convert
        super().__init__(*args, nargs="+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        for token in (t for v in values for t in str(v).split(",") if t):
            try:
                items.append(self.convert(token))
            except ValueError:
                parser.error(f"{option_string}: {token!r} is not a valid {self.convert.__name__}")
        setattr(namespace, self.dest, items)


class _MappingOption(argparse.Action):
    """A mapping field, one ``NAME=VALUE`` per (repeated) option."""

    def __call__(self, parser, namespace, value, option_string=None):
        name, sep, item = value.partition("=")
        if not sep or not name.strip() or not item.strip():
            parser.error(f"{option_string} {value!r} must look like {self.metavar}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), name.strip(): item.strip()})


def _argparse_kwargs(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    meta = f.metadata
    tp = _non_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    kwargs: dict[str, Any] = {"dest": f.name, "default": None}
    if tp is bool:
        kwargs["action"] = "store_true"
    elif tp in (int, float):
        kwargs["type"] = tp
    elif origin is typing.Literal:
        kwargs["choices"] = list(args)
    elif origin is list:
        kwargs.update(action=_ListOption, convert=args[0] if args else str)
    elif origin is dict:
        kwargs.update(action=_MappingOption, metavar="NAME=VALUE")
    kwargs.update(meta["cli"])
    default = _default(f)
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    text = meta["help"]
    if "default" not in text and not isinstance(default, (bool, dict)) and default not in (None, "", []):
        text += f" (default: {shown})"
    kwargs["help"] = text
    return kwargs


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """An argparse option for every field of ``cls`` declared with a ``flag``; the remaining
    fields are listed in the epilog as ``--set`` keys with their help and default."""
    groups: dict[str, Any] = {}
    settings = []
    for path, f, tp in _fields(cls):
        meta = f.metadata
        if not meta.get("flag"):
            value = yaml.safe_dump(_plain(_default(f)), default_flow_style=True, width=1000).strip().removesuffix("\n...")
            settings.append(f"  {'.'.join(path) + '=' + value:<32} {meta.get('help', '')}".rstrip())
            continue
        target = parser
        if meta["group"]:
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"],
                                                                    parser.add_argument_group(meta["group"]))
        target.add_argument(meta["flag"], **_argparse_kwargs(f, tp))
    if settings and parser.epilog is None:
        parser.epilog = "settings without an option (--set KEY=VALUE):\n" + "\n".join(settings)


def options_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values given on the command line for the flagged fields of ``cls``, as a nested dict."""
    out: dict[str, Any] = {}
    for path, f, _ in _fields(cls):
        if not f.metadata.get("flag"):
            continue
        value = getattr(args, f.metadata["cli"].get("dest", f.name), None)
        if value is not None:
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
    return out


def load_args(cls: type[T], args: argparse.Namespace, **explicit: Any) -> T:
    """``--config`` < ``--set`` < the command-line options of ``cls`` < ``explicit`` → ``cls``."""
    given = {k: v for k, v in explicit.items() if v is not None}
    return load(cls, args.config, args.overrides, **merge(options_from_args(cls, args), given))
