"""A hostile manifest.json (deeply nested, huge, not an object) is one DataError line."""

from __future__ import annotations

import json

import pytest

from foundation.cli import main
from foundation.data import Manifest, ShardWriter
from foundation.data import manifest as manifest_module
from foundation.errors import DataError


@pytest.fixture()
def shard_set(tmp_path):
    with ShardWriter(tmp_path / "set") as writer:
        for i in range(3):
            writer.write({"__key__": f"s{i}", "x": [1.0 + i, 2.0]})
    return tmp_path / "set"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 200_000 + "]" * 200_000, "nested deeper than 64 levels"),
        ('{"a":' * 100 + "1" + "}" * 100, "nested deeper than 64 levels"),
        ("[1, 2, 3]", "expected a JSON object at the top level, got list"),
        ("null", "expected a JSON object at the top level, got NoneType"),
        ('"manifest"', "expected a JSON object at the top level, got str"),
        ("\x89PNG\r\n\x1a\n", "unreadable manifest"),
        ('{"a": ' + "9" * 5000 + "}", "unreadable manifest"),
    ],
)
def test_hostile_manifest_is_one_line(shard_set, capsys, text, message):
    (shard_set / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(DataError, match=message):
        Manifest.load(shard_set)
    assert main(["shards", "info", str(shard_set)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_deep_stats_inside_a_valid_manifest_are_refused(shard_set):
    data = json.loads((shard_set / "manifest.json").read_text())
    nested: dict = {}
    for _ in range(70):
        nested = {"n": nested}
    data["extra"] = nested
    (shard_set / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="nested deeper than 64 levels"):
        Manifest.load(shard_set)


def test_huge_manifest_is_refused_unread(shard_set, monkeypatch):
    path = shard_set / "manifest.json"
    with open(path, "r+b") as handle:  # sparse: 300 MiB that take no disk space
        handle.truncate(300 << 20)
    with pytest.raises(DataError, match="larger than 256 MiB"):
        Manifest.load(shard_set)
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    path.write_text(json.dumps({"format": {}, "padding": "x" * 200}))
    with pytest.raises(DataError, match="manifest is larger than"):
        Manifest.load(shard_set)


def test_own_manifests_are_well_inside_the_limits(shard_set):
    assert Manifest.load(shard_set).split("train").samples == 3
