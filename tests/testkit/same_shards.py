"""`assert_same_shard_sets`: two shard sets written from the same inputs are the same, byte for
byte, apart from when and by which command line they were made."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from foundation.data import Manifest

#: Provenance entries that differ between two runs of the same preparation.
RUN_ENTRIES = ("created", "command")


def _manifest_without_run_entries(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    provenances = [manifest.get("provenance", {}), *manifest.get("provenance", {}).get("splits", {}).values()]
    for provenance in provenances:
        for entry in RUN_ENTRIES:
            provenance.pop(entry, None)
    return manifest


def assert_same_shard_sets(a: str | Path, b: str | Path) -> None:
    a, b = Path(a), Path(b)
    names_a = sorted(p.name for p in a.iterdir())
    assert names_a == sorted(p.name for p in b.iterdir())
    assert len([n for n in names_a if n.endswith(".tar")]) >= 2, "compare shard sets of several shards"
    for name in names_a:
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"
    assert _manifest_without_run_entries(a) == _manifest_without_run_entries(b)


def members_by_key(folder: str | Path, split: str) -> dict[str, dict[str, bytes]]:
    """Every sample's tar members (name -> bytes) of one split, read with the standard library's
    tarfile: two sets holding the same samples compare equal however their shards are cut."""
    out: dict[str, dict[str, bytes]] = {}
    for path in Manifest.load(folder).shard_paths(split):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                out.setdefault(member.name.split(".", 1)[0], {})[member.name] = tar.extractfile(member).read()
    return out
