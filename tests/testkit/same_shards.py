"""`assert_same_shard_sets`: two shard sets written from the same inputs are the same, byte for
byte, apart from when and by which command line they were made; `assert_same_batches`: a set read
from a URL gives the batches of the local one."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

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


def stream_keys_and_flux(path, **kwargs) -> list[tuple[list[str], np.ndarray]]:
    """(keys, flux) of every batch of a shard set (local or URL) over two epochs, batch size 8."""
    from foundation.data import ShardDataset

    ds = ShardDataset(path, batch_size=8, seed=3, epochs=2, drop_last=False, **kwargs)
    return [(batch["__key__"], batch["flux"].numpy()) for batch in ds]


def assert_same_batches(a: list[tuple[list[str], np.ndarray]], b: list[tuple[list[str], np.ndarray]]) -> None:
    """Two `stream_keys_and_flux` results are the same batches, key for key and value for value."""
    assert [keys for keys, _ in a] == [keys for keys, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
