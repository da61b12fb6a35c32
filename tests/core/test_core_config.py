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


# ----------------------------------------------------------------------------- ranges and hostile files


@dataclasses.dataclass
class Bounded:
    count: int = option(1, "A count.", ge=1, le=100)
    rate: float = option(0.5, "A rate.", gt=0)
    pair: tuple[float, float] = option((0.1, 0.2), "Two fractions.", ge=0, lt=1)
    seed: int = option(0, "Any 64-bit integer.")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"count": 0}, r"count must lie in \[1, 100\], got 0"),
        ({"count": 10**6}, r"count must lie in \[1, 100\], got 1000000"),
        ({"count": float("inf")}, r"count: expected an integer, got inf"),
        ({"count": float("nan")}, r"count: expected an integer, got nan"),
        ({"count": "1e999"}, r"count: expected an integer"),
        ({"rate": float("nan")}, r"rate must be a finite number, got nan"),
        ({"rate": "-inf"}, r"rate must be a finite number"),
        ({"rate": "1e999"}, r"rate must be a finite number"),
        ({"rate": -1}, r"rate must be > 0, got -1"),
        ({"pair": [0.5, 1.0]}, r"pair must lie in \[0, 1\), got 1\.0"),
        ({"seed": 2**64}, r"seed must be within \+-\(2\*\*63 - 1\)"),
        ({"seed": 2**2000}, r"got a 2001-bit integer"),
    ],
)
def test_numbers_are_range_checked_with_key_value_and_range(data, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict(Bounded, data)


def test_describe_shows_the_allowed_range():
    assert "count (int, 1, must lie in [1, 100]): A count." in config.describe(Bounded)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=.nan", r"optim\.lr must be a finite number, got nan"),
        ("optim.lr=-1", r"optim\.lr must be > 0, got -1"),
        ("train.steps=.inf", r"train\.steps: expected an integer, got inf"),
        ("train.steps=1e999", r"train\.steps: expected an integer"),
        ("train.steps=" + "9" * 30, r"train\.steps must be within \+-\(2\*\*63 - 1\)"),
        ("train.steps=" + "9" * 5000, r"train\.steps: expected an integer, got '9999"),
        ("data.batch_size=1000000000000", r"data\.batch_size must lie in \[1, 1048576\]"),
        ("data.num_workers=-1", r"data\.num_workers must lie in \[0, 256\], got -1"),
        ("run.seed=-1", r"run\.seed must lie in \[0, 2\*\*63 - 1\], got -1"),
        ("train.grad_clip=.inf", r"train\.grad_clip must be a finite number"),
        ("train.stop_file=../x", r"train\.stop_file must be a plain file name"),
        ("model.mlp_ratio=1e9", r"model\.mlp_ratio must lie in \(0, 64\], got 1000000000\.0"),
        ("model.d_model=1000000000", r"model\.d_model must lie in \[1, 65536\]"),
        ("model.n_heads=0", r"model\.n_heads must lie in \[1, 1024\], got 0"),
        ("a..b=1", r"the key 'a\.\.b' has an empty part"),
        ("model=false", r"model: expected a section \(mapping\), got False"),
        ('run.dir="a\\0b"', r"run\.dir: 'a\\x00b' contains a NUL character"),
    ],
)
def test_pretrain_config_refuses_non_finite_negative_and_huge_values(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("family: xval\ndata:\n  path: shards\n")
    with pytest.raises(ConfigError, match=message):
        config.load_pretrain_config(path, [override])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "is not UTF-8 text"),
        (b"- a\n- b\n", "must hold a mapping .* not a list"),
        (b"42\n", "must hold a mapping .* not a int"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"a: " + b"1" * 5000 + b"\n", "holds a value Python cannot read"),
        (b"name: x\n" + b"# padding\n" * 200_000, r"more than a config's limit"),
        (b"name: [unclosed\n  - x", "is not valid YAML: .*line"),
    ],
)
def test_files_that_are_not_configs_get_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        config.load(Outer, path)
    assert "\n" not in str(info.value)


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist .*or is not a file"):
        config.load(Outer, tmp_path)


@pytest.mark.slow
def test_deeply_nested_override_value_is_refused_not_a_recursion_error():
    with pytest.raises(ConfigError, match=r"sizes: expected a list, got '\[\[\["):
        config.load(Outer, None, ["name=x", "sizes=" + "[" * 100_000])


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    """YAML keeps the last of two equal keys: a second `train:` section dropped the first's settings."""
    path = tmp_path / "twice.yaml"
    path.write_text("family: xval\ntrain:\n  steps: 50\n  log_every: 10\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="twice.yaml.*the key 'train' twice"):
        config.read_yaml(path)
    merged = config.parse_yaml("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n", "merge keys")
    assert merged["b"] == {"x": 1, "y": 3}  # overriding a merged key is what << is for
