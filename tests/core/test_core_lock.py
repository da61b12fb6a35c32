"""Folder locks: one writer at a time, stale locks taken over, other hosts judged by heartbeat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from foundation.lock import FolderLock, LockedError, lock_path_for


def test_second_holder_is_refused_with_the_first_named(tmp_path):
    run = tmp_path / "run"
    with FolderLock(run, "pretrain a.yaml"):
        with pytest.raises(LockedError, match=rf"pid {os.getpid()} .*pretrain a.yaml"):
            FolderLock(run, "pretrain b.yaml").acquire()
    with FolderLock(run, "pretrain b.yaml"):  # released: free again
        assert lock_path_for(run).is_file()
    assert not lock_path_for(run).exists()


def test_lock_is_the_same_before_and_after_the_folder_exists(tmp_path):
    out = tmp_path / "shards"
    with FolderLock(out, "prepare"):
        out.mkdir()
        with pytest.raises(LockedError):
            FolderLock(out, "prepare").acquire()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    run = tmp_path / "run"
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from foundation.lock import FolderLock; FolderLock({str(run)!r}, 'x').acquire()",
        ],
        check=True,
    )
    assert child.returncode == 0 and lock_path_for(run).is_file()  # the child died holding it
    with FolderLock(run, "resume") as lock:
        assert lock.still_held()


def _foreign_lock(run, age_s: float) -> None:
    path = lock_path_for(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "command": "pretrain", "token": "t"}))
    old = time.time() - age_s
    os.utime(path, (old, old))


def test_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path):
    run = tmp_path / "run"
    _foreign_lock(run, age_s=5)
    with pytest.raises(LockedError, match="node-elsewhere"):
        FolderLock(run, "pretrain", stale_after_s=60).acquire()
    _foreign_lock(run, age_s=120)
    with FolderLock(run, "pretrain", stale_after_s=60):
        pass


def test_heartbeat_keeps_a_long_holder_fresh(tmp_path):
    run = tmp_path / "run"
    with FolderLock(run, "pretrain", heartbeat_s=0.05) as lock:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 10


def test_waiting_holder_gets_the_lock_when_it_is_released(tmp_path):
    run = tmp_path / "run"
    first = FolderLock(run, "old incarnation").acquire()
    threading.Timer(0.3, first.release).start()
    with FolderLock(run, "requeued", wait_s=10) as lock:
        assert lock.still_held()


def test_unreadable_lock_file_is_refused_not_parsed(tmp_path):
    run = tmp_path / "run"
    path = lock_path_for(run)
    path.write_bytes(b"\x89PNG" + b"\0" * 100)
    with pytest.raises(LockedError, match="unknown process"):
        FolderLock(run, "x").acquire()
