"""Run a check on an untrusted file in a short-lived forked child, under a time and a memory bound.

Some C libraries (HDF5, faiss) can loop forever or allocate gigabytes on a damaged file, and
Python cannot interrupt C code. A forked child does the risky reads first: if it loops past the
time bound it is killed, if it allocates past the memory bound its allocation fails, and if it
crashes only it dies. The parent then reads the file itself, knowing the same reads finish.

Bounds come from the environment: `FOUNDATION_CHECK_SECONDS` (default 60; 0 turns the checks off)
and `FOUNDATION_CHECK_MB` (memory the child may add, default 2048). Where `os.fork` is missing
(Windows) the check runs in-process, unguarded. Forking a process with other threads is safe for
these checks unless another thread holds a lock the check needs at that instant (h5py's global
lock, say): the child then stalls and the file is reported as not read within the time bound.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import select
import signal
import time
import warnings
from collections.abc import Callable

from foundation.errors import ConfigError, DataError, FoundationError

SECONDS_ENV = "FOUNDATION_CHECK_SECONDS"
MEGABYTES_ENV = "FOUNDATION_CHECK_MB"
DEFAULT_SECONDS = 60.0
DEFAULT_MEGABYTES = 2048

#: Exit codes of the child: the check passed, refused the file (reason on the pipe), ran out of
#: memory, or met an unexpected exception (a bug: the parent re-runs the reads to show it).
_PASSED, _REFUSED, _NO_MEMORY, _UNEXPECTED = 0, 3, 4, 5
_MAX_REASON_BYTES = 4000  # well under a pipe's buffer, so the child never blocks writing it

_in_child = False


def check_seconds() -> float:
    """The time bound of a check (0: checks are off), from FOUNDATION_CHECK_SECONDS."""
    return _env_number(SECONDS_ENV, DEFAULT_SECONDS)


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise ConfigError(f"environment variable {name}={text!r} must be a number >= 0")
    return value


def run_isolated(task: Callable[[], None], where: str, *, extra_mb: float = 0) -> None:
    """Run `task` in a forked child bounded in time and memory; return when it passed.

    A FoundationError raised by `task` is raised here with the same message; a loop, a memory
    blow-up or a crash becomes a DataError naming `where`. Memory allowed is FOUNDATION_CHECK_MB
    plus `extra_mb` (for checks whose legitimate need grows with the file).
    """
    seconds = check_seconds()
    if _in_child or seconds == 0 or not hasattr(os, "fork"):
        task()
        return
    megabytes = _env_number(MEGABYTES_ENV, DEFAULT_MEGABYTES) + extra_mb
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded fork" on 3.12+
        pid = os.fork()
    if pid == 0:  # pragma: no cover (runs in the child; its outcome is what the tests check)
        os.close(read_end)
        _child(task, write_end, megabytes)
    os.close(write_end)
    try:
        status, reason = _wait(pid, read_end, seconds)
    finally:
        os.close(read_end)
    _judge(status, reason, where, seconds, megabytes, task)


def _child(task: Callable[[], None], write_end: int, megabytes: float) -> None:
    """Run `task` with stdout/stderr silenced and the address space capped; never returns."""
    global _in_child
    _in_child = True
    code, reason = _PASSED, ""
    try:
        _silence_output()
        _limit_memory(megabytes)
        task()
    except FoundationError as exc:
        code, reason = _REFUSED, str(exc)
    except MemoryError:
        code = _NO_MEMORY
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-runs the reads
        code, reason = _UNEXPECTED, f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError):
        os.write(write_end, reason.encode("utf-8", "replace")[:_MAX_REASON_BYTES])
    os._exit(code)


def _silence_output() -> None:
    """Point the child's fds 1 and 2 at /dev/null, and stop faulthandler's crash reports (written to
    a descriptor of its own): only the parent speaks to the user."""
    faulthandler.disable()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def _limit_memory(megabytes: float) -> None:
    """Cap the child's address space at what it maps now plus `megabytes` (Linux; elsewhere no cap)."""
    try:
        import resource

        with open("/proc/self/status") as status:
            mapped_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration, ValueError):
        return
    limit = (mapped_kb + int(megabytes * 1024)) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _wait(pid: int, read_end: int, seconds: float) -> tuple[int | None, str]:
    """The child's wait status (None when it was killed for running past `seconds`) and its reason."""
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, ""
        ready, _, _ = select.select([read_end], [], [], min(remaining, 0.25))
        if ready:
            chunk = os.read(read_end, 65536)
            chunks.append(chunk)
            if chunk:
                continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, b"".join(chunks).decode("utf-8", "replace")


def _judge(
    status: int | None, reason: str, where: str, seconds: float, megabytes: float, task: Callable[[], None]
) -> None:
    """Raise what the child's outcome means for the parent, or return when it passed."""
    if status is None:
        raise DataError(
            f"{where}: reading it did not finish within {seconds:g} s (a damaged file can make the "
            f"library loop forever); if it sits on a slow file system, raise {SECONDS_ENV}"
        )
    if os.WIFSIGNALED(status):
        raise DataError(
            f"{where}: the library reading it crashed (signal {os.WTERMSIG(status)}); the file is damaged"
        )
    code = os.WEXITSTATUS(status)
    if code == _REFUSED:
        raise DataError(reason)
    if code == _NO_MEMORY:
        raise DataError(
            f"{where}: reading it needs more than {megabytes:.0f} MB (a damaged size?); if the file is "
            f"genuine, raise {MEGABYTES_ENV}"
        )
    if code == _UNEXPECTED:
        task()  # a bug, not the file: show it here with its traceback
        return
    if code != _PASSED:
        raise DataError(f"{where}: the check of it ended with exit status {code}; the file is damaged")
