"""foundation.atomic: the target is either the old content or the whole new one."""

import json

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
