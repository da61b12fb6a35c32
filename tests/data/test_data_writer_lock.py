"""One writer per shard-set folder (real processes), and a killed writer's temporaries cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from foundation.data import Manifest, ShardWriter
from foundation.errors import DataError
from foundation.lock import LockedError, lock_path_for

# A writer in a child process: once a "start" file appears (both children import at once), writes
# 5 samples (2 finished shard temporaries + 1 open one), says "ready", then waits for a "go" file
# and closes (exit 0), or, with "kill", dies by SIGKILL.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import numpy as np
    from foundation.data import ShardWriter
    from foundation.errors import FoundationError

    out, flag, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def wait_for(path):
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    wait_for(flag.with_suffix(".start"))
    try:
        writer = ShardWriter(out, samples_per_shard=2)
    except FoundationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for i in range(5):
        writer.write({"__key__": f"{mode}-{i}", "x": np.arange(64.0) + i})
    flag.with_suffix(".ready").touch()
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    wait_for(flag.with_suffix(".go"))
    writer.close()
    """
)


def _start(tmp_path, out, name: str, mode: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(tmp_path / name), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(tmp_path, name: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not (tmp_path / f"{name}.ready").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "child never got ready"
        time.sleep(0.02)


def _temporaries(out) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".tmp-" in p.name) if out.exists() else []


@pytest.mark.slow
def test_two_processes_on_one_folder_cannot_both_succeed(tmp_path):
    out = tmp_path / "set"
    first = _start(tmp_path, out, "a", "wait")
    second = _start(tmp_path, out, "b", "wait")
    (tmp_path / "a.start").touch()
    _wait_ready(tmp_path, "a", first)
    (tmp_path / "b.start").touch()
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2
    assert f"in use by pid {first.pid}" in err and "Traceback" not in err
    (tmp_path / "a.go").touch()
    assert first.wait(timeout=60) == 0
    manifest = Manifest.load(out)
    assert manifest.split("train").samples == 5
    assert not _temporaries(out) and not lock_path_for(out).exists()


def test_killed_writer_temporaries_are_removed_by_the_next_writer(tmp_path, caplog):
    out = tmp_path / "set"
    child = _start(tmp_path, out, "k", "kill")
    (tmp_path / "k.start").touch()
    child.communicate(timeout=60)
    assert child.returncode == -9
    left = _temporaries(out)
    assert len(left) == 3 and all(f".tmp-{child.pid}-" in name for name in left)
    assert lock_path_for(out).exists()  # the dead writer's lock, now stale
    with caplog.at_level("WARNING"):
        with ShardWriter(out) as writer:
            assert not _temporaries(out)
            writer.write({"__key__": "a", "x": np.arange(4.0)})
    assert "removed 3 temporary file(s)" in caplog.text
    assert Manifest.load(out).split("train").samples == 1 and not _temporaries(out)


def test_publish_rechecks_lock_and_target(tmp_path):
    out = tmp_path / "set"
    first = ShardWriter(out)
    first.write({"__key__": "a", "x": np.arange(4.0)})
    os.unlink(lock_path_for(out))  # as if a second process had judged the lock stale
    with ShardWriter(out) as second:
        second.write({"__key__": "b", "x": np.arange(4.0) + 1})
    with pytest.raises(LockedError, match="took over this writer's lock"):
        first.close()
    assert [s.samples for s in Manifest.load(out).split("train").shards] == [1]
    assert not _temporaries(out)


def test_publish_refuses_when_a_set_appeared_meanwhile(tmp_path):
    out = tmp_path / "set"
    writer = ShardWriter(out)
    writer.write({"__key__": "a", "x": np.arange(4.0)})
    (out / "manifest.json").write_text("{}")  # published by a writer that ignored the lock
    with pytest.raises(DataError, match="published a shard set there while this one was writing"):
        writer.close()
    assert (out / "manifest.json").read_text() == "{}" and not _temporaries(out)


def test_lock_is_released_after_a_failed_write_and_on_garbage_collection(tmp_path):
    out = tmp_path / "set"
    with pytest.raises(DataError):
        with ShardWriter(out) as writer:
            writer.write({"__key__": "a", "x": np.arange(4.0)})
            writer.write({"__key__": "a", "x": np.arange(4.0)})  # duplicate key
    assert not lock_path_for(out).exists()
    writer = ShardWriter(out)
    del writer
    assert not lock_path_for(out).exists()
