"""Damaged shard sets: the loader fails clearly, `foundation shards verify` names shard and member."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from torch.utils.data import DataLoader

from foundation.cli import main
from foundation.data import Manifest, ShardDataset, tario
from foundation.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


@pytest.fixture
def damaged(small_set, tmp_path):
    """A private copy of the small set and a function to flip one byte of a member."""
    target = tmp_path / "set"
    shutil.copytree(small_set, target)

    def flip(shard: str, member_suffix: str, where: str = "data", index: int = 0) -> str:
        path = target / shard
        raw = bytearray(path.read_bytes())
        members = [m for m in tario.walk(bytes(raw), shard) if m.name.endswith(member_suffix)]
        member = members[index]
        pos = member.offset + member.size - 1 if where == "data" else member.header + 130  # size field
        raw[pos] ^= 0x01
        path.write_bytes(bytes(raw))
        return member.name

    return target, flip


def _first_error(loader) -> str:
    """The DataError a loader raises, with its worker processes shut down right away (an iterator
    kept alive by the exception's traceback takes torch ~5 s to shut down in the garbage collector)."""
    it = iter(loader)
    try:
        for _ in it:
            pass
    except DataError as exc:
        return str(exc)
    finally:
        getattr(it, "_shutdown_workers", lambda: None)()
    raise AssertionError("no DataError raised")


def _verify(path, *extra, capsys):
    code = main(["shards", "verify", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_verify_ok(small_set, capsys):
    code, text = _verify(small_set, capsys=capsys)
    assert code == 0 and "OK: 11 shards, 103 samples" in text


def test_verify_names_shard_and_member_of_a_flipped_data_byte(damaged, capsys):
    path, flip = damaged
    member = flip("train-000004.tar", ".flux.npy", index=3)
    code, text = _verify(path, capsys=capsys)
    assert code == 1
    assert f"shard train-000004.tar member {member!r}: data does not match its CRC-32" in text
    assert text.count("problem:") == 1


def test_verify_all_lists_every_problem(damaged, capsys):
    path, flip = damaged
    m1 = flip("train-000001.tar", ".meta.json", index=2)
    m2 = flip("train-000007.tar", ".flux.npy", index=0)
    flip("train-000009.tar", ".name.txt", where="header", index=1)
    (path / "train-000010.tar").unlink()
    code, text = _verify(path, "--all", capsys=capsys)
    assert code == 1
    assert m1 in text and m2 in text
    assert "train-000009.tar: sha256 does not match" in text and "fails its checksum" in text
    assert "train-000010.tar: listed in the manifest but missing" in text
    assert "field 'meta': cannot decode json member" in text  # the damaged JSON is also undecodable
    assert text.count("problem:") == 5


def test_loader_fails_clearly_on_truncated_and_corrupted_shards(damaged):
    path, flip = damaged
    shard = path / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    for workers in (0, 2):
        ds = ShardDataset(path, "train", batch_size=103, shuffle=False, drop_last=False)
        message = _first_error(DataLoader(ds, batch_size=None, num_workers=workers))
        assert re.search("train-000002.tar: .* bytes on disk but the manifest records", message)
    # same damage, manifest edited to match the size: the tar walk itself notices the truncation
    with pytest.raises(DataError, match="truncated tar archive"):
        tario.walk(shard.read_bytes(), shard.name)
    flip("train-000005.tar", ".label.json", where="header")
    ds = ShardDataset(path, "train", batch_size=103, shuffle=False, drop_last=False, fields=["z"])
    ds.split_info.shards[2] = ds.split_info.shards[2].__class__(
        "train-000000.tar", 10, (path / "train-000000.tar").stat().st_size, "0" * 64
    )
    with pytest.raises(DataError, match="train-000005.tar: tar header of member .* fails its checksum"):
        list(ds)


def test_corrupted_npy_header_is_named(damaged):
    path, _ = damaged
    shard = path / "train-000003.tar"
    raw = bytearray(shard.read_bytes())
    member = next(m for m in tario.walk(bytes(raw), shard.name) if m.name.endswith(".flux.npy"))
    raw[member.offset + 1] ^= 0xFF  # break the NUMPY magic
    shard.write_bytes(bytes(raw))
    ds = ShardDataset(path, "train", batch_size=103, shuffle=False, drop_last=False)
    key = member.name.split(".")[0]
    with pytest.raises(
        DataError, match=rf"shard train-000003.tar sample '{key}' field 'flux': corrupted .npy member"
    ):
        list(ds)


def test_flipped_data_byte_caught_by_optional_sha256_check(damaged):
    path, flip = damaged
    flip("train-000006.tar", ".flux.npy")
    assert len(list(ShardDataset(path, "train", batch_size=103, drop_last=False)))  # not detectable cheaply
    with pytest.raises(DataError, match="train-000006.tar: sha256 .* does not match"):
        list(ShardDataset(path, "train", batch_size=103, drop_last=False, check_sha256=True))


def test_damaged_manifest_and_extra_file(small_set, tmp_path, capsys):
    target = tmp_path / "set"
    shutil.copytree(small_set, target)
    data = json.loads((target / "manifest.json").read_text())
    data["format"]["version"] = 99
    (target / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="newer than this package reads"):
        Manifest.load(target)
    code, text = _verify(target, capsys=capsys)
    assert code == 2 and "error: " in text and "newer" in text
    (target / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest"):
        Manifest.load(target)
    data["format"]["version"] = 1
    data["schema"]["flux"]["dtype"] = "object"
    (target / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="schema.flux: dtype 'object' is not storable"):
        Manifest.load(target)


def test_info_prints_splits_and_schema(small_set, capsys):
    assert main(["shards", "info", str(small_set)]) == 0
    text = capsys.readouterr().out
    assert "train  11" in text and "103" in text
    assert "flux   npy     float32  [6]" in text
    assert "family     test" in text
