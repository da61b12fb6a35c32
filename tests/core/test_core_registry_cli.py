"""Family registry and the CLI's assembly of pipeline verbs."""

import re
import subprocess
import sys

import pytest
import torch

from foundation import cli, registry
from foundation.errors import ConfigError, DataError
from tests.testkit import toyfamily


def test_register_and_get():
    registry.register(toyfamily.FAMILY)
    assert registry.get("toy") is toyfamily.FAMILY
    assert "toy" in registry.available()


def test_get_by_import_path():
    assert registry.get("tests.testkit.toyfamily:FAMILY") is toyfamily.FAMILY


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model family 'nope'"):
        registry.get("nope")
    with pytest.raises(ConfigError, match="cannot load model family"):
        registry.get("no.such.module:FAMILY")
    with pytest.raises(ConfigError, match="not a foundation.registry.Family"):
        registry.get("tests.testkit.toyfamily:ToyConfig")


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


@pytest.mark.parametrize("name", [":FAMILY", "..x:FAMILY", "a b:FAMILY", "tests:", "os:system()"])
def test_malformed_family_import_paths_are_config_errors(name):
    with pytest.raises(ConfigError, match="not of the form package.module:ATTRIBUTE"):
        registry.get(name)


def _numeric_commands(seen):
    def add(parser):
        parser.add_argument("--rows", type=int, default=10)
        parser.add_argument("--part", type=int, default=0)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--fraction", type=float, default=0.5)
        parser.add_argument("--device", default="auto")

    return [cli.Command(("numbers",), "Numbers.", add, lambda args: seen.append(args) or 0)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rows", "0"], r"argument --rows: must lie in \[1, 2147483647\], got 0"),
        (["--rows", "-5"], r"argument --rows: must lie in \[1, 2147483647\], got -5"),
        (["--rows", "99999999999"], r"argument --rows: must lie in \[1, 2147483647\]"),
        (["--rows", "1e3"], r"argument --rows: expected an integer, got '1e3'"),
        (["--part", "-1"], r"argument --part: must lie in \[0, 2147483647\], got -1"),
        (["--seed", "-1"], r"argument --seed: must lie in \[0, 9223372036854775807\], got -1"),
        (["--fraction", "nan"], r"argument --fraction: must be a finite number > 0, got nan"),
        (["--fraction", "inf"], r"argument --fraction: must be a finite number > 0, got inf"),
        (["--fraction", "0"], r"argument --fraction: must be a finite number > 0, got 0"),
        (["--device", "bogus"], r"argument --device: expected auto, cpu, cuda or cuda:N, got 'bogus'"),
        (["--nosuch"], r"unrecognized arguments: --nosuch"),
    ],
)
def test_command_line_mistakes_are_one_error_line(monkeypatch, capsys, argv, message):
    seen = []
    monkeypatch.setattr(cli, "discover_commands", lambda: _numeric_commands(seen))
    assert cli.main(["numbers", *argv]) == 2
    err = capsys.readouterr().err
    assert not seen
    assert err.count("\n") == 1 and err.startswith("error: foundation"), err
    assert re.search(message, err), err


def test_a_cuda_device_torch_cannot_see_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seen = []
    monkeypatch.setattr(cli, "discover_commands", lambda: _numeric_commands(seen))
    assert cli.main(["numbers", "--device", "cuda:0"]) == 0 and seen[0].device == "cuda:0"
    assert cli.main(["numbers", "--device", "cuda:7"]) == 2
    assert "cuda:7 does not exist: torch sees 1 CUDA device(s)" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["numbers", "--device", "cuda"]) == 2
    assert "torch sees no CUDA device; use cpu or auto" in capsys.readouterr().err


def test_valid_numbers_pass_through(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "discover_commands", lambda: _numeric_commands(seen))
    assert (
        cli.main(["numbers", "--rows", "3", "--part", "0", "--seed", str(2**40), "--fraction", "0.25"]) == 0
    )
    assert (seen[0].rows, seen[0].part, seen[0].seed, seen[0].fraction) == (3, 0, 2**40, 0.25)


def test_huge_bpe_vocabulary_is_refused_before_the_rust_trainer_aborts():
    # Run in a child: before the check, the tokenizers library aborted the whole process.
    code = (
        "from encoders.xval.tokenizer import TextTokenizer\n"
        "from foundation.errors import ConfigError\n"
        "try:\n"
        "    TextTokenizer.train(['a b c'] * 5, vocab_size=1_000_000_000)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vocabulary size (--vocab-size) must lie in [1, 1048576], got 1000000000" in result.stdout


def test_split_fractions_option_is_parsed_and_checked_once_for_every_prepare():
    import argparse

    from foundation.cli import add_split_fractions_argument

    parser = argparse.ArgumentParser()
    add_split_fractions_argument(parser, "train=0.9,valid=0.1", "Fractions.")
    assert parser.parse_args([]).split_fractions == {"train": 0.9, "valid": 0.1}
    assert parser.parse_args(["--splits", "train=1"]).split_fractions == {"train": 1.0}
    for bad in ("train=0.5", "train", "=1", "train=x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--split-fractions", bad])


@pytest.mark.slow
def test_foundation_imports_no_pipeline_or_family_module():
    # foundation/ is the library under pipelines/ and encoders/: importing any of its modules, the CLI
    # included, must not pull either in (verbs and families arrive through entry points when used).
    from pathlib import Path

    root = Path(cli.__file__).resolve().parents[1]
    modules = sorted(
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for path in (root / "foundation").rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('pipelines', 'encoders'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "foundation.cli" in modules and result.stdout.split() == []


def test_every_pipeline_module_with_commands_is_registered():
    # A module whose COMMANDS are missing from the entry-point group would silently lose its verbs.
    import ast
    from importlib.metadata import entry_points
    from pathlib import Path

    folder = Path(cli.__file__).resolve().parents[1] / "pipelines"
    declaring = {
        f"pipelines.{path.stem}:COMMANDS"
        for path in folder.glob("*.py")
        if any(
            isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets)
            for node in ast.parse(path.read_text()).body
        )
    }
    registered = {entry.value for entry in entry_points(group=cli.COMMANDS_GROUP)}
    assert declaring and declaring == registered
    paths = [" ".join(command.path) for command in cli.discover_commands()]
    assert len(paths) == len(set(paths)) and {"export", "search build", "demo"} <= set(paths)


def test_cli_runs_as_a_module():
    # The demo and torchrun start `python -m foundation.cli`: there the file is __main__, and the
    # registered verbs must still be recognised as its Commands.
    result = subprocess.run(
        [sys.executable, "-m", "foundation.cli", "config", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Show configuration keys" in result.stdout


def test_an_install_without_registered_commands_says_how_to_fix_it(monkeypatch, capsys):
    from foundation import cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    assert cli.main(["shards", "--help"]) == 2
    assert "re-run `pip install -e .`" in capsys.readouterr().err
