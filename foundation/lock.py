"""Exclusive locks on run and output folders, safe on shared (NFS, Lustre, GPFS) file systems.

Two commands writing one folder corrupt it silently: a requeued SLURM job whose earlier
incarnation is still saving, two `prepare` runs on one `--out`. Every command that writes a run
or output folder holds a `FolderLock` for as long as it writes.

How it works, and why:
- The lock is a small JSON file beside the folder (`<parent>/.<name>.foundation.lock`, so that
  it works the same before the folder exists and while it is renamed into place) created with
  `O_CREAT | O_EXCL`, which is atomic on local file systems and on NFSv3+; `fcntl` locks are not
  reliable across NFS clients.
- It names its holder: host, pid, the process's start time, SLURM job id, command, time taken.
- A lock is stale when its holder is gone: on the same host the pid is dead or belongs to another
  process (start time differs); on another host, where pids mean nothing, its heartbeat (the
  file's mtime, refreshed every `heartbeat_s` by a daemon thread) is older than `stale_after_s`.
- A stale lock is renamed to a unique name before it is removed, so of two processes that both
  find it stale only one can take it over; the other then sees the winner's fresh lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from foundation.errors import FoundationError

_log = logging.getLogger(__name__)

LOCK_NAME = ".foundation.lock"
#: How often the holder refreshes the lock file's mtime.
HEARTBEAT_S = 30.0
#: A lock from another host whose heartbeat is older than this is taken to be abandoned.
STALE_AFTER_S = 300.0
#: A lock file larger than this is not one of ours; it is refused, not parsed.
_MAX_LOCK_BYTES = 64 * 1024


class LockedError(FoundationError):
    """Another live process holds the lock on a folder."""


def lock_path_for(folder: str | os.PathLike) -> Path:
    """Where the lock of `folder` lives: beside it, whether or not it exists yet."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}{LOCK_NAME}"


def _process_start_time(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _holder_record(command: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start_time(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "command": command,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": uuid.uuid4().hex,
    }


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The holder record of a lock file; None if it vanished; {} if it is unreadable."""
    try:
        # Non-blocking and not through a link: a FIFO planted as the lock must not hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        raw = os.read(fd, _MAX_LOCK_BYTES + 1)
    except OSError:
        return {}
    finally:
        os.close(fd)
    if len(raw) > _MAX_LOCK_BYTES:
        return {}
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(record: dict[str, Any]) -> str:
    if not record:
        return "an unknown process (the lock file is not readable)"
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return (
        f"pid {record.get('pid')} on {record.get('host')}{job}, running "
        f"{record.get('command')!r} since {record.get('since')}"
    )


def _is_stale(path: Path, record: dict[str, Any], stale_after_s: float) -> bool:
    if record and record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        pid = record["pid"]
        if not _pid_alive(pid):
            return True
        recorded_start = record.get("pid_start")
        return recorded_start is not None and _process_start_time(pid) not in (None, recorded_start)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > stale_after_s


class FolderLock:
    """``with FolderLock(run_dir, "pretrain"):`` — exclusive, heartbeat-refreshed, stale-aware.

    `wait_s` > 0 keeps retrying that long before giving up (a requeued job whose previous
    incarnation is still writing its last checkpoint). Raises `LockedError` naming the holder.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        command: str,
        *,
        wait_s: float = 0.0,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.folder = Path(folder)
        self.command = command
        self.wait_s = wait_s
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.path: Path | None = None
        self._record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> FolderLock:
        if self.path is not None:
            raise RuntimeError(f"lock on {str(self.folder)!r} is already held by this object")
        path = lock_path_for(self.folder)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FoundationError(
                f"cannot lock {str(self.folder)!r}: {exc.strerror} ({str(path.parent)!r})"
            ) from exc
        record = _holder_record(self.command)
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._try_create(path, record):
                break
            holder = _read_holder(path)
            if holder is None:
                continue  # released between our attempt and the read: try again at once
            if _is_stale(path, holder, self.stale_after_s):
                _log.warning("%s: taking over a stale lock held by %s", self.folder, describe_holder(holder))
                self._break(path)
                continue
            if time.monotonic() >= deadline:
                raise LockedError(
                    f"{str(self.folder)!r} is in use by {describe_holder(holder)}; wait for it to "
                    f"finish or stop it (if that process is gone, delete {str(path)!r})"
                )
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self.path, self._record = path, record
        self._thread = threading.Thread(target=self._heartbeat, name=f"lock:{path.name}", daemon=True)
        self._thread.start()
        return self

    def _try_create(self, path: Path, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise FoundationError(
                f"cannot lock {str(self.folder)!r}: {exc.strerror} ({str(path)!r})"
            ) from exc
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)  # an empty lock would block the folder until it went stale
            raise
        os.close(fd)
        return True

    @staticmethod
    def _break(path: Path) -> None:
        aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, aside)
        with contextlib.suppress(OSError):  # a directory planted as the lock stays aside
            aside.unlink()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                if self.path is not None:
                    os.utime(self.path)

    def still_held(self) -> bool:
        """True while the lock file on disk is still ours (check before publishing)."""
        if self.path is None or self._record is None:
            return False
        holder = _read_holder(self.path)
        return bool(holder) and holder.get("token") == self._record["token"]

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.path is not None and self.still_held():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.path, self._record, self._thread = None, None, None
        self._stop = threading.Event()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def command_line() -> str:
    """This process's command, for the holder record."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]
