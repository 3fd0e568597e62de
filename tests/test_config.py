"""Typed configs: YAML + overrides, clear errors naming the key."""

from dataclasses import dataclass, field

import pytest

from pipeline.config import ConfigError, load, parse_overrides


@dataclass
class Inner:
    lr: float = 1e-4
    epochs: int = 2


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    splits: list[str] = field(default_factory=lambda: ["train"])
    device: str | None = None


def test_overrides_parse_nested_yaml_values():
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=true"]) == {"a": {"b": 3}, "c": [1, 2], "d": True}


def test_load_merges_file_overrides_and_explicit(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\ninner:\n  lr: 0.5\n")
    cfg = load(Outer, str(f), ["inner.epochs=7"], name="z", device=None)
    assert cfg == Outer(name="z", inner=Inner(lr=0.5, epochs=7))


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="inner.epoch"):
        load(Outer, None, ["inner.epoch=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="inner.epochs: expected an integer"):
        load(Outer, None, ["inner.epochs=many"])


def test_missing_file_lists_bundled_configs():
    with pytest.raises(ConfigError, match="not found"):
        load(Outer, "nope-does-not-exist")


def test_float_accepts_yaml_exponent_strings():
    assert load(Outer, None, ["inner.lr=1e-5"]).inner.lr == 1e-5
