"""Hostile inputs found by trying the CLI as an adversarial user: each ends in one clear error or in
success, never a hang, a traceback, code run from a file or a wrong path."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tarfile

import pytest
from torch import nn

from foundation.errors import DataError
from foundation.lock import FolderLock, LockedError, lock_path_for


class _RunsCode:
    """A pickle payload that, if ever unpickled, leaves a marker file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_dcp_metadata_is_refused_before_torch_logs_a_traceback(tmp_path, caplog):
    from foundation.train.checkpoint import load_model_weights

    step = tmp_path / "step-4"
    step.mkdir()
    marker = tmp_path / "ran"
    (step / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="not readable DCP metadata"):
        load_model_weights(step, nn.Linear(2, 2))
    assert not marker.exists()
    assert not [r for r in caplog.records if r.exc_info], "DCP logged a traceback"


def _fifo_lock(folder, age_s: float = 0.0):
    path = lock_path_for(folder)
    os.mkfifo(path)
    if age_s:
        os.utime(path, (os.path.getmtime(path) - age_s,) * 2, follow_symlinks=False)
    return path


def _acquire_in_subprocess(folder, timeout: float = 20) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom foundation.lock import FolderLock, LockedError\n"
        "try:\n    FolderLock(sys.argv[1], 'test').acquire().release()\nexcept LockedError:\n"
        "    sys.exit(3)\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(folder)], timeout=timeout, capture_output=True)


def test_a_fifo_planted_as_a_fresh_lock_is_refused_without_hanging(tmp_path):
    run = tmp_path / "run"
    _fifo_lock(run)
    assert _acquire_in_subprocess(run).returncode == 3


def test_a_fifo_planted_as_an_old_lock_is_taken_over_without_hanging(tmp_path):
    run = tmp_path / "run"
    _fifo_lock(run, age_s=3600)
    assert _acquire_in_subprocess(run).returncode == 0


def test_a_directory_planted_as_a_lock(tmp_path):
    run = tmp_path / "run"
    path = lock_path_for(run)
    path.mkdir()
    with pytest.raises(LockedError, match="unknown process"):
        FolderLock(run, "test").acquire()
    os.utime(path, (os.path.getmtime(path) - 3600,) * 2)
    with FolderLock(run, "test"):
        assert lock_path_for(run).is_file()


def test_a_symlink_planted_as_a_lock_leaves_its_target_alone(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    os.utime(target, (1, 1))
    run = tmp_path / "run"
    lock_path_for(run).symlink_to(target)
    with FolderLock(run, "test"):
        pass
    assert target.read_text() == "keep me"


def test_index_of_a_relative_directory(tmp_path, monkeypatch):
    from foundation.data.index import index_shards

    shards = tmp_path / "shards"
    shards.mkdir()
    member = tmp_path / "a.txt"
    member.write_text("hello")
    with tarfile.open(shards / "train-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(member, arcname="s0.txt")
    monkeypatch.chdir(tmp_path)
    manifest = index_shards("shards")
    assert manifest.splits["train"].samples == 1


@pytest.mark.parametrize("content", ["empty", "code"])
def test_an_unloadable_model_file_is_one_clear_line_without_unsafe_advice(tmp_path, content, capsys):
    from foundation.cli import main

    marker, model = tmp_path / "ran", tmp_path / "model.pt"
    if content == "empty":
        model.write_bytes(b"")
    else:
        with open(model, "wb") as handle:
            pickle.dump({"format": _RunsCode(marker)}, handle)
    out = tmp_path / "e.h5"
    code = main(["export", "--checkpoint", str(model), "--data", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert err.startswith("error: ") and "\n" not in err and not err.endswith(":")
    assert "weights_only" not in err
