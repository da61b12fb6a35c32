"""Fuzz harness: run `foundation.cli.main(argv)` on mutated inputs in forked, bounded children.

The test process imports everything once (torch, h5py, faiss, every pipeline module); each case
then forks, so a case costs milliseconds instead of a torch import. The parent never runs a torch
operation itself (fixtures that need one are built by a child too), so forking stays safe.

Each child runs in its own process group with its stdout discarded and its stderr captured to a
file. The parent polls it: past `timeout_s` it is a hang, past `rss_limit` bytes of resident
memory (the child and its own children together) a memory bomb; either way the group is killed.
RLIMIT_AS is not used because torch reserves far more address space than it touches.

An outcome is `ok` (exit 0), `clean` (exit 2 and exactly one `error: ...` line, no traceback),
`documented` (a verb's documented non-zero exit, e.g. `shards verify` exit 1, no traceback),
or `failure` with the reason.

Mutators take a `random.Random` and return a short description of what they changed, so that a
failing case names its verb, input, mutation and seed and can be replayed alone.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Documented non-zero exit codes of verbs (besides 2), e.g. `shards verify` reports problems with 1.
DOCUMENTED_EXITS: dict[str, frozenset[int]] = {
    "shards verify": frozenset({1}),
    "pretrain": frozenset({3, 75}),
}


# ----------------------------------------------------------------------------- running one case


@dataclass
class Case:
    """One fuzz case: `argv` run in `workdir`, after `prepare(rng)` mutated the inputs there."""

    verb: str
    argv: list[str]
    workdir: Path
    input: str
    seed: int
    prepare: Callable[[random.Random], str] | None = None
    mutation: str = ""


@dataclass
class Outcome:
    case: Case
    kind: str  # ok | clean | documented | failure
    reason: str
    exit_code: int | None
    stderr: str
    peak_rss: int
    seconds: float

    def report(self, tail: int = 6) -> str:
        """A few lines that identify the case and show how it ended."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        shown = "\n      ".join(line[:300] for line in lines[-tail:]) or "(no stderr)"
        return (
            f"[{self.case.verb}] {self.reason}; seed {self.case.seed}; input {self.case.input}; "
            f"mutation: {self.case.mutation}\n    argv: foundation {' '.join(self.case.argv)}\n"
            f"    workdir: {self.case.workdir}\n    stderr tail:\n      {shown}"
        )


def _rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and of its direct children (loader workers), in bytes."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return total


def current_rss() -> int:
    return _rss_bytes(os.getpid())


def _child(argv: Sequence[str], workdir: Path, stderr_path: Path) -> None:
    """In the forked child: redirect output, run the CLI, exit with its code. Never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(err, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        root = logging.getLogger()
        for handler in list(root.handlers):  # pytest's capture handlers: send logs to stderr instead
            root.removeHandler(handler)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(workdir)
        from foundation import cli

        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child reports whatever escaped, as a traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(int(code) & 0xFF)


@dataclass
class _Running:
    case: Case
    pid: int
    started: float
    stderr_path: Path
    peak: int = 0


def _finish(run: _Running, status: int | None, reason: str | None) -> Outcome:
    try:
        os.killpg(run.pid, signal.SIGKILL)  # stray grandchildren (loader workers) go too
    except (ProcessLookupError, PermissionError):
        pass
    stderr = run.stderr_path.read_text(errors="replace") if run.stderr_path.exists() else ""
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    kind, why = classify(run.case.verb, code, stderr) if reason is None else ("failure", reason)
    return Outcome(run.case, kind, why, code, stderr, run.peak, time.monotonic() - run.started)


def classify(verb: str, code: int | None, stderr: str) -> tuple[str, str]:
    """(kind, reason) of a finished child from its exit code and stderr."""
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    if "Traceback (most recent call last)" in stderr:
        return "failure", f"traceback (exit {code})"
    if code is not None and code < 0:
        return "failure", f"killed by signal {-code}"
    if code == 0:
        return "ok", "exit 0"
    if code == 2:
        if len(error_lines) == 1:
            return "clean", "exit 2"
        return "failure", f"exit 2 with {len(error_lines)} 'error:' lines"
    if code in DOCUMENTED_EXITS.get(verb, ()):
        return "documented", f"exit {code}"
    return "failure", f"exit {code}"


def run_cases(
    cases: Sequence[Case],
    *,
    jobs: int = 2,
    timeout_s: float = 20.0,
    rss_limit: int,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run `cases`, `jobs` at a time, each in a forked child bounded in time and memory."""
    pending = list(cases)[::-1]
    running: list[_Running] = []
    outcomes: list[Outcome] = []
    while pending or running:
        while pending and len(running) < jobs:
            case = pending.pop()
            running.append(_start(case))
        time.sleep(0.01)
        for run in list(running):
            pid, status = os.waitpid(run.pid, os.WNOHANG)
            if pid:
                outcome = _finish(run, status, None)
            else:
                run.peak = max(run.peak, _rss_bytes(run.pid))
                elapsed = time.monotonic() - run.started
                if run.peak > rss_limit:
                    reason = f"memory: RSS {run.peak >> 20} MiB > {rss_limit >> 20} MiB"
                elif elapsed > timeout_s:
                    reason = f"hang: still running after {timeout_s:.0f} s"
                else:
                    continue
                os.killpg(run.pid, signal.SIGKILL)
                _, status = os.waitpid(run.pid, 0)
                outcome = _finish(run, None, reason)
            running.remove(run)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes


def _start(case: Case) -> _Running:
    case.workdir.mkdir(parents=True, exist_ok=True)
    if case.prepare is not None:
        case.mutation = case.prepare(random.Random(case.seed))
    stderr_path = case.workdir / "stderr.txt"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(case.argv, case.workdir, stderr_path)
    return _Running(case, pid, time.monotonic(), stderr_path)


def run_one(argv: Sequence[str], workdir: Path, *, timeout_s: float = 120.0, rss_limit: int) -> Outcome:
    """Run one command (fixture building) the same way; the caller checks `kind == 'ok'`."""
    return run_cases(
        [Case("fixture", list(argv), workdir, "-", 0)], jobs=1, timeout_s=timeout_s, rss_limit=rss_limit
    )[0]


# ----------------------------------------------------------------------------- value mutations

INTERESTING_NUMBERS: list[Any] = [
    0,
    -1,
    1,
    -(2**31),
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    10**30,
    1e308,
    -1e308,
    1e-308,
    0.5,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
]
INTERESTING_VALUES: list[Any] = [
    *INTERESTING_NUMBERS,
    None,
    True,
    False,
    "",
    " ",
    "x" * 5000,
    "../../../etc/passwd",
    "/abs/path",
    "a b",
    "\x00",
    "1e999",
    "nan",
    [],
    {},
    [1, 2, 3],
    {"a": 1},
    [[[[[]]]]],
    "é漢字",
]


def interesting_value(rng: random.Random) -> Any:
    return rng.choice(INTERESTING_VALUES)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts/lists (the root excluded)."""
    out = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return out
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def mutate_tree(
    tree: Any, rng: random.Random, frozen: Sequence[tuple] = (), keep_keys_under: Sequence[tuple] = ()
) -> str:
    """Change, delete or add one value somewhere in a parsed JSON/YAML tree, in place.

    Paths in `frozen` are never touched, keys under a path in `keep_keys_under` never deleted
    (so that a mutated config still describes a small, fast run).
    """
    paths = [p for p in _paths(tree) if p not in frozen]
    if not paths:
        return "empty tree left as is"
    path = rng.choice(paths)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    where = ".".join(map(str, path))
    action = rng.random()
    deletable = not any(path[: len(prefix)] == prefix for prefix in keep_keys_under)
    if action < 0.12 and isinstance(parent, dict) and deletable:
        del parent[key]
        return f"deleted {where}"
    if action < 0.2 and isinstance(parent, dict):
        parent[f"{key}_unknown"] = 1
        return f"added unknown key beside {where}"
    if action < 0.26:
        parent[key] = deep_list(rng.choice([200, 5000, 100_000]))
        return f"{where} = a deeply nested list"
    value = interesting_value(rng)
    if isinstance(parent[key], int | float) and not isinstance(parent[key], bool) and rng.random() < 0.5:
        value = rng.choice(INTERESTING_NUMBERS)
    parent[key] = value
    return f"{where} = {_short(value)}"


class _Deep(list):
    """A marker for `deep_list`: dumped as text, since json/yaml dumpers recurse."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth


def deep_list(depth: int) -> _Deep:
    return _Deep(depth)


def dump_json(tree: Any) -> str:
    """JSON with NaN/Infinity allowed (Python's reader accepts them) and deep lists spliced in."""
    deep: list[int] = []

    def default(obj: Any) -> Any:
        raise TypeError(type(obj).__name__)

    def replace(node: Any) -> Any:
        if isinstance(node, _Deep):
            deep.append(node.depth)
            return f"@@DEEP{len(deep) - 1}@@"
        if isinstance(node, dict):
            return {k: replace(v) for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v) for v in node]
        return node

    text = json.dumps(replace(tree), default=default)
    for i, depth in enumerate(deep):
        text = text.replace(f'"@@DEEP{i}@@"', "[" * depth + "]" * depth)
    return text


def dump_yaml(tree: Any) -> str:
    """YAML (flow style for deep lists); NaN and infinities as YAML's .nan / .inf."""
    text = dump_json(tree)  # JSON is YAML, except NaN/Infinity spellings
    return text.replace("-Infinity", "-.inf").replace("Infinity", ".inf").replace("NaN", ".nan")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value) if not isinstance(value, _Deep) else f"[[...{value.depth} deep...]]"
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- byte mutations

INTERESTING_INTS = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One generic binary mutation: bit flips, an overwritten span, an integer, truncation, ..."""
    buf = bytearray(data)
    n = len(buf)
    choice = rng.randrange(7) if n else 5
    if choice == 0:
        flips = rng.randint(1, 8)
        for _ in range(flips):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flipped {flips} bit(s)"
    if choice == 1:
        at, length = rng.randrange(n), rng.randint(1, 64)
        fill = rng.choice([b"\x00", b"\xff", b"\x7f", b"\x80", bytes([rng.randrange(256)])])
        buf[at : at + length] = fill * len(buf[at : at + length])
        return bytes(buf), f"overwrote {length} bytes at {at} with {fill!r}"
    if choice == 2:
        at = rng.randrange(max(n - 8, 1))
        value = rng.choice(INTERESTING_INTS)
        buf[at : at + 8] = struct.pack("<Q", value)[: len(buf[at : at + 8])]
        return bytes(buf), f"wrote integer {value:#x} at {at}"
    if choice == 3:
        at = rng.randrange(n + 1)
        return bytes(buf[:at]), f"truncated to {at} of {n} bytes"
    if choice == 4:
        at, length = rng.randrange(n), rng.randint(1, 4096)
        chunk = bytes(buf[at : at + length])
        return bytes(buf[:at] + chunk + buf[at:]), f"duplicated {len(chunk)} bytes at {at}"
    if choice == 5:
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(1, 2048)))
        return bytes(buf) + garbage, f"appended {len(garbage)} random bytes"
    return b"", "emptied"


PNG_BYTES = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4"
    b"\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82"
)


# ----------------------------------------------------------------------------- tar mutations

BLOCK = 512


def tar_headers(data: bytes) -> list[int]:
    """Offsets of the member headers of a well-formed ustar/pax archive (walking sizes)."""
    offsets, pos = [], 0
    while pos + BLOCK <= len(data) and data[pos : pos + BLOCK].strip(b"\x00"):
        offsets.append(pos)
        size = int(data[pos + 124 : pos + 136].rstrip(b"\x00 ") or b"0", 8)
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return offsets


def _with_checksum(header: bytearray) -> bytearray:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\x00 ".encode()
    return header


def pax_member(records: dict[str, str]) -> bytes:
    """A pax extended header member ('x') carrying `records` (applies to the next member)."""
    body = b""
    for key, value in records.items():
        line = f" {key}={value}\n"
        length = len(line) + 1
        while len(f"{length}{line}") != length:
            length += 1
        body += f"{length}{line}".encode()
    header = bytearray(BLOCK)
    header[0:13] = b"././@PaxHeader"[:13]
    header[100:108] = b"0000644\x00"
    header[124:136] = f"{len(body):011o}\x00".encode()
    header[156:157] = b"x"
    header[257:263] = b"ustar\x00"
    header[263:265] = b"00"
    pad = (-len(body)) % BLOCK
    return bytes(_with_checksum(header)) + body + b"\x00" * pad


def mutate_tar(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A tar-aware mutation with valid header checksums (so that readers get past them)."""
    headers = tar_headers(data)
    if not headers:
        return mutate_bytes(data, rng)
    at = rng.choice(headers)
    buf = bytearray(data)
    choice = rng.randrange(6)
    if choice == 0:
        size = rng.choice(["77777777777", "7777777777\x00", "zzzz", "-1", "0", " " * 11])
        header = bytearray(buf[at : at + BLOCK])
        header[124:136] = (size.encode() + b"\x00" * 12)[:12]
        buf[at : at + BLOCK] = _with_checksum(header)
        return bytes(buf), f"member at {at}: size field {size!r}"
    if choice == 1:
        header = bytearray(buf[at : at + BLOCK])
        value = rng.choice([-1, -(2**40), 2**62])
        header[124:136] = (
            b"\xff" * 4 + value.to_bytes(8, "big", signed=True)
            if value < 0
            else (b"\x80" + value.to_bytes(11, "big"))
        )
        buf[at : at + BLOCK] = _with_checksum(header)
        return bytes(buf), f"member at {at}: base-256 size {value}"
    if choice == 2:
        records = rng.choice(
            [
                {"size": "-1"},
                {"size": "-512"},
                {"size": str(2**62)},
                {"path": "../../escape.npy"},
                {"path": "/abs/x.npy"},
                {"size": "abc"},
                {"path": "a\nb"},
            ]
        )
        return bytes(buf[:at]) + pax_member(records) + bytes(
            buf[at:]
        ), f"pax header {records} before member at {at}"
    if choice == 3:
        header = bytearray(buf[at : at + BLOCK])
        name = rng.choice([b"../x.npy", b"/etc/x.npy", b" a.npy", b"k.", b"", b"a/b/c.npy"])
        header[0:100] = name + b"\x00" * (100 - len(name))
        buf[at : at + BLOCK] = _with_checksum(header)
        return bytes(buf), f"member at {at}: name {name!r}"
    if choice == 4:
        npy = bytes(buf).find(b"\x93NUMPY")
        if npy >= 0:
            header_len = struct.unpack("<H", buf[npy + 8 : npy + 10])[0]
            header = bytes(buf[npy + 10 : npy + 10 + header_len])
            shape = rng.choice(["(99999999999999999999,)", "(-5,)", "(4611686018427387904, 8)", "(3,", "()"])
            start, end = header.find(b"'shape': "), header.find(b"}")
            new = (header[: start + 9] + shape.encode() + b", }").ljust(header_len - 1) + b"\n"
            if start >= 0 and end >= 0 and len(new) == header_len:
                buf[npy + 10 : npy + 10 + header_len] = new
                return bytes(buf), f"npy header shape {shape}"
        return mutate_bytes(data, rng)
    header = bytearray(buf[at : at + BLOCK])
    kind = rng.choice([b"1", b"2", b"5", b"x", b"g", b"S", b"\x00"])
    header[156:157] = kind
    header[157:257] = (b"../../target" + b"\x00" * 100)[:100]
    buf[at : at + BLOCK] = _with_checksum(header)
    return bytes(buf), f"member at {at}: type flag {kind!r}"
