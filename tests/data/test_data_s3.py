"""Shard sets on an S3-API server (moto's server mode on 127.0.0.1, behind a proxy that injects
faults): read, verified and written as on a local folder, with the endpoint given the standard
way (AWS_ENDPOINT_URL), as for MinIO or Ceph."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

pytest.importorskip("fsspec")

from foundation.data.remote import RemoteShardSet  # noqa: E402
from foundation.errors import DataError  # noqa: E402
from tests.testkit.same_shards import assert_same_batches, stream_keys_and_flux  # noqa: E402

pytestmark = pytest.mark.slow  # a few seconds each: every request goes through moto (Python) and a proxy

FAST_RETRIES = {"retries": 3, "backoff_s": 0.001, "max_backoff_s": 0.01}
OUR_RETRIES_ONLY = {"config_kwargs": {"retries": {"max_attempts": 1}}}
"""botocore retries 503s itself (with waits of seconds); off, so that the faults reach our retries."""


@pytest.fixture
def s3_set(tmp_path, write_split, s3_bucket):
    """(local shard-set folder, its s3:// copy, the bucket): 103 samples in 11 shards."""
    local = write_split(tmp_path / "set", 103, 10, family="test")
    return local, s3_bucket.upload(local, "sets/small"), s3_bucket


def test_an_s3_set_gives_the_local_batches(s3_set, tmp_path, monkeypatch):
    local, url, _ = s3_set
    monkeypatch.setenv("FOUNDATION_CACHE", str(tmp_path / "cache"))
    assert_same_batches(stream_keys_and_flux(url), stream_keys_and_flux(local))


def test_faults_on_s3_lose_and_duplicate_no_sample(s3_set, tmp_path):
    local, url, bucket = s3_set
    bucket.proxy.faults = {
        "train-000000.tar": ["drop"],
        "train-000003.tar": ["503", "drop"],
        "train-000008.tar": ["503", "503"],
    }
    remote = RemoteShardSet(url, tmp_path / "cache", storage_options=OUR_RETRIES_ONLY, **FAST_RETRIES)
    got = stream_keys_and_flux(remote)
    assert_same_batches(got, stream_keys_and_flux(local))
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


# ---------------------------------------------------------------------- writing


def _get(bucket, url: str, local):
    """Download a shard set to a local folder (for byte comparisons)."""
    local.mkdir(parents=True)
    for name in _names(bucket, url):
        bucket.fs.get_file(f"{url}/{name}", str(local / name))
    return local


def _names(bucket, url: str) -> list[str]:
    bucket.fs.invalidate_cache()
    try:
        return sorted(key.rsplit("/", 1)[-1] for key in bucket.fs.ls(url, detail=False))
    except FileNotFoundError:
        return []


def _write_set(out, n: int, make_sample, **kwargs):
    from foundation.data import ShardSetWriter

    with ShardSetWriter(
        out, {"train": 0.8, "valid": 0.2}, samples_per_shard=10, family="test", **kwargs
    ) as w:
        for i in range(n):
            w.write(make_sample(i))


def test_a_set_written_to_s3_is_the_local_set(s3_bucket, tmp_path, make_sample, monkeypatch):
    from tests.testkit.same_shards import assert_same_shard_sets

    monkeypatch.setenv("FOUNDATION_CACHE", str(tmp_path / "cache"))
    url = s3_bucket.url("sets/written")
    _write_set(url, 57, make_sample)
    _write_set(tmp_path / "local", 57, make_sample)
    assert_same_shard_sets(_get(s3_bucket, url, tmp_path / "got"), tmp_path / "local")
    assert not list((tmp_path / "cache" / "staging").iterdir())  # local staging removed
    assert_same_batches(
        stream_keys_and_flux(url, split="valid"), stream_keys_and_flux(tmp_path / "local", split="valid")
    )


def test_the_manifest_is_uploaded_last(s3_bucket, tmp_path, make_sample, monkeypatch):
    from foundation.data import ShardSetWriter

    monkeypatch.setenv("FOUNDATION_CACHE", str(tmp_path))
    url = s3_bucket.url("sets/partial")
    with ShardSetWriter(url, {"train": 1.0}, samples_per_shard=5) as writer:
        for i in range(23):
            writer.write(make_sample(i))
        names = _names(s3_bucket, url)
        assert len(names) == 4 and all(name.startswith(".train-") for name in names)  # hidden keys only
        staged = [p.name for p in (tmp_path / "staging").glob("set-*/*")]
        assert len(staged) == 1 and staged[0].startswith(".train-000004.tar.tmp-")  # only the open shard
    assert _names(s3_bucket, url) == ["manifest.json", *[f"train-{i:06d}.tar" for i in range(5)]]


def test_a_failed_upload_publishes_nothing_and_keeps_the_old_set(
    s3_bucket, tmp_path, make_sample, monkeypatch
):
    import foundation.data.upload as upload

    monkeypatch.setattr(upload, "DEFAULT_RETRY", upload.RetryPolicy(1, 0.001, 0.01))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: ours are tested
    url = s3_bucket.url("sets/kept")
    _write_set(url, 30, make_sample)
    before = _names(s3_bucket, url)
    old_manifest = s3_bucket.fs.cat_file(f"{url}/manifest.json")
    s3_bucket.proxy.failing_puts = {".train-000001.tar.tmp-"}
    with pytest.raises(DataError) as caught:
        _write_set(url, 41, make_sample, overwrite=True)
    message = str(caught.value)
    assert "train-000001.tar" in message and url in message and "nothing was published" in message
    assert "\n" not in message and "2 times" in message
    assert _names(s3_bucket, url) == before  # no temporary object left, no shard replaced
    assert s3_bucket.fs.cat_file(f"{url}/manifest.json") == old_manifest


def test_an_existing_s3_set_is_not_overwritten_unasked(s3_bucket, tmp_path, make_sample):
    url = s3_bucket.url("sets/twice")
    _write_set(url, 30, make_sample)
    with pytest.raises(DataError, match=f"{url} already holds a shard set; refusing to overwrite"):
        _write_set(url, 30, make_sample)
    _write_set(url, 12, make_sample, overwrite=True)  # fewer shards: the old ones are removed
    manifest = RemoteShardSet(url, tmp_path / "cache").manifest
    listed = {s.name for split in manifest.splits.values() for s in split.shards}
    assert set(_names(s3_bucket, url)) == listed | {"manifest.json"}
    assert sum(split.samples for split in manifest.splits.values()) == 12


def test_unlisted_shards_at_the_url_are_refused(s3_bucket, tmp_path, make_sample):
    url = s3_bucket.url("sets/stray")
    s3_bucket.fs.pipe_file(f"{url}/train-000007.tar", b"left over")
    with pytest.raises(DataError, match=r"shards not listed in a manifest \(train-000007\.tar"):
        _write_set(url, 10, make_sample)
    _write_set(url, 10, make_sample, overwrite=True)
    assert "train-000007.tar" not in _names(s3_bucket, url)


def test_a_set_published_meanwhile_stops_the_writer(s3_bucket, tmp_path, make_sample):
    from foundation.data import ShardSetWriter

    url = s3_bucket.url("sets/race")
    with pytest.raises(DataError, match="another process published a shard set there"):
        with ShardSetWriter(url, {"train": 1.0}, samples_per_shard=5) as writer:
            for i in range(12):
                writer.write(make_sample(i))
            _write_set(url, 10, make_sample)  # the other writer, done first
    assert not [name for name in _names(s3_bucket, url) if name.startswith(".")]


def test_prepare_xval_writes_to_s3(s3_bucket, tmp_path, capsys):
    import json

    from foundation.cli import main
    from tests.testkit.same_shards import assert_same_shard_sets

    corpus = tmp_path / "stars.jsonl"
    lines = [{"text": f"star {i}: mass = {1.5 * i}, radius = {0.1 * i}"} for i in range(60)]
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["prepare", "xval", str(corpus), "--vocab-size", "64", "--samples-per-shard", "16"]
    url = s3_bucket.url("sets/xval")
    assert main([*args, "--out", url]) == 0
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert_same_shard_sets(_get(s3_bucket, url, tmp_path / "got"), tmp_path / "local")
    capsys.readouterr()
    assert main([*args, "--out", url]) == 2
    assert f"{url} already holds a shard set" in capsys.readouterr().err


def test_prepare_mpp_writes_to_s3(s3_bucket, tmp_path, capsys):
    from foundation.cli import main
    from tests.mpp.test_mpp_pipeline import _toy_well_file
    from tests.testkit.same_shards import assert_same_shard_sets

    for i in range(2):
        _toy_well_file(tmp_path / "toy" / f"toy{i}.hdf5", seed=i, n_traj=2)
    args = ["prepare", "mpp", str(tmp_path / "toy"), "--history", "2", "--stride", "2"]
    args += ["--samples-per-shard", "4", "--split-fractions", "train=0.5,valid=0.5"]
    url = s3_bucket.url("sets/mpp")
    assert main([*args, "--out", url]) == 0
    assert f"wrote shard set {url}" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert_same_shard_sets(_get(s3_bucket, url, tmp_path / "got"), tmp_path / "local")


def test_export_from_an_s3_set_gives_the_local_embeddings(s3_bucket, tmp_path, monkeypatch):
    from foundation.embeddings import open_embeddings
    from foundation.export import ExportSettings, export_embeddings, load_model
    from tests.testkit import toyfamily
    from tests.testkit.shards import write_galaxy_shards

    monkeypatch.setenv("FOUNDATION_CACHE", str(tmp_path / "cache"))
    local = write_galaxy_shards(tmp_path / "galaxies")
    url = s3_bucket.upload(local, "sets/galaxies")
    toyfamily.write_checkpoint(tmp_path / "model.pt", local)
    loaded = load_model(tmp_path / "model.pt")
    settings = {"batch_size": 16, "num_workers": 0}
    export_embeddings(loaded, url, tmp_path / "remote.h5", ExportSettings(**settings))
    export_embeddings(loaded, local, tmp_path / "local.h5", ExportSettings(**settings))
    with open_embeddings(tmp_path / "remote.h5") as remote, open_embeddings(tmp_path / "local.h5") as here:
        assert remote.ids.tolist() == here.ids.tolist() and len(here.ids) == 120
        for modality in ("image", "spectrum"):
            np.testing.assert_array_equal(remote.vectors(modality), here.vectors(modality))
        assert remote.attrs["data"] == url
        assert remote.attrs["data_manifest_sha256"] == here.attrs["data_manifest_sha256"]


def test_a_split_is_added_to_an_s3_set_as_to_a_folder(s3_bucket, tmp_path, write_split):
    url = s3_bucket.url("sets/splits")
    for out in (url, tmp_path / "local"):
        write_split(out, 23, 10, split="train", family="test")
        write_split(out, 7, 10, split="valid", family="test")
    manifest = RemoteShardSet(url, tmp_path / "cache").manifest
    assert {name: split.samples for name, split in manifest.splits.items()} == {"train": 23, "valid": 7}
    for split in ("train", "valid"):
        assert_same_batches(
            stream_keys_and_flux(RemoteShardSet(url, tmp_path / "cache"), split=split),
            stream_keys_and_flux(tmp_path / "local", split=split),
        )
    with pytest.raises(DataError, match=r"already holds split\(s\) valid"):
        write_split(url, 7, 10, split="valid", family="test")
