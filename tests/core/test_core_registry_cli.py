"""Family registry and the CLI's assembly of pipeline verbs."""

import dataclasses

import pytest
import torch

from foundation import cli, registry
from foundation.errors import ConfigError, DataError


@dataclasses.dataclass
class _Cfg:
    width: int = 2


FAMILY = registry.Family(
    name="unit-test-family",
    model_config=_Cfg,
    build_model=lambda cfg, manifest: torch.nn.Linear(cfg.width, 1),
    loss=lambda model, batch: (model(batch["x"]).mean(), {}),
)


def test_register_and_get():
    registry.register(FAMILY)
    assert registry.get("unit-test-family") is FAMILY
    assert "unit-test-family" in registry.available()


def test_get_by_import_path():
    assert registry.get(f"{__name__}:FAMILY") is FAMILY


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model family 'nope'"):
        registry.get("nope")
    with pytest.raises(ConfigError, match="cannot load model family"):
        registry.get("no.such.module:FAMILY")
    with pytest.raises(ConfigError, match="not a foundation.registry.Family"):
        registry.get(f"{__name__}:_Cfg")


def _commands(run):
    noop = lambda parser: None  # noqa: E731
    return [
        cli.Command(("alpha",), "Alpha.", noop, run),
        cli.Command(("group", "beta"), "Beta.", noop, run),
    ]


def test_cli_runs_nested_verbs_and_prints_user_errors(monkeypatch, capsys):
    calls = []

    def run(args):
        calls.append(args)
        if args.verb == "alpha":
            raise DataError("shard 'train-000001.tar' is truncated")
        return 0

    monkeypatch.setattr(cli, "discover_commands", lambda: _commands(run))
    assert cli.main(["group", "beta"]) == 0
    assert cli.main(["alpha"]) == 2
    assert "error: shard 'train-000001.tar' is truncated" in capsys.readouterr().err
    assert cli.main(["group"]) == 2  # group without sub-verb: its help, exit 2
    assert "beta" in capsys.readouterr().err
    assert len(calls) == 2


def test_duplicate_commands_are_refused():
    commands = _commands(lambda args: 0)
    with pytest.raises(RuntimeError, match="two pipelines declare"):
        cli.build_parser(commands + commands[:1])


def test_real_cli_assembles():
    parser = cli.build_parser(cli.discover_commands())
    assert parser.parse_args(["config", "describe"]).verb == "config"
