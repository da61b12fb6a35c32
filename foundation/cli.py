"""`foundation <verb> [<sub-verb>] ...`: the one command-line entry point.

Each module in `pipelines/` declares its verbs in a module-level `COMMANDS` list of `Command`s and
registers that list in the `foundation.commands` entry-point group (pyproject.toml), as families
register in `foundation.families`: this file never imports `pipelines`, it only assembles what the
group names into argparse. Pipeline modules keep their heavy imports (torch, h5py, faiss) inside
their `run` functions so that `foundation --help` stays fast.
Errors derived from `FoundationError` are printed as one line, without a traceback, and so are
command-line mistakes. Every numeric option is checked as it is parsed: integers are counts
(>= 1; >= 0 for the names in `ZERO_ALLOWED_OPTIONS`, and seeds) below `MAX_COUNT`, and floats
are finite and positive, so that no verb starts work with a count of 0, -1 or 10**12; `--device`
must name a device that exists.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from foundation import __version__
from foundation.allocator import tune_allocator
from foundation.errors import FoundationError

#: One-line descriptions of verbs that only group sub-verbs.
GROUPS = {
    "shards": "Inspect and verify shard sets.",
    "synth": "Write built-in data sets in their native formats.",
    "prepare": "Convert native data files into shards.",
    "evaluate": "Evaluate checkpoints and embeddings.",
    "search": "Build and query vector indexes over exported embeddings.",
    "runs": "Inspect training runs.",
    "config": "Show configuration keys and their meaning.",
    "convert": "Convert released checkpoints into model directories.",
}


#: The entry-point group through which pipeline modules register their `COMMANDS`.
COMMANDS_GROUP = "foundation.commands"

#: Integer options for which 0 is meaningful (an index, "none", "no minimum").
ZERO_ALLOWED_OPTIONS = frozenset({"part", "num_workers", "exact_max", "min_field_count"})
#: Largest count an integer option takes (seeds excepted): beyond it no run fits any machine.
MAX_COUNT = 2**31 - 1
#: Largest seed: what numpy and torch accept.
MAX_SEED = 2**63 - 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a command-line mistake in one `error: ...` line (exit 2), like other errors."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


@dataclass(frozen=True)
class Command:
    """One CLI verb: `path` is ("pretrain",) or ("synth", "mpp")."""

    path: tuple[str, ...]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """The `--progress auto|on|off` option of every long-running verb."""
    parser.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="Progress bar (auto: only when stderr is a terminal, not in batch-job logs).",
    )


def progress_enabled(flag: str) -> bool:
    """Whether `--progress FLAG` means a progress bar here."""
    return flag == "on" or (flag == "auto" and sys.stderr.isatty())


def discover_commands() -> list[Command]:
    """Every `Command` registered in the `foundation.commands` entry-point group."""
    commands: list[Command] = []
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        listed = entry.load()
        if not all(isinstance(c, Command) for c in listed):
            raise TypeError(f"entry point {entry.value} must be a list of foundation.cli.Command")
        commands.extend(listed)
    if not commands:
        raise FoundationError(
            f"no command is registered in the {COMMANDS_GROUP!r} entry-point group: re-run "
            "`pip install -e .` (a stale foundation.egg-info in the current folder hides the install)"
        )
    return commands


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type` for an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}], got {text[:40]}")
        return value

    parse.__name__ = "integer"
    return parse


def positive_float(text: str) -> float:
    """An argparse `type` for a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text[:40]}")
    return value


positive_float.__name__ = "number"


def split_fractions(text: str) -> dict[str, float]:
    """An argparse `type` for split fractions written `train=0.8,valid=0.1,test=0.1`."""
    from foundation.data.writer import check_split_fractions

    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"{item[:40]!r} is not NAME=FRACTION (e.g. train=0.8,valid=0.1,test=0.1)"
            )
        out[name.strip()] = fraction
    try:
        return check_split_fractions(out)
    except FoundationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


split_fractions.__name__ = "split fractions"


def add_split_fractions_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str, help: str
) -> None:
    """The `--split-fractions` option of every `prepare` (`--splits` kept as its older spelling)."""
    parser.add_argument(
        "--split-fractions",
        "--splits",
        dest="split_fractions",
        type=split_fractions,
        default=split_fractions(default),
        help=f"{help} Written NAME=FRACTION,... summing to 1 (default: {default}).",
    )


def add_shard_output_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    split_default: str,
    split_help: str,
    samples_per_shard: int,
    seed_help: str,
) -> None:
    """The shard-set output options every `prepare` shares: split fractions, shard size, the seed,
    --overwrite and --allow-degenerate."""
    add_split_fractions_argument(parser, split_default, split_help)
    parser.add_argument("--samples-per-shard", type=int, default=samples_per_shard)
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing shard set at --out.")
    parser.add_argument(
        "--allow-degenerate",
        action="store_true",
        help="Write fields that come out all zeros, all masked, constant or mostly non-finite "
        "(docs/shards.md).",
    )


MAX_WORKERS = 256
"""More processes than any node has cores: a typo, not a plan (oversubscribing a few is allowed,
so a command line gives the same shards on every machine)."""


def add_workers_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `--workers N` option of every `prepare`: N processes read and transform the inputs; the
    shard set written is the same for every N."""
    parser.add_argument(
        "--workers",
        type=bounded_int(1, MAX_WORKERS),
        default=1,
        help=f"Processes that read and transform the inputs (this machine has {os.cpu_count() or 1} "
        "CPUs); the shards are the same for every value (default: 1).",
    )


def part_option(text: str) -> tuple[int, int]:
    """An argparse `type` for `--part I/N`: (I, N) with 0 <= I < N."""
    index, slash, count = text.partition("/")
    try:
        index_value, count_value = int(index), int(count)
    except ValueError:
        index_value = count_value = -1
    if not slash or count_value < 1 or not 0 <= index_value < count_value:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return index_value, count_value


def add_part_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `--part I/N` option of `prepare`: write only part I of N of the input files (one task of
    a SLURM array; `foundation shards merge` joins the N parts into the set one run writes)."""
    parser.add_argument(
        "--part",
        type=part_option,
        default=None,
        metavar="I/N",
        help="Prepare only part I of N of the input files (sorted by path, file i to part i mod N), "
        "for `foundation shards merge` to join (default: all files).",
    )


def device_option(text: str) -> str:
    """An argparse `type` for `--device`: auto, cpu, cuda or cuda:N, where that device exists."""
    from foundation.device import check_device_name

    problem = check_device_name(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def guard_options(parser: argparse.ArgumentParser) -> None:
    """Give every plain `int`/`float` option of `parser` the range checks of the module docstring,
    and every `--device` option a check that the device exists."""
    for action in parser._actions:
        if action.dest == "device" and action.type is None and action.choices is None:
            action.type = device_option
        elif action.type is int:
            if action.dest == "seed" or action.dest.endswith("_seed"):
                action.type = bounded_int(0, MAX_SEED)
            else:
                action.type = bounded_int(0 if action.dest in ZERO_ALLOWED_OPTIONS else 1, MAX_COUNT)
        elif action.type is float:
            action.type = positive_float


def build_parser(commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="foundation",
        description="Pretrain, export and evaluate scientific foundation models (xVal, AstroCLIP, MPP).",
    )
    parser.add_argument("--version", action="version", version=f"foundation {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging and full tracebacks.")
    subparsers = {(): parser.add_subparsers(dest="verb", metavar="VERB")}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for command in sorted(commands, key=lambda c: c.path):
        for depth in range(1, len(command.path)):
            prefix = command.path[:depth]
            if prefix not in parsers:
                group = subparsers[prefix[:-1]].add_parser(
                    prefix[-1], help=GROUPS.get(prefix[-1], ""), description=GROUPS.get(prefix[-1])
                )
                group.set_defaults(_help_parser=group)
                parsers[prefix] = group
                subparsers[prefix] = group.add_subparsers(dest="_".join(prefix), metavar="SUBVERB")
            elif prefix not in subparsers:  # a verb that also has sub-verbs: `export` and `export merge`
                subparsers[prefix] = parsers[prefix].add_subparsers(dest="_".join(prefix), metavar="SUBVERB")
        if command.path in parsers:
            raise RuntimeError(f"two pipelines declare the command {' '.join(command.path)!r}")
        sub = subparsers[command.path[:-1]].add_parser(
            command.path[-1], help=command.help, description=command.help
        )
        command.add_arguments(sub)
        guard_options(sub)
        sub.set_defaults(_run=command.run)
        parsers[command.path] = sub
    return parser


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, and what to do."""
    hints = {
        errno.ENOSPC: "the disk is full; free space or write elsewhere",
        errno.EDQUOT: "the disk quota is exceeded; free space or write elsewhere",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.EACCES: "permission denied; check the path's owner and mode",
        errno.EPERM: "operation not permitted; check the path's owner and mode",
    }
    where = " ".join(repr(str(name)) for name in (exc.filename, exc.filename2) if name is not None)
    what = exc.strerror or str(exc)
    hint = hints.get(exc.errno or 0)
    return f"{what}{' (' + where + ')' if where else ''}" + (f": {hint}" if hint else "")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser(discover_commands())
    except FoundationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    run = getattr(args, "_run", None)
    if run is None:
        # No verb, or a group verb without its sub-verb: show the relevant help.
        getattr(args, "_help_parser", parser).print_help(sys.stderr)
        return 2
    tune_allocator()
    try:
        code = run(args)
    except FoundationError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The environment, not a bug: a full or read-only disk, a permission, a vanished file.
        if args.verbose:
            raise
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    # `python -m foundation.cli`: run the imported module's main, whose `Command` is the class the
    # pipeline modules build their COMMANDS from (this file as __main__ holds a second one).
    from foundation import cli

    sys.exit(cli.main())
