"""Config machinery: YAML + dotted overrides → validated dataclass trees with clear errors."""

import dataclasses
from typing import Literal

import pytest

from foundation import config
from foundation.config import ConfigError, option


@dataclasses.dataclass
class Inner:
    width: int = option(8, "Width.")
    rate: float = option(1e-3, "Rate.")
    kind: Literal["a", "b"] = option("a", "Kind.")

    def __post_init__(self):
        if self.width <= 0:
            raise ValueError(f"width must be positive, got {self.width}")


@dataclasses.dataclass
class Outer:
    name: str = option(doc="Required name.")
    inner: Inner = option(doc="Inner section.", factory=Inner)
    sizes: list[int] = option(doc="Sizes.", factory=lambda: [1, 2])
    pair: tuple[float, float] = option((0.9, 0.95), "A pair.")
    maybe: int | None = option(None, "Optional.")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  width: 4\n  rate: 3e-4\n")  # YAML 1.1 reads 3e-4 as a string
    cfg = config.load(Outer, path, ["inner.kind=b", "sizes=[3, 4]", "maybe=7", "pair=[0.1, 0.2]"])
    assert cfg.inner == Inner(width=4, rate=3e-4, kind="b")
    assert cfg.sizes == [3, 4] and cfg.maybe == 7 and cfg.pair == (0.1, 0.2)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.widht'; did you mean 'width'"):
        config.from_dict(Outer, {"name": "x", "inner": {"widht": 3}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "inner": {"width": "wide"}}, "inner.width: expected an integer"),
        ({"name": "x", "inner": {"width": 2.5}}, "inner.width: expected an integer"),
        ({"name": "x", "inner": {"kind": "c"}}, "inner.kind: 'c' is not one of 'a', 'b'"),
        ({"name": "x", "inner": {"width": -1}}, "width must be positive"),
        ({"name": "x", "pair": [1.0]}, "pair: expected 2 items"),
        ({"name": "x", "inner": 3}, "inner: expected a section"),
        ({}, "missing required key.*'name'"),
    ],
)
def test_invalid_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict(Outer, data)


def test_bad_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        config.load(Outer, None, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(Outer, bad)


def test_round_trip_save_and_hash(tmp_path):
    cfg = config.from_dict(Outer, {"name": "x", "inner": {"width": 5}})
    config.save(cfg, tmp_path / "resolved.yaml")
    again = config.load(Outer, tmp_path / "resolved.yaml")
    assert again == cfg
    assert config.config_hash(again) == config.config_hash(cfg)
    assert config.config_hash(config.from_dict(Outer, {"name": "y"})) != config.config_hash(cfg)


def test_describe_lists_every_key_with_doc():
    lines = config.describe(Outer)
    assert "inner.width (int, 8): Width." in lines
    assert any(line.startswith("name (str, required): Required name.") for line in lines)
