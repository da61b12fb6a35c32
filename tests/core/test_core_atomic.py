"""foundation.atomic: the target is either the old content or the whole new one."""

import json
import os

import pytest

from foundation import atomic


def test_write_json_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    atomic.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_folder_is_published_whole_and_never_over_an_existing_one(tmp_path):
    target = tmp_path / "model"
    with atomic.replacing(target, overwrite=False) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_bytes(b"w")
    assert (target / "weights").read_bytes() == b"w"
    with pytest.raises(FileExistsError), atomic.replacing(target, overwrite=False) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_bytes(b"other")
    assert (target / "weights").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced descriptors through /proc")
def test_contents_reach_the_disk_before_the_rename_and_the_new_name_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "rename", rename)
    target = tmp_path / "model"
    with atomic.replacing(target, overwrite=False) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "weights").write_bytes(b"w")
        (tmp / "sub" / "config").write_text("c")
    staged = str(atomic.temporary_name(target))
    assert sorted(events[:4]) == [
        ("fsync", staged),
        ("fsync", f"{staged}/sub"),
        ("fsync", f"{staged}/sub/config"),
        ("fsync", f"{staged}/weights"),
    ]
    assert events[4:] == [("rename", str(target)), ("fsync", str(tmp_path))]


def test_publish_moves_a_temporary_named_by_its_writer(tmp_path):
    partial = tmp_path / "emb.h5.partial"
    partial.write_bytes(b"rows")
    atomic.publish(partial, tmp_path / "emb.h5")
    assert (tmp_path / "emb.h5").read_bytes() == b"rows" and not partial.exists()
    partial.write_bytes(b"more")
    with pytest.raises(FileExistsError):
        atomic.publish(partial, tmp_path / "emb.h5", overwrite=False)
    assert (tmp_path / "emb.h5").read_bytes() == b"rows" and partial.exists()
