"""Shard sets on an S3-API server (moto's server mode on 127.0.0.1, behind a proxy that injects
faults): read, verified and written as on a local folder, with the endpoint given the standard
way (AWS_ENDPOINT_URL), as for MinIO or Ceph."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

pytest.importorskip("fsspec")

from foundation.data import ShardDataset  # noqa: E402
from foundation.data.remote import RemoteShardSet  # noqa: E402
from foundation.errors import DataError  # noqa: E402

FAST_RETRIES = {"retries": 3, "backoff_s": 0.001, "max_backoff_s": 0.01}
OUR_RETRIES_ONLY = {"config_kwargs": {"retries": {"max_attempts": 1}}}
"""botocore retries 503s itself (with waits of seconds); off, so that the faults reach our retries."""


@pytest.fixture
def s3_set(tmp_path, write_split, s3_bucket):
    """(local shard-set folder, its s3:// copy, the bucket): 103 samples in 11 shards."""
    local = write_split(tmp_path / "set", 103, 10, family="test")
    return local, s3_bucket.upload(local, "sets/small"), s3_bucket


def _stream(path, **kwargs) -> list[tuple[list[str], np.ndarray]]:
    ds = ShardDataset(path, batch_size=8, seed=3, epochs=2, drop_last=False, **kwargs)
    return [(batch["__key__"], batch["flux"].numpy()) for batch in ds]


def _assert_same(remote, local) -> None:
    assert [keys for keys, _ in remote] == [keys for keys, _ in local]
    for (_, a), (_, b) in zip(remote, local, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_s3_set_gives_the_local_batches(s3_set, tmp_path, monkeypatch):
    local, url, _ = s3_set
    monkeypatch.setenv("FOUNDATION_CACHE", str(tmp_path / "cache"))
    _assert_same(_stream(url), _stream(local))


def test_faults_on_s3_lose_and_duplicate_no_sample(s3_set, tmp_path):
    local, url, bucket = s3_set
    bucket.proxy.faults = {
        "train-000000.tar": ["drop"],
        "train-000003.tar": ["503", "drop"],
        "train-000008.tar": ["503", "503"],
    }
    remote = RemoteShardSet(url, tmp_path / "cache", storage_options=OUR_RETRIES_ONLY, **FAST_RETRIES)
    got = _stream(remote)
    _assert_same(got, _stream(local))
    keys = [k for ks, _ in got for k in ks]
    assert Counter(keys) == Counter({f"obj-{i:05d}": 2 for i in range(103)})  # two whole epochs
    assert not any(bucket.proxy.faults.values())  # every injected fault was met
    assert bucket.proxy.gets["train-000005.tar"] == 1  # cached: fetched once for both epochs


def test_a_missing_s3_set_is_one_clear_error(s3_bucket, tmp_path):
    with pytest.raises(DataError, match=r"s3://.*/nothing-here/manifest\.json.*FileNotFoundError"):
        RemoteShardSet(s3_bucket.url("nothing-here"), tmp_path / "cache", **FAST_RETRIES)


def test_shards_info_and_verify_take_an_s3_url(s3_set, tmp_path, capsys):
    from foundation.cli import main

    _, url, bucket = s3_set
    cache = ["--cache-dir", str(tmp_path / "cli-cache")]
    assert main(["shards", "info", url, *cache]) == 0
    assert f"shard set  {url}" in capsys.readouterr().out
    bucket.proxy.faults = {"train-000007.tar": ["drop"]}
    assert main(["shards", "verify", url, *cache]) == 0
    assert "OK: 11 shards, 103 samples" in capsys.readouterr().out
