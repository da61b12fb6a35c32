"""Writer and manifest: round trips, the on-disk format, refusals, atomicity, statistics."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from foundation.data import Manifest, ShardReader, ShardSetWriter, ShardWriter, split_for_key
from foundation.errors import DataError

DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
]  # fmt: skip
SHAPES = [(), (1,), (5,), (3, 4), (2, 0, 3), (2, 3, 4, 2)]


def _array(dtype: str, shape: tuple, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("complex"):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.normal(size=shape).astype(dtype) * 1e3


def test_round_trip_every_dtype_and_shape(tmp_path):
    fields = {f"{d}_{len(s)}d{'x'.join(map(str, s))}": (d, s) for d in DTYPES for s in SHAPES}
    samples = []
    for i in range(3):
        sample = {"__key__": f"s{i}"}
        for name, (dtype, shape) in fields.items():
            sample[name] = _array(dtype, shape, i)
        sample.update(
            flag=bool(i % 2), count=-(2**62) + i, value=1.5e-300 * (i + 1), nan=float("nan"),
            text=f"naïve ∂ {i}\nline", meta={"a": [1, 2.5, None], "b": {"c": "d"}}, nothing=None,
            npscalar=np.float32(i + 0.25), big_endian=np.arange(4, dtype=">i4") + i,
            fortran=np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3) + i),
        )  # fmt: skip
        samples.append(sample)
    # the all-NaN field is on purpose: round-tripping NaN is tested here, not the degenerate check
    with ShardWriter(tmp_path, split="train", samples_per_shard=2, allow_degenerate=True) as writer:
        for sample in samples:
            writer.write(sample)
    manifest = Manifest.load(tmp_path)
    for name, (dtype, shape) in fields.items():
        assert manifest.schema[name].dtype == dtype and manifest.schema[name].shape == shape
    assert manifest.schema["flag"].kind == "scalar" and manifest.schema["flag"].dtype == "bool"
    assert manifest.schema["count"].dtype == "int64" and manifest.schema["value"].dtype == "float64"
    assert manifest.schema["npscalar"].kind == "npy" and manifest.schema["npscalar"].shape == ()
    assert manifest.schema["big_endian"].dtype == "int32"
    got = []
    for info in manifest.split("train").shards:
        reader = ShardReader(tmp_path / info.name, manifest.schema, expected_bytes=info.bytes)
        got += [reader.sample(i) for i in range(len(reader))]
    assert [g["__key__"] for g in got] == ["s0", "s1", "s2"]
    for want, have in zip(samples, got, strict=True):
        assert set(have) == set(want)
        for name, value in want.items():
            if isinstance(value, np.generic):
                value = np.asarray(value)  # numpy scalars are stored as 0-d arrays
            if isinstance(value, np.ndarray):
                assert have[name].dtype == value.dtype.newbyteorder("=") and have[name].shape == value.shape
                np.testing.assert_array_equal(have[name], value)
                assert have[name].flags.writeable
            elif isinstance(value, float) and np.isnan(value):
                assert np.isnan(have[name])
            else:
                assert have[name] == value and type(have[name]) is type(value)


def test_format_ustar_gnu_no_pax_fixed_mtime_and_member_names(tmp_path):
    long_key = "k" * 150  # needs a GNU long-name record, never PAX
    with ShardWriter(tmp_path, samples_per_shard=10) as writer:
        writer.write({"__key__": "a-1", "x": np.zeros(3, np.float32), "t": "hi"})
        writer.write({"__key__": long_key, "x": np.ones(3, np.float32), "t": "yo"})
    raw = (tmp_path / "train-000000.tar").read_bytes()
    typeflags = []
    pos = 0
    while raw[pos : pos + 512] != b"\0" * 512:
        typeflags.append(raw[pos + 156 : pos + 157])
        assert raw[pos + 257 : pos + 265] == b"ustar  \0"  # GNU magic
        size = int(raw[pos + 124 : pos + 136].strip(b"\0 ") or b"0", 8)
        pos += 512 + size + (-size % 512)
    assert b"x" not in typeflags and b"g" not in typeflags
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a-1.t.txt", "a-1.x.npy", f"{long_key}.t.txt", f"{long_key}.x.npy"]
    assert all(m.mtime == 0 and not m.pax_headers and m.uid == 0 and m.isfile() for m in members)


def test_same_samples_give_identical_shards(tmp_path, write_split):
    for name in ("a", "b"):
        write_split(tmp_path / name, 25, 10)
    a, b = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert [s.sha256 for s in a.split("train").shards] == [s.sha256 for s in b.split("train").shards]
    for s in a.split("train").shards:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()


def test_manifest_content(tmp_path, make_sample):
    tok = tmp_path / "tok.json"
    tok.write_text('{"vocab": [1, 2]}')
    out = tmp_path / "set"
    with ShardSetWriter(
        out, {"train": 0.7, "valid": 0.3}, samples_per_shard=8, family="xval", stats={"mean": 1.0},
        extra={"note": "x"}, files={"tokenizer.json": tok}, provenance={"sources": ["a.jsonl"]}, seed=7,
        schema={"flux": {"unit": "Jy", "description": "flux density"}},
    ) as writer:  # fmt: skip
        for i in range(50):
            writer.write(make_sample(i))
        writer.stats["late"] = 2
    data = json.loads((out / "manifest.json").read_text())
    assert data["format"] == {"name": "foundation-shards", "version": 1, "member_crc32": True}
    assert (
        data["family"] == "xval"
        and data["stats"] == {"mean": 1.0, "late": 2}
        and data["extra"] == {"note": "x"}
    )
    assert data["schema"]["flux"] == {
        "kind": "npy",
        "dtype": "float32",
        "shape": [6],
        "unit": "Jy",
        "description": "flux density",
    }
    assert data["schema"]["meta"] == {"kind": "json"} and data["schema"]["name"] == {"kind": "str"}
    assert data["provenance"]["seed"] == 7 and data["provenance"]["sources"] == ["a.jsonl"]
    assert data["provenance"]["package_version"] and data["provenance"]["created"]
    assert (
        data["files"][0]["name"] == "tokenizer.json"
        and (out / "tokenizer.json").read_text() == tok.read_text()
    )
    manifest = Manifest.load(out)
    assert manifest.file_path("tokenizer.json") == out / "tokenizer.json"
    assert manifest.split("train").samples + manifest.split("valid").samples == 50
    for split in ("train", "valid"):
        for shard in data["splits"][split]["shards"]:
            assert shard["bytes"] == (out / shard["name"]).stat().st_size
            assert shard["name"].startswith(f"{split}-")
    # routing is by key hash: recomputable from the key alone
    for split in ("train", "valid"):
        for shard in manifest.split(split).shards:
            reader = ShardReader(out / shard.name, manifest.schema)
            assert all(split_for_key(k, {"train": 0.7, "valid": 0.3}) == split for k in reader.keys)


def test_field_stats_match_numpy(tmp_path, make_sample, write_split):
    write_split(tmp_path, 40, 16)
    stats = Manifest.load(tmp_path).field_stats("train")
    flux = np.concatenate([make_sample(i)["flux"] for i in range(40)]).astype(np.float64)
    assert stats["flux"]["count"] == flux.size
    for key, ref in (("mean", flux.mean()), ("std", flux.std()), ("min", flux.min()), ("max", flux.max())):
        assert stats["flux"][key] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert stats["label"]["mean"] == pytest.approx(19.5)
    assert "name" not in stats and "meta" not in stats


def test_split_assignment_stable_when_data_grows():
    fractions = {"train": 0.8, "valid": 0.1, "test": 0.1}
    small = {f"k{i}": split_for_key(f"k{i}", fractions) for i in range(1000)}
    big = {f"k{i}": split_for_key(f"k{i}", fractions) for i in range(5000)}
    assert all(big[k] == v for k, v in small.items())
    counts = {s: sum(v == s for v in big.values()) for s in fractions}
    assert 3850 < counts["train"] < 4150 and 400 < counts["valid"] < 600


@pytest.mark.parametrize(
    "sample, message",
    [
        ({"__key__": "a.b", "x": 1}, "contains '.'"),
        ({"__key__": "a b", "x": 1}, "contains ' '"),
        ({"x": 1}, "non-empty string"),
        ({"__key__": "a", "x": np.array([object()])}, "pickle"),
        ({"__key__": "a", "x": np.array(["s"])}, "cannot be stored"),
        ({"__key__": "a", "x": b"raw"}, "raw bytes"),
        ({"__key__": "a", "x.y": 1}, "field name"),
        ({"__key__": "a", "x": 2**70}, "int64"),
        ({"__key__": "a", "x": {"arr": np.zeros(2)}}, "JSON-serialisable"),
    ],
)
def test_bad_samples_are_refused(tmp_path, sample, message):
    with pytest.raises(DataError, match=message):
        with ShardWriter(tmp_path, samples_per_shard=2) as writer:
            writer.write(sample)
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob("*.tar"))


def test_inconsistent_samples(tmp_path):
    with pytest.raises(DataError, match="lacks field"), ShardWriter(tmp_path / "a") as w:
        w.write({"__key__": "a", "x": 1, "y": 2})
        w.write({"__key__": "b", "x": 1})
    with pytest.raises(DataError, match="dtype float64 differs"), ShardWriter(tmp_path / "b") as w:
        w.write({"__key__": "a", "x": np.zeros(2, np.float32)})
        w.write({"__key__": "b", "x": np.zeros(2, np.float64)})
    with pytest.raises(DataError, match="written twice"), ShardWriter(tmp_path / "c") as w:
        w.write({"__key__": "a", "x": 1})
        w.write({"__key__": "a", "x": 1})
    with (
        pytest.raises(DataError, match="more than once"),
        ShardWriter(tmp_path / "d", samples_per_shard=1) as w,
    ):
        w.write({"__key__": "a", "x": 1})
        w.write({"__key__": "a", "x": 1})
    with (
        pytest.raises(DataError, match="schema says float32"),
        ShardWriter(tmp_path / "e", schema={"x": {"kind": "npy", "dtype": "float32", "shape": [2]}}) as w,
    ):
        w.write({"__key__": "a", "x": np.zeros(2, np.float64)})


def test_variable_dims_become_null_and_optional_fields(tmp_path):
    with ShardWriter(tmp_path, schema={"extra": {"optional": True}}) as w:
        w.write({"__key__": "a", "tokens": np.arange(5, dtype=np.int32), "img": np.ones((3, 4, 4)) * 2})
        w.write(
            {"__key__": "b", "tokens": np.arange(9, dtype=np.int32), "img": np.ones((3, 8, 4)), "extra": "x"}
        )
    schema = Manifest.load(tmp_path).schema
    assert schema["tokens"].shape == (None,) and schema["img"].shape == (3, None, 4)
    assert schema["extra"].optional and schema["extra"].kind == "str"


def test_refuses_to_overwrite_and_adds_splits(tmp_path, write_split):
    write_split(tmp_path, 20, 8, family="test", stats={"norm": 1})
    before = (tmp_path / "train-000000.tar").read_bytes()
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_split(tmp_path, 5, 8)
    with pytest.raises(DataError, match="refusing to overwrite"):
        ShardSetWriter(tmp_path)
    assert (tmp_path / "train-000000.tar").read_bytes() == before
    write_split(tmp_path, 6, 4, split="valid")  # adding a split keeps the others
    manifest = Manifest.load(tmp_path)
    assert manifest.split("train").samples == 20 and manifest.split("valid").samples == 6
    assert manifest.stats == {"norm": 1} and manifest.family == "test"
    with pytest.raises(DataError, match="family 'test'"):
        write_split(tmp_path, 3, 4, split="test", family="other")
    write_split(tmp_path, 5, 8, overwrite=True)  # replaces train only
    manifest = Manifest.load(tmp_path)
    assert manifest.split("train").samples == 5 and manifest.split("valid").samples == 6
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [
        "train-000000.tar",
        "valid-000000.tar",
        "valid-000001.tar",
    ]


def test_failed_write_leaves_directory_untouched(tmp_path, make_sample, write_split):
    write_split(tmp_path, 20, 8)
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    class Boom(Exception):
        pass

    with pytest.raises(Boom), ShardWriter(tmp_path, split="train", samples_per_shard=4, overwrite=True) as w:
        for i in range(10):
            w.write(make_sample(100 + i))
        raise Boom
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == snapshot
    # a crash before close leaves only unlisted shards, which a new writer refuses to silently adopt
    (tmp_path / "test-000000.tar").write_bytes(b"junk")
    with pytest.raises(DataError, match="not listed in a manifest"):
        ShardWriter(tmp_path, split="test")


def test_stats_are_checked_before_anything_is_published(tmp_path, make_sample):
    with pytest.raises(DataError, match="JSON-serialisable"):
        with ShardSetWriter(tmp_path, samples_per_shard=4, stats={"bad": object()}) as writer:
            for i in range(10):
                writer.write(make_sample(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with ShardSetWriter(
        tmp_path, samples_per_shard=4, stats={"std": float("nan"), "arr": np.ones(2)}
    ) as writer:
        writer.write(make_sample(0))
    assert Manifest.load(tmp_path).stats == {"std": None, "arr": [1.0, 1.0]}
