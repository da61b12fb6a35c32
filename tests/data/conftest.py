"""Small shard sets shared by the data-layer tests."""

from __future__ import annotations

import numpy as np
import pytest

from foundation.data import ShardWriter


def _make_sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "__key__": f"obj-{i:05d}",
        "flux": rng.normal(size=(6,)).astype(np.float32),
        "label": i,
        "z": float(i) / 10,
        "name": f"object {i}",
        "meta": {"index": i, "tags": ["a", str(i)]},
    }


def _write_split(path, n: int, samples_per_shard: int, split: str = "train", **kwargs):
    with ShardWriter(path, split=split, samples_per_shard=samples_per_shard, **kwargs) as writer:
        for i in range(n):
            writer.write(_make_sample(i))
    return path


@pytest.fixture(scope="session")
def make_sample():
    """make_sample(i) -> a sample with an array, int, float, str and JSON field."""
    return _make_sample


@pytest.fixture(scope="session")
def write_split():
    """write_split(path, n, samples_per_shard, split="train", **writer_kwargs) -> path."""
    return _write_split


@pytest.fixture(scope="session")
def small_set(tmp_path_factory):
    """103 train samples in shards of 10 (the last one short): uneven on purpose."""
    return _write_split(tmp_path_factory.mktemp("small") / "set", 103, 10, family="test")
