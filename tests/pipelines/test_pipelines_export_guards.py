"""`foundation export` checks what sits at --out, the shards' tokenizer, its options and the disk
before it trusts or writes anything; each refusal is one line and exit 2."""

from __future__ import annotations

import re

import numpy as np
import pytest

import foundation.embeddings
from foundation.cli import main
from foundation.embeddings import open_embeddings, partial_path
from foundation.lock import FolderLock
from tests.testkit import toyfamily
from tests.testkit.shards import write_galaxy_shards

PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def _export(ckpt, shards, out, *extra):
    args = ["export", "--checkpoint", str(ckpt), "--data", str(shards), "--out", str(out)]
    return main([*args, "--num-workers", "0", "--batch-size", "16", *extra])


def _one_error_line(capsys, *fragments):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def test_existing_output_of_another_checkpoint_is_refused(tmp_path, tiny_shards, tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    assert _export(ckpt, tiny_shards, out) == 0
    capsys.readouterr()
    before = out.read_bytes()
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    toyfamily.write_checkpoint(other, tiny_shards, seed=1)
    assert _export(other, tiny_shards, out) == 2
    _one_error_line(capsys, "emb.h5 exists but is not this export", "weights_sha256", "checkpoint")
    assert out.read_bytes() == before
    # Another selection of the same checkpoint differs too; the same command is "complete already".
    assert _export(ckpt, tiny_shards, out, "--splits", "test") == 2
    _one_error_line(capsys, "selection")
    assert _export(ckpt, tiny_shards, out) == 0
    assert "complete already" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["png", "directory", "foreign-hdf5"])
def test_out_that_is_not_an_export_is_refused(tmp_path, tiny_shards, tiny_checkpoint, capsys, what):
    import h5py

    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    if what == "png":
        out.write_bytes(PNG)
        fragment = "is not an HDF5 file"
    elif what == "directory":
        out.mkdir()
        fragment = "is a directory"
    else:
        with h5py.File(out, "w") as f:
            f["object_id"] = np.arange(3)
            f["image"] = np.ones((3, 8), "f4")
        fragment = "weights_sha256 not recorded"
    assert _export(ckpt, tiny_shards, out) == 2
    _one_error_line(capsys, fragment)
    for flags in (["--overwrite"],) if what != "foreign-hdf5" else ():
        assert _export(ckpt, tiny_shards, out, *flags) == 2  # never replaced, even when asked
        capsys.readouterr()
    assert out.exists()


def _shards_with_tokenizer(folder, text):
    tok = folder.parent / f"{folder.name}-tokenizer.json"
    tok.write_text(text)
    return write_galaxy_shards(folder, n=40, files={"tokenizer.json": tok})


def test_shards_tokenised_with_another_tokenizer_are_refused(tmp_path, capsys):
    trained = _shards_with_tokenizer(tmp_path / "trained", '{"vocab": {"a": 0}}')
    other = _shards_with_tokenizer(tmp_path / "other", '{"vocab": {"b": 0}}')
    ckpt = tmp_path / "model.pt"
    toyfamily.write_checkpoint(ckpt, trained)
    assert _export(ckpt, other, tmp_path / "emb.h5") == 2
    _one_error_line(capsys, "another tokenizer.json than the model's training data", "--vocab-from")
    assert not (tmp_path / "emb.h5").exists() and not partial_path(tmp_path / "emb.h5").exists()
    assert _export(ckpt, trained, tmp_path / "emb.h5") == 0


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--chunk-rows", "0"], "--chunk-rows: must lie in [1, "),
        (["--batch-size", "0"], "--batch-size: must lie in [1, "),
        (["--device", "bogus"], "expected auto, cpu, cuda or cuda:N"),
        (["--device", "cuda:7"], "cuda:7 was asked for but torch sees no CUDA device"),
    ],
)
def test_bad_options_are_one_line(tmp_path, tiny_shards, tiny_checkpoint, capsys, flags, fragment):
    import torch

    if flags[1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    ckpt, _ = tiny_checkpoint
    assert _export(ckpt, tiny_shards, tmp_path / "emb.h5", *flags) == 2
    _one_error_line(capsys, fragment)
    assert list(tmp_path.glob("emb.h5*")) == []


def test_output_in_use_by_another_export_is_refused(tmp_path, tiny_shards, tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    with FolderLock(out, "another export"):
        assert _export(ckpt, tiny_shards, out) == 2
        _one_error_line(capsys, "is in use by", "another export")
    assert not out.exists()


def test_full_disk_stops_before_hdf5_fails_and_resumes(
    tmp_path, tiny_shards, tiny_checkpoint, capsys, monkeypatch
):
    # A real full disk made HDF5's failed writes crash the process (SIGSEGV) on the next flush;
    # the writer must stop before a chunk that does not fit.
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    monkeypatch.setattr(foundation.embeddings, "free_bytes", lambda folder: 1 << 20)
    assert _export(ckpt, tiny_shards, out, "--chunk-rows", "32") == 2
    _one_error_line(capsys, "not enough free space", "the disk is full")
    assert list(tmp_path.glob("emb.h5*")) == []  # nothing committed: nothing left behind
    calls = iter(range(100))
    monkeypatch.setattr(
        foundation.embeddings, "free_bytes", lambda folder: (1 << 40) if next(calls) < 2 else 0
    )
    assert _export(ckpt, tiny_shards, out, "--chunk-rows", "32") == 2
    kept = int(re.search(r"(\d+) rows are kept in the partial file", _one_error_line(capsys)).group(1))
    assert kept >= 32 and not out.exists() and partial_path(out).exists()
    monkeypatch.setattr(foundation.embeddings, "free_bytes", lambda folder: 1 << 40)
    assert _export(ckpt, tiny_shards, out, "--chunk-rows", "32") == 0
    assert f"({120 - kept} new" in capsys.readouterr().out
    with open_embeddings(out) as emb:
        assert emb.rows == 120


def test_a_target_no_sample_carries_is_reported(tmp_path, tiny_shards, tiny_checkpoint, caplog):
    # The shards have a JSON field, so an unknown target name cannot be refused up front; it was
    # written as NaN throughout without a word.
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    assert _export(ckpt, tiny_shards, out, "--targets", "redshift,no_such_target") == 0
    assert "target 'no_such_target' has no value in any of the 120 exported samples" in caplog.text
    assert "'redshift'" not in caplog.text


def test_a_png_as_checkpoint_is_one_line(tmp_path, tiny_shards, capsys):
    png = tmp_path / "model.pt"
    png.write_bytes(PNG)
    assert _export(png, tiny_shards, tmp_path / "emb.h5") == 2
    _one_error_line(capsys, "model.pt")
