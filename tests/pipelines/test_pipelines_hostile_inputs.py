"""Hostile embeddings files and options: every reader verb answers one line and exit 2, within a
memory bound, instead of allocating what a tiny file declares or printing a traceback."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from foundation.cli import main
from foundation.embeddings import open_embeddings
from foundation.errors import DataError
from tests.testkit.bounded import assert_one_line_error, run_foundation, run_python
from tests.testkit.embeddings import latent_embeddings

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
    import foundation.search.index

    path, _ = make_embeddings()
    real_open = open
    # faiss's own writer raised a RuntimeError (a traceback) on a full disk; writes go through
    # Python now, and /dev/full fails them with a real ENOSPC.
    monkeypatch.setattr(
        foundation.search.index,
        "open",
        lambda file, mode="r", *a, **k: (
            real_open("/dev/full", mode) if ".tmp" in str(file) else real_open(file, mode, *a, **k)
        ),
        raising=False,
    )
    out = tmp_path / "idx"
    assert main(["search", "build", "--embeddings", str(path), "--modality", "image", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert not any(out.iterdir())


def _exit_code(args: list[str]) -> int:
    """`main(args)`, with an option the parser refuses (SystemExit, one line already printed) as its code."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


def _one_line(capsys, fragment):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--kind", "ivf", "--param", "nlist=1000000000"], "nlist=1000000000 is beyond any sensible value"),
        (["--kind", "hnsw", "--param", "M=100000000"], "M=100000000 is beyond any sensible value"),
        (["--kind", "ivf", "--param", "nlist=1000"], "IVF with nlist=1000 needs at least that many vectors"),
        (["--kind", "hnsw", "--tune-k", "0"], "--tune-k: must lie in [1, 2147483647], got 0"),
        (["--kind", "hnsw", "--tune-sample", "0"], "--tune-sample: must lie in [1, 2147483647], got 0"),
        (["--exact-max", "-1"], "--exact-max: must lie in [0, 2147483647], got -1"),
    ],
)
def test_search_build_refuses_unbounded_or_meaningless_options(
    tmp_path, make_embeddings, capsys, flags, fragment
):
    # Huge nlist / M made faiss raise std::bad_alloc (a MemoryError traceback).
    path, _ = make_embeddings()
    args = ["search", "build", "--embeddings", str(path), "--modality", "image", "--out", str(tmp_path / "i")]
    assert _exit_code([*args, *flags]) == 2
    _one_line(capsys, fragment)


def test_search_query_huge_k_and_binary_ids_file(tmp_path, make_embeddings, capsys):
    path, data = make_embeddings(n=60)
    index = tmp_path / "idx"
    assert (
        main(["search", "build", "--embeddings", str(path), "--modality", "image", "--out", str(index)]) == 0
    )
    capsys.readouterr()
    base = ["search", "query", "--index", str(index), "--embeddings", str(path), "--query-modality", "image"]
    # k beyond the index size: every neighbour, not an allocation of a billion results.
    assert main([*base, "--id", data["ids"][0], "--k", "1000000000", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["neighbours"]) == 59
    png = tmp_path / "ids.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert main([*base, "--ids-file", str(png)]) == 2
    _one_line(capsys, "is not a UTF-8 text file")


def test_plot_field_that_is_not_in_the_samples_is_named():
    from pipelines.search_plot import _field_for

    with pytest.raises(DataError, match="--plot-fields image=nope: the samples have no array field 'nope'"):
        _field_for("image", {"image": np.zeros(3)}, {"image": "nope"})


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--raw-pca", "0"], "--raw-pca: must lie in [1, 2147483647], got 0"),
        (["--test-fraction", "1.5"], "--test-fraction must be in (0, 1)"),
        (["--test-fraction", "nan"], "--test-fraction: must be a finite number > 0, got nan"),
    ],
)
def test_zero_shot_refuses_meaningless_options(tmp_path, make_embeddings, capsys, flags, fragment):
    path, _ = make_embeddings(n=60)
    args = ["evaluate", "zero-shot", "--embeddings", str(path), "--out", str(tmp_path / "z")]
    assert _exit_code([*args, *flags]) == 2
    _one_line(capsys, fragment)


def test_zero_shot_k_beyond_the_training_rows_is_clamped(tmp_path, make_embeddings, capsys):
    # k larger than a cross-validation fold made scikit-learn raise (a traceback).
    path, _ = make_embeddings(n=80)
    args = ["evaluate", "zero-shot", "--embeddings", str(path), "--out", str(tmp_path / "z"), "--k", "100000"]
    assert main([*args, "--no-mlp", "--no-cross-modal", "--targets", "redshift"]) == 0
    report = json.loads((tmp_path / "z" / "report.json").read_text())
    assert all(r["k"] <= r["n_train"] for r in report["results"])


_FUZZ = """
import random, sys
from pathlib import Path
from foundation.embeddings import open_embeddings
from foundation.errors import DataError

valid, scratch, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
chosen = {int(case) for case in sys.argv[4].split(",")}
raw = valid.read_bytes()
rng = random.Random(seed)
refused = 0
for case in range(max(chosen) + 1):
    data = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    if case not in chosen:
        continue
    scratch.write_bytes(data)
    try:
        with open_embeddings(scratch) as emb:
            for m in emb.modalities:
                emb.vectors(m)
            for t in emb.target_names:
                emb.target(t)
            emb.split, emb.attrs
    except DataError as exc:
        refused += 1
        assert "\\n" not in str(exc), (case, str(exc))
print(refused, "of", len(chosen), "refused")
"""

#: Seed 2's mutants of the fixture below that broke HDF5 itself before the bounded child: 275 and
#: 506 looped forever inside an attribute read, 702 recorded an uncompressed chunk larger than its
#: layout (HDF5 overran its buffer and the process crashed at exit). All 1000 cases of seed 2 pass.
_KNOWN_BAD = [275, 506, 702]


@pytest.mark.slow
def test_fuzzed_embeddings_files_are_read_or_refused_in_one_line(tmp_path, embeddings_writer):
    # Seeded random byte mutations of a valid file: every outcome is a read or a one-line
    # DataError, never a traceback, a hang or a crash, within a time and memory bound (the process
    # tree's RSS: the bounded checker counts too). A loop inside HDF5 costs the check's time bound.
    valid = embeddings_writer(tmp_path / "valid.h5", latent_embeddings(n=50, dim=4), chunk=16)
    cases = sorted({*range(300), *_KNOWN_BAD})
    result = run_python(
        _FUZZ,
        [str(valid), str(tmp_path / "mutant.h5"), "2", ",".join(map(str, cases))],
        rss_limit_mb=1500,
        timeout_s=120,
        env={"FOUNDATION_CHECK_SECONDS": "2", "FOUNDATION_CHECK_MB": "512"},
    )
    assert result.killed_for is None and result.returncode == 0, result.stderr[-2000:]
    refused = int(result.stdout.split()[0])
    assert 30 < refused < len(cases)  # the mutations do damage, and some files stay readable
