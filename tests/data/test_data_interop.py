"""Interop with the plain `webdataset` library, both directions."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import webdataset as wds

from foundation.cli import main
from foundation.data import Manifest, ShardDataset
from foundation.errors import DataError


def test_our_shards_open_in_plain_webdataset(small_set, make_sample):
    manifest = Manifest.load(small_set)
    urls = [str(p) for p in manifest.shard_paths("train")]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        want = make_sample(int(sample["__key__"].split("-")[1]))
        np.testing.assert_array_equal(sample["flux.npy"], want["flux"])
        assert sample["flux.npy"].dtype == np.float32
        assert sample["label.json"] == want["label"] and isinstance(sample["label.json"], int)
        assert sample["z.json"] == want["z"] and isinstance(sample["z.json"], float)
        assert sample["name.txt"] == want["name"]
        assert sample["meta.json"] == want["meta"]
        seen += 1
    assert seen == 103


def _write_with_webdataset(directory, n_per_shard=6, shards=3, extra=None):
    directory.mkdir(parents=True, exist_ok=True)
    pattern = str(directory / "train-%06d.tar")
    # webdataset's defaults: float mtime (-> PAX headers), its own encoders
    with wds.ShardWriter(pattern, maxcount=n_per_shard, verbose=0) as sink:
        for i in range(n_per_shard * shards):
            sample = {
                "__key__": f"w{i:04d}",
                "image.npy": np.full((2, 3), i, dtype=np.float32),
                "cls": i % 3,
                "caption.txt": f"sample {i}",
                "meta.json": {"i": i},
            }
            sample.update(extra or {})
            sink.write(sample)


def test_webdataset_written_shards_need_a_manifest_then_read_back(tmp_path, capsys):
    directory = tmp_path / "wds"
    _write_with_webdataset(directory)
    with tarfile.open(directory / "train-000000.tar") as tar:
        assert any(m.pax_headers for m in tar.getmembers())  # webdataset did write PAX headers
    with pytest.raises(DataError, match="foundation shards index"):
        ShardDataset(directory, "train")
    assert main(["shards", "index", str(directory), "--family", "test"]) == 0
    assert "train 18 samples in 3 shards" in capsys.readouterr().out
    manifest = Manifest.load(directory)
    assert manifest.schema["image"].shape == (2, 3) and manifest.schema["cls"].dtype == "int64"
    assert manifest.schema["meta"].kind == "json" and manifest.schema["caption"].kind == "str"
    assert not manifest.member_crc32
    batches = list(ShardDataset(directory, "train", batch_size=6, shuffle=False, drop_last=False))
    keys = sum((b["__key__"] for b in batches), [])
    assert keys == [f"w{i:04d}" for i in range(18)]
    flat = np.concatenate([b["image"].numpy() for b in batches])
    assert all((flat[i] == i).all() for i in range(18))
    assert sum((b["cls"].tolist() for b in batches), []) == [i % 3 for i in range(18)]
    assert main(["shards", "verify", str(directory)]) == 0
    assert main(["shards", "index", str(directory)]) == 2  # refuses to replace the manifest


def test_pickle_members_are_refused(tmp_path):
    directory = tmp_path / "wds"
    _write_with_webdataset(directory, shards=1, extra={"obj.pyd": {"a": 1}})
    from foundation.data.index import index_shards

    with pytest.raises(DataError, match="pickled members are never read"):
        index_shards(directory)
