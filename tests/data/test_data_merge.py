"""`foundation shards merge`: partial shard sets joined into one equal to a set written in one go."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from foundation.cli import main
from foundation.data import Manifest, ShardDataset, ShardSetWriter
from foundation.data.merge import merge_shard_sets
from foundation.data.summary import DegenerateDataError
from foundation.data.verify import verify_shard_set
from foundation.errors import DataError
from tests.testkit.same_shards import members_by_key

FRACTIONS = {"train": 0.6, "valid": 0.2, "test": 0.2}
N = 150


def _sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    flux = rng.normal(2.0, 1.5, size=6).astype(np.float32)
    if i % 11 == 0:
        flux[1] = np.nan
    return {
        "__key__": f"obj-{i:05d}",
        "flux": flux,
        "flux_mask": rng.random(6) < 0.2,
        "label": i,
        "z": float(i) / 10,
        "name": f"object {i}",
        "meta": {"index": i},
    }


def _write(path: Path, indices, *, family="test", salt="7", stats=None, sample=_sample, **kwargs) -> Path:
    with ShardSetWriter(
        path,
        FRACTIONS,
        samples_per_shard=7,
        family=family,
        seed=7,
        split_salt=salt,
        stats=stats if stats is not None else {"scale": 1.5},
        provenance={"sources": [f"{path.name}.txt"]},
        **kwargs,
    ) as writer:
        for i in indices:
            writer.write(sample(i))
    return path


def _parts(tmp_path: Path, count: int = 3, **kwargs) -> list[Path]:
    """The same N samples as the one-go set, partitioned by key (index modulo `count`)."""
    return [_write(tmp_path / f"part-{k}", range(k, N, count), **kwargs) for k in range(count)]


def _assert_same_stats(merged: dict, whole: dict) -> None:
    """Counts and min/max exactly; mean/std to 1e-12 relative: both are sums of the same numbers
    in another order (the pairwise update per part, then across parts), so only rounding differs."""
    assert merged.keys() == whole.keys()
    for name, entry in whole.items():
        got = merged[name]
        assert got.keys() == entry.keys(), name
        for key, value in entry.items():
            if key in ("mean", "std"):
                assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-12), (name, key)
            else:
                assert got[key] == value, (name, key)


@pytest.fixture
def whole_and_parts(tmp_path):
    whole = _write(tmp_path / "whole", range(N))
    return whole, _parts(tmp_path)


def test_merged_set_equals_the_set_written_in_one_go(whole_and_parts, tmp_path):
    whole, parts = whole_and_parts
    out = tmp_path / "merged"
    merged = merge_shard_sets(list(reversed(parts)), out)  # the order given does not matter
    reference = Manifest.load(whole)
    assert merged.schema == reference.schema
    assert merged.split_rule == reference.split_rule
    assert merged.stats == reference.stats
    for split in FRACTIONS:
        assert members_by_key(out, split) == members_by_key(whole, split)
        _assert_same_stats(merged.field_stats(split), reference.field_stats(split))
        assert merged.split(split).samples == reference.split(split).samples
    assert [p["part"] for p in merged.provenance["merged_from"]] == [str(p) for p in parts]
    assert merged.provenance["sources"] == ["part-0.txt", "part-1.txt", "part-2.txt"]
    assert verify_shard_set(out).ok
    for split in FRACTIONS:
        keys = [k for batch in ShardDataset.in_order(out, split, batch_size=8) for k in batch["__key__"]]
        want = [k for batch in ShardDataset.in_order(whole, split, batch_size=8) for k in batch["__key__"]]
        assert sorted(keys) == sorted(want) and len(set(keys)) == len(keys)


def test_merge_is_deterministic_and_renumbers_in_part_name_order(whole_and_parts, tmp_path):
    _, parts = whole_and_parts
    a = merge_shard_sets(parts, tmp_path / "a", link=False)
    b = merge_shard_sets(list(reversed(parts)), tmp_path / "b")
    assert [s.to_dict() for s in a.split("train").shards] == [s.to_dict() for s in b.split("train").shards]
    names = [s.name for s in a.split("train").shards]
    assert names == [f"train-{i:06d}.tar" for i in range(len(names))]
    assert (tmp_path / "a" / names[0]).stat().st_nlink == 1  # copied
    assert (tmp_path / "b" / names[0]).stat().st_nlink == 2  # hard-linked to part-0's shard
    first = Manifest.load(parts[0]).split("train").shards
    assert [s.sha256 for s in a.split("train").shards[: len(first)]] == [s.sha256 for s in first]


def test_cli_merge_then_verify(whole_and_parts, tmp_path, capsys):
    _, parts = whole_and_parts
    out = tmp_path / "cli"
    assert main(["shards", "merge", *map(str, parts), "--out", str(out), "--progress", "off"]) == 0
    assert f"merged 3 part(s) into {out}" in capsys.readouterr().out
    assert main(["shards", "verify", str(out)]) == 0
    assert main(["shards", "merge", *map(str, parts), "--out", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_existing_out_is_replaced_only_with_overwrite(whole_and_parts, tmp_path):
    _, parts = whole_and_parts
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        merge_shard_sets(parts, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_shard_sets(parts, out, overwrite=True)
    assert not (out / "keep.txt").exists() and verify_shard_set(out).ok
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_corrupt_shard_in_a_part_publishes_nothing(whole_and_parts, tmp_path):
    _, parts = whole_and_parts
    shard = Manifest.load(parts[1]).shard_paths("train")[0]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"part {parts[1]}: shard train-000000.tar: sha256 does not match"):
        merge_shard_sets(parts, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_truncated_shard_is_refused(whole_and_parts, tmp_path):
    _, parts = whole_and_parts
    shard = Manifest.load(parts[0]).shard_paths("valid")[0]
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(DataError, match="has .* bytes, its manifest records"):
        merge_shard_sets(parts, tmp_path / "out")


def test_overlapping_parts_are_refused_naming_both(tmp_path):
    a = _write(tmp_path / "part-a", range(0, 60))
    b = _write(tmp_path / "part-b", range(50, 100))
    with pytest.raises(
        DataError, match=r"sample key 'obj-000\d\d' is in both part .*part-a .* and part .*part-b"
    ):
        merge_shard_sets([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"family": "other"}, r"family differs"),
        ({"salt": "8"}, r"split_rule\.salt differs"),
        ({"stats": {"scale": 2.0}}, r"stats\.scale differs"),
        ({"extra": {"bands": ["g"]}}, r"extra\.bands differs"),
    ],
)
def test_incompatible_parts_are_refused_naming_part_and_key(tmp_path, change, message):
    a = _write(tmp_path / "part-a", range(0, 50))
    b = _write(tmp_path / "part-b", range(50, 100), **change)
    with pytest.raises(DataError, match=rf"part {b}: {message} from part {a}'s"):
        merge_shard_sets([a, b], tmp_path / "out")


def test_schema_mismatch_is_refused(tmp_path):
    def as_float64(i):
        s = _sample(i)
        s["flux"] = s["flux"].astype(np.float64)
        return s

    a = _write(tmp_path / "part-a", range(0, 50))
    b = _write(tmp_path / "part-b", range(50, 100), sample=as_float64)
    with pytest.raises(DataError, match=rf"part {b}: schema\.flux\.dtype is 'float64' but 'float32'"):
        merge_shard_sets([a, b], tmp_path / "out")


def test_extra_files_must_be_the_same(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text("{}")
    two.write_text('{"a": 1}')
    a = _write(tmp_path / "part-a", range(0, 50), files={"tokenizer.json": one})
    b = _write(tmp_path / "part-b", range(50, 100), files={"tokenizer.json": two})
    with pytest.raises(DataError, match=rf"part {b}: files\.tokenizer\.json differs"):
        merge_shard_sets([a, b], tmp_path / "out")
    c = _write(tmp_path / "part-c", range(50, 100), files={"tokenizer.json": one})
    merged = merge_shard_sets([a, c], tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}" and "tokenizer.json" in merged.files


def test_degenerate_merged_set_is_refused_unless_allowed(tmp_path):
    def constant(i):
        s = _sample(i)
        s["flux"] = np.full(6, 3.0, np.float32)
        return s

    a = _write(tmp_path / "part-a", range(0, 40), sample=constant, allow_degenerate=True)
    b = _write(tmp_path / "part-b", range(40, 80), sample=constant, allow_degenerate=True)
    with pytest.raises(DegenerateDataError, match="field 'flux' is constant"):
        merge_shard_sets([a, b], tmp_path / "out")
    merged = merge_shard_sets([a, b], tmp_path / "out", allow_degenerate=True)
    assert "flux" in merged.provenance["degenerate_fields"]


def _xval_stats(records: int, text_tokens: float, normalizer=None) -> dict:
    return {
        "normalizer": normalizer or {"kind": "median", "fields": {"a": 1.0}},
        "lengths": {
            "text_tokens": text_tokens,
            "numbers": 2.0,
            "max_tokens_xval": records,
            "train_records": records,
        },
        "clipped_train_values": records,
    }


def test_xval_lengths_combine_and_a_per_part_normaliser_is_refused(tmp_path):
    a = _write(tmp_path / "part-a", range(0, 50), family="xval", stats=_xval_stats(30, 10.0))
    b = _write(tmp_path / "part-b", range(50, 100), family="xval", stats=_xval_stats(10, 20.0))
    stats = merge_shard_sets([a, b], tmp_path / "out").stats
    assert stats["lengths"] == {
        "text_tokens": 12.5,
        "numbers": 2.0,
        "max_tokens_xval": 30,
        "train_records": 40,
    }
    assert stats["clipped_train_values"] == 40
    c = _write(
        tmp_path / "part-c",
        range(50, 100),
        family="xval",
        stats=_xval_stats(10, 20.0, {"kind": "median", "fields": {"a": 2.0}}),
    )
    with pytest.raises(DataError, match=r"stats\.normalizer\.fields\.a differs .*--vocab-from"):
        merge_shard_sets([a, c], tmp_path / "out2")


def test_astroclip_sets_not_written_as_parts_of_the_sky_are_refused_with_the_reason(tmp_path):
    a = _write(tmp_path / "part-a", range(0, 50), family="astroclip", stats={"image_scale_floor": 0.1})
    b = _write(tmp_path / "part-b", range(50, 100), family="astroclip", stats={"image_scale_floor": 0.2})
    with pytest.raises(DataError, match=r"part-a was not written by `prepare astroclip --part I/N`"):
        merge_shard_sets([a, b], tmp_path / "out")


def test_a_part_given_twice_or_out_inside_a_part_is_refused(whole_and_parts):
    _, parts = whole_and_parts
    with pytest.raises(DataError, match="is given twice"):
        merge_shard_sets([parts[0], parts[0]], parts[0].parent / "out")
    with pytest.raises(DataError, match="merge into a new folder"):
        merge_shard_sets(parts, parts[0] / "sub")


def test_a_part_without_field_stats_is_refused(tmp_path):
    a = _write(tmp_path / "part-a", range(0, 50))
    b = _write(tmp_path / "part-b", range(50, 100), field_stats=False)
    with pytest.raises(DataError, match=rf"part {b}: splits\.\w+\.field_stats lacks field\(s\) \['flux'"):
        merge_shard_sets([a, b], tmp_path / "out")


def _well_layout(root: Path) -> Path:
    """A Well data set folder, `toy/data/<split>/*.hdf5`: two train files, one valid, one test."""
    from tests.mpp.test_mpp_pipeline import _toy_well_file

    for i, (split, name) in enumerate([("train", "a"), ("train", "b"), ("valid", "c"), ("test", "d")]):
        _toy_well_file(root / "toy" / "data" / split / f"{name}.hdf5", seed=i, n_traj=2)
    return root / "toy"


MPP_ARGS = ["--history", "2", "--stride", "3", "--samples-per-shard", "4"]


@pytest.fixture(scope="module")
def mpp_well_parts(tmp_path_factory):
    """One prepare of a Well layout, and its two parts (`--part I/2`)."""
    root = tmp_path_factory.mktemp("mpp-well")
    data = _well_layout(root)
    assert main(["prepare", "mpp", str(data), "--out", str(root / "whole"), *MPP_ARGS]) == 0
    parts = [root / f"part-{i}" for i in range(2)]
    for i, part in enumerate(parts):
        assert main(["prepare", "mpp", str(data), "--out", str(part), "--part", f"{i}/2", *MPP_ARGS]) == 0
    return root, parts


@pytest.mark.slow
def test_mpp_parts_of_a_well_layout_list_sources_in_split_order(mpp_well_parts, tmp_path):
    from tests.mpp.test_mpp_pipeline import _assert_same_set_as_one_run

    root, parts = mpp_well_parts
    merge_shard_sets(parts, tmp_path / "merged")
    _assert_same_set_as_one_run(tmp_path / "merged", root / "whole")
    sources = Manifest.load(tmp_path / "merged").extra["mpp"]["datasets"]["toy"]["sources"]
    assert [Path(s).parent.name for s in sources] == ["train", "train", "valid", "test"]
    # The same order when the files are found by a recursive search (sorted by path: test first).
    assert (
        main(["prepare", "mpp", str(root / "toy" / "data"), "--out", str(tmp_path / "found"), *MPP_ARGS]) == 0
    )
    assert Manifest.load(tmp_path / "found").extra["mpp"]["datasets"]["toy"]["sources"] == sources


@pytest.mark.slow
def test_mpp_parts_without_element_counts_are_recomputed_from_their_train_shards(mpp_well_parts, tmp_path):
    """A part written before prepare stored `count` per field: its sums are read back from its
    training windows, so the merge still gives one prepare's statistics (to rounding)."""
    from tests.mpp.test_mpp_pipeline import _assert_same_set_as_one_run

    root, parts = mpp_well_parts
    old = tmp_path / "part-1"
    shutil.copytree(parts[1], old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["stats"]["fields"].values():
        del entry["count"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    merge_shard_sets([parts[0], old], tmp_path / "merged")
    _assert_same_set_as_one_run(tmp_path / "merged", root / "whole")


def test_out_is_locked_while_merging(whole_and_parts, tmp_path):
    from foundation.lock import FolderLock, LockedError

    _, parts = whole_and_parts
    with FolderLock(tmp_path / "out", "another merge"), pytest.raises(LockedError):
        merge_shard_sets(parts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_killed_merge_leaves_nothing_the_next_one_keeps(whole_and_parts, tmp_path):
    _, parts = whole_and_parts
    dead = tmp_path / ".out.tmp-999999"
    dead.mkdir()
    (dead / "train-000000.tar").write_bytes(b"half")
    merge_shard_sets(parts, tmp_path / "out")
    assert not dead.exists() and verify_shard_set(tmp_path / "out").ok


def test_xval_parts_prepared_with_one_vocabulary_merge_to_the_one_go_set(tmp_path):
    """The real xVal prepare: parts reusing one tokenizer and normaliser (--vocab-from) merge to
    what one prepare over all files writes; parts that fitted their own are refused."""
    from encoders.xval.prepare import PrepareOptions, prepare

    files = []
    for f in range(3):
        path = tmp_path / f"in{f}.jsonl"
        lines = [
            {"text": f"star {i} has mass {1.5 + i * 0.37 + f:.3f}" + " and radius 2.5" * (i % (f + 2))}
            for i in range(40)
        ]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        files.append(path)
    options = {
        "vocab_size": 300,
        "samples_per_shard": 16,
        "split_fractions": FRACTIONS,
        "min_field_count": 5,
        "progress": False,
    }
    prepare(files, tmp_path / "fit", PrepareOptions(**options))
    shared = PrepareOptions(**options, vocab_from=str(tmp_path / "fit"))
    whole = prepare(files, tmp_path / "whole", shared)
    parts = [prepare(files[:1], tmp_path / "part-0", shared), prepare(files[1:], tmp_path / "part-1", shared)]
    merged = merge_shard_sets([p.path for p in parts], tmp_path / "merged")
    assert merged.extra == whole.extra and merged.files == whole.files
    assert merged.stats["normalizer"] == whole.stats["normalizer"]
    assert merged.stats["clipped_train_values"] == whole.stats["clipped_train_values"]
    for key, value in whole.stats["lengths"].items():
        assert math.isclose(merged.stats["lengths"][key], value, rel_tol=1e-12), key
    for split in FRACTIONS:
        assert members_by_key(tmp_path / "merged", split) == members_by_key(whole.path, split)
        _assert_same_stats(merged.field_stats(split), whole.field_stats(split))
    own = prepare(files[1:], tmp_path / "own-1", PrepareOptions(**options))
    with pytest.raises(DataError, match=r"files\.tokenizer\.json differs .*--vocab-from"):
        merge_shard_sets([parts[0].path, own.path], tmp_path / "refused")


def test_xval_parts_by_part_option_merge_to_the_one_go_set(tmp_path):
    """`prepare xval --part I/N --vocab-from FIT` over all files, N = 2: the merged parts equal one
    prepare over all files with the same vocabulary; each part records its share."""
    files = []
    for f in range(3):
        path = tmp_path / f"in{f}.jsonl"
        lines = [{"text": f"star {i} of file {f} has mass {1.5 + i * 0.37 + f:.3f}"} for i in range(30)]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        files.append(str(path))
    common = ["--vocab-size", "300", "--samples-per-shard", "16", "--min-field-count", "5"]
    common += ["--split-fractions", "train=0.6,valid=0.2,test=0.2"]
    fit = str(tmp_path / "fit")
    assert main(["prepare", "xval", *files[:1], "--out", fit, *common]) == 0
    whole = tmp_path / "whole"
    assert main(["prepare", "xval", *files, "--out", str(whole), "--vocab-from", fit, *common]) == 0
    parts = [tmp_path / f"part-{i}" for i in range(2)]
    for i, part in enumerate(parts):
        args = ["--out", str(part), "--vocab-from", fit, "--part", f"{i}/2"]
        assert main(["prepare", "xval", *files, *args, *common]) == 0
    assert [Manifest.load(p).provenance["sources"] for p in parts] == [files[0::2], files[1:2]]
    assert Manifest.load(parts[1]).provenance["part"]["count"] == 2
    merged = merge_shard_sets(parts, tmp_path / "merged")
    one = Manifest.load(whole)
    assert merged.extra == one.extra and merged.files == one.files
    assert merged.stats["normalizer"] == one.stats["normalizer"]
    for split in FRACTIONS:
        assert members_by_key(merged.path, split) == members_by_key(whole, split)
        _assert_same_stats(merged.field_stats(split), one.field_stats(split))


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"index": 0, "count": 3}, {"index": 2, "count": 3}], r"part\(s\) \[1\] of 3 are missing"),
        ([{"index": 0, "count": 2}, {"index": 0, "count": 2}], r"are both part 0"),
        ([{"index": 0, "count": 2}, {"index": 1, "count": 3}], r"is part of 3 but part .* of 2"),
        ([{"index": 0, "count": 2}, None], r"prepared from all its inputs"),
    ],
)
def test_parts_of_a_partition_must_all_be_given_once(tmp_path, records, message):
    """`prepare --part I/N` parts: merging only some of them would silently drop their files."""
    parts = []
    for k, record in enumerate(records):
        folder = _write(tmp_path / f"part-{k}", range(k, N, len(records)))
        if record is not None:
            manifest = json.loads((folder / "manifest.json").read_text())
            manifest["provenance"]["part"] = record
            (folder / "manifest.json").write_text(json.dumps(manifest))
        parts.append(folder)
    with pytest.raises(DataError, match=message):
        merge_shard_sets(parts, tmp_path / "out")
