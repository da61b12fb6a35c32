"""Hostile embeddings files and options: every reader verb answers one line and exit 2, within a
memory bound, instead of allocating what a tiny file declares or printing a traceback."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from bounded_run import assert_one_line_error, run_foundation

from foundation.cli import main
from foundation.embeddings import open_embeddings
from foundation.errors import DataError

BOMB_ROWS = 2**31


def _sparse_bomb(path, *, contiguous: bool = False):
    """A few-KB embeddings file whose datasets declare 2^31 rows that were never written."""
    with h5py.File(path, "w") as f:
        f.attrs.update(format="foundation-embeddings", format_version=1, complete=True)
        f.attrs["rows"] = BOMB_ROWS
        f.attrs["modalities"] = '["image", "spectrum"]'
        layout = {} if contiguous else {"chunks": True, "maxshape": (None,)}
        f.create_dataset("object_id", shape=(BOMB_ROWS,), dtype=h5py.string_dtype(), **layout)
        for name in ("image", "spectrum"):
            vec_layout = {} if contiguous else {"chunks": (1024, 16), "maxshape": (None, 16)}
            f.create_dataset(name, shape=(BOMB_ROWS, 16), dtype="f4", **vec_layout)
        f.create_dataset("targets/redshift", shape=(BOMB_ROWS,), dtype="f8", **layout)
    return path


@pytest.mark.parametrize("contiguous", [False, True])
def test_sparse_file_declaring_billions_of_rows_is_refused_before_reading(tmp_path, contiguous):
    path = _sparse_bomb(tmp_path / "bomb.h5", contiguous=contiguous)
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"'object_id' declares 2147483648 rows .*but stores"):
        open_embeddings(path)


def test_compression_bomb_is_refused(tmp_path):
    path = tmp_path / "zeros.h5"
    n = 1_000_000
    with h5py.File(path, "w") as f:
        f.create_dataset("object_id", data=np.arange(n), compression="gzip", chunks=(1 << 18,))
        f.create_dataset("image", data=np.zeros((n, 2), "f4"), compression="gzip", chunks=(1 << 18, 2))
    with pytest.raises(DataError, match=r"'image' declares \d+ bytes compressed into \d+"):
        open_embeddings(path)


def test_bad_attributes_and_dimensions_are_one_line(tmp_path):
    cases = {
        "rows": ("many", r"attribute 'rows' must be an integer"),
        "modalities": ("[" * 100_000 + "]" * 100_000, r"attribute 'modalities' must be a JSON list"),
        "format_version": (1.5, r"attribute 'format_version' must be an integer"),
    }
    for key, (value, message) in cases.items():
        path = tmp_path / f"{key}.h5"
        with h5py.File(path, "w") as f:
            f["object_id"] = np.asarray(["a", "b"], dtype=object).astype(h5py.string_dtype())
            f["image"] = np.ones((2, 3), "f4")
            f.attrs[key] = value
        with pytest.raises(DataError, match=message):
            open_embeddings(path)
    wide = tmp_path / "wide.h5"
    with h5py.File(wide, "w") as f:
        f["object_id"] = np.arange(2)
        f.create_dataset("image", shape=(2, 2**31), dtype="f4", chunks=(1, 1024))
    with pytest.raises(DataError, match=r"'image' has dimension 2147483648"):
        open_embeddings(wide)


def test_zero_rows_are_refused(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("object_id", shape=(0,), dtype=h5py.string_dtype())
        f.create_dataset("image", shape=(0, 4), dtype="f4")
    with pytest.raises(DataError, match="holds no rows"):
        open_embeddings(path)


def _verbs(path, out):
    return {
        "search build": [
            "search",
            "build",
            "--embeddings",
            str(path),
            "--modality",
            "image",
            "--out",
            str(out),
        ],
        "evaluate retrieval": ["evaluate", "retrieval", "--embeddings", str(path)],
        "evaluate zero-shot": ["evaluate", "zero-shot", "--embeddings", str(path), "--out", str(out)],
    }


@pytest.mark.parametrize("verb", ["search build", "evaluate retrieval", "evaluate zero-shot"])
def test_reader_verbs_answer_a_bomb_in_one_line_within_a_memory_bound(tmp_path, verb):
    path = _sparse_bomb(tmp_path / "bomb.h5")
    result = run_foundation(_verbs(path, tmp_path / "out")[verb], rss_limit_mb=1500, timeout_s=120)
    assert_one_line_error(result, "bomb.h5", "declares 2147483648 rows")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_search_build_on_a_full_disk_is_one_line_and_leaves_no_index(
    tmp_path, make_embeddings, monkeypatch, capsys
):
    import pipelines.search

    path, _ = make_embeddings()
    real_open = open
    # faiss's own writer raised a RuntimeError (a traceback) on a full disk; writes go through
    # Python now, and /dev/full fails them with a real ENOSPC.
    monkeypatch.setattr(
        pipelines.search,
        "open",
        lambda file, mode="r", *a, **k: (
            real_open("/dev/full", mode) if str(file).endswith(".tmp") else real_open(file, mode, *a, **k)
        ),
        raising=False,
    )
    out = tmp_path / "idx"
    assert main(["search", "build", "--embeddings", str(path), "--modality", "image", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert not any(out.iterdir())
