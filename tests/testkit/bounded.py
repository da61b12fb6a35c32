"""Run a `foundation` command in a child process under a wall-clock and a resident-memory bound."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BoundedResult:
    returncode: int | None
    stdout: str
    stderr: str
    peak_rss_mb: float
    killed_for: str | None
    """"memory" or "time" when the child was killed for breaking a bound, else None."""


def _rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants (a forked checker counts too)."""
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _rss_mb(int(child))
    except (OSError, ValueError):
        pass
    return total


def run_foundation(
    args: list[str],
    *,
    rss_limit_mb: float = 1500,
    timeout_s: float = 120,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> BoundedResult:
    """`python -m foundation.cli ARGS`, killed as soon as its RSS passes `rss_limit_mb` or it runs
    past `timeout_s` (a memory bomb or a hang fails the test instead of the machine)."""
    code = "import sys; from foundation.cli import main; sys.exit(main(sys.argv[1:]))"
    return run_python(code, args, rss_limit_mb=rss_limit_mb, timeout_s=timeout_s, cwd=cwd, env=env)


def run_python(
    code: str,
    args: list[str],
    *,
    rss_limit_mb: float,
    timeout_s: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> BoundedResult:
    """`python -c CODE ARGS` under the same bounds as `run_foundation`; `env` is added to os.environ."""
    # Output goes to files, not pipes: a child filling an unread pipe would block and look hung.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=out,
            stderr=err,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        peak, killed_for = _watch(child, rss_limit_mb, timeout_s)
        out.seek(0)
        err.seek(0)
        return BoundedResult(child.returncode, out.read(), err.read(), peak, killed_for)


def _watch(child: subprocess.Popen, rss_limit_mb: float, timeout_s: float) -> tuple[float, str | None]:
    """Wait for `child`, killing it when it breaks a bound; (peak RSS in MB, why it was killed)."""
    peak, killed_for = 0.0, None
    deadline = time.monotonic() + timeout_s
    while child.poll() is None:
        peak = max(peak, _rss_mb(child.pid))
        if peak > rss_limit_mb:
            killed_for = "memory"
        elif time.monotonic() > deadline:
            killed_for = "time"
        if killed_for:
            child.kill()
            break
        time.sleep(0.02)
    child.wait()
    return peak, killed_for


def assert_one_line_error(result: BoundedResult, *fragments: str) -> None:
    """Exit 2, one `error:` line on stderr naming every fragment, no traceback, within the bounds."""
    assert result.killed_for is None, f"killed for {result.killed_for} (peak RSS {result.peak_rss_mb:.0f} MB)"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
