"""`foundation search build|query`: exact vs approximate agreement, CLI output, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from foundation.cli import main
from foundation.errors import DataError
from foundation.search.files import build_from_file, query
from foundation.search.index import VectorIndex
from foundation.search.kinds import default_exact_max


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Vectors around 50 centres (the same for every seed): the structure real embeddings have.

    Queries drawn with another seed come from the same clusters — like the build's held-out
    tuning sample, which is what the tuned recall is promised for.
    """
    centres = np.random.default_rng(1234).normal(size=(50, dim))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def _recall(exact_rows: np.ndarray, approx_rows: np.ndarray) -> float:
    pairs = zip(exact_rows, approx_rows, strict=True)
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in pairs]))


@pytest.mark.parametrize("kind, params", [("hnsw", {}), ("ivf", {"nlist": 32, "nprobe": 16})])
def test_approximate_indexes_agree_with_exact(kind, params):
    base = _clustered(3000, 32)
    queries = _clustered(200, 32, seed=1)
    exact = VectorIndex.build(base, kind="flat")
    approx = VectorIndex.build(base, kind=kind, params=params)
    exact_sims, exact_rows = exact.search(queries, 10)
    approx_sims, approx_rows = approx.search(queries, 10)
    assert _recall(exact_rows, approx_rows) >= 0.9
    # Where they agree on a row they agree on its similarity (both are cosine).
    np.testing.assert_allclose(
        exact_sims[:, 0][exact_rows[:, 0] == approx_rows[:, 0]],
        approx_sims[:, 0][exact_rows[:, 0] == approx_rows[:, 0]],
        rtol=1e-5,
    )
    # And exact search is exact: brute force cosine.
    if kind == "ivf":  # probing every list is exhaustive: identical neighbours
        approx.set_search_params(nprobe=32)
        np.testing.assert_array_equal(np.sort(approx.search(queries, 10)[1]), np.sort(exact_rows))
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_array_equal(exact_rows[:, 0], np.argmax(q @ unit.T, axis=1))


def test_auto_kind_by_size_and_parameters_recorded(tmp_path):
    small = VectorIndex.build(_clustered(500, 8), kind="auto", exact_max=1000)
    assert small.meta.kind == "flat"
    big = VectorIndex.build(_clustered(1500, 8), kind="auto", exact_max=1000)
    assert big.meta.kind == "ivf-fp16" and big.meta.params["nlist"] == 1500 // 39
    big.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["kind"] == "ivf-fp16" and meta["n"] == 1500
    assert meta["params"]["nprobe"] == meta["tuning"]["value"]  # the tuned knob is the one used
    # Without --exact-max: exact while the float32 vectors fit in 1 GiB.
    assert VectorIndex.build(_clustered(2000, 8), kind="auto").meta.kind == "flat"
    assert default_exact_max(1024) == 262_144
    loaded = VectorIndex.load(tmp_path / "idx")
    q = _clustered(5, 8, seed=3)
    np.testing.assert_array_equal(loaded.search(q, 5)[1], big.search(q, 5)[1])


def test_cli_build_and_query(tmp_path, make_embeddings, capsys):
    path, data = make_embeddings(n=200, dim=16, noise=0.01)
    assert (
        main(
            [
                "search",
                "build",
                "--embeddings",
                str(path),
                "--modality",
                "spectrum",
                "--out",
                str(tmp_path / "idx"),
            ]
        )
        == 0
    )
    assert "flat index over 200 spectrum vectors" in capsys.readouterr().out
    assert (
        main(
            [
                "search",
                "build",
                "--embeddings",
                str(path),
                "--modality",
                "spectrum",
                "--out",
                str(tmp_path / "idx"),
            ]
        )
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    code = main(
        [
            "search",
            "query",
            "--index",
            str(tmp_path / "idx"),
            "--query-modality",
            "image",
            "--id",
            "gal-00003",
            "--id",
            "gal-00010",
            "--k",
            "5",
            "--json",
        ]
    )
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == ["gal-00003", "gal-00010"]
    for res in results:
        assert len(res["neighbours"]) == 5
        sims = [nb["similarity"] for nb in res["neighbours"]]
        assert sims == sorted(sims, reverse=True)
        assert set(res["neighbours"][0]["targets"]) == {"redshift", "stellar_mass"}
        # Nearly noiseless modalities: the object's own spectrum is among the closest.
        assert any(nb["match"] for nb in res["neighbours"])
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# queries\ngal-00003\n")
    assert (
        main(
            [
                "search",
                "query",
                "--index",
                str(tmp_path / "idx"),
                "--query-modality",
                "image",
                "--ids-file",
                str(ids_file),
                "--k",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("query gal-00003 (image -> spectrum)") and "similarity" in out


def test_same_modality_query_excludes_the_object_itself(make_embeddings, tmp_path):
    path, _ = make_embeddings(n=100, dim=8)
    build_from_file(path, "spectrum", tmp_path / "idx")
    res = query(tmp_path / "idx", ["gal-00001"], query_modality="spectrum", k=4)[0]
    assert "gal-00001" not in [nb["id"] for nb in res["neighbours"]] and len(res["neighbours"]) == 4
    res = query(tmp_path / "idx", ["gal-00001"], query_modality="spectrum", k=4, exclude_self=False)[0]
    assert res["neighbours"][0]["id"] == "gal-00001"
    assert res["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_query_errors_are_clear(make_embeddings, tmp_path):
    path, _ = make_embeddings(n=50, dim=8)
    other, _ = make_embeddings("other.h5", n=60, dim=8)
    build_from_file(path, "spectrum", tmp_path / "idx")
    with pytest.raises(DataError, match="not in"):
        query(tmp_path / "idx", ["nope"], query_modality="image")
    with pytest.raises(DataError, match="not the embeddings file the index"):
        query(tmp_path / "idx", ["gal-00001"], query_modality="image", embeddings_path=other)
    with pytest.raises(DataError, match="not a search index"):
        VectorIndex.load(tmp_path)
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable faiss index"):
        VectorIndex.load(tmp_path / "idx")


_INDEX_FUZZ = """
import random, sys
from pathlib import Path
from foundation.errors import DataError
from foundation.search.index import INDEX_FILE, VectorIndex

folders, seed, cases = [Path(p) for p in sys.argv[1].split(",")], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
refused = 0
for folder in folders:
    raw = (folder / INDEX_FILE).read_bytes()
    for _ in range(cases):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            # Mostly the headers (sizes, counts, fourccs), sometimes anywhere.
            span = 400 if rng.random() < 0.7 else len(data)
            data[rng.randrange(min(span, len(data)))] = rng.randrange(256)
        (folder / INDEX_FILE).write_bytes(data)
        try:
            VectorIndex.load(folder)
        except DataError as exc:
            refused += 1
            assert "\\\\n" not in str(exc), str(exc)
print(refused)
"""


def _small_indexes(tmp_path, make_embeddings) -> list:
    """One saved index of each kind we build (flat, HNSW, IVF), of 300 8-d vectors."""
    path, _ = make_embeddings(n=300, dim=8)
    folders = []
    for kind, params in [("flat", None), ("hnsw", {"M": 8}), ("ivf", {"nlist": 4})]:
        build_from_file(path, "image", tmp_path / kind, kind=kind, params=params)
        folders.append(tmp_path / kind)
    return folders


@pytest.mark.slow
def test_damaged_index_files_are_refused_in_one_line_within_bounds(tmp_path, make_embeddings):
    # faiss trusts the sizes in an index file: mutated IVF headers made it allocate gigabytes
    # (std::bad_alloc, or a zero-filled buffer filling memory). A bounded child reads the file first.
    from tests.testkit.bounded import run_python

    folders = _small_indexes(tmp_path, make_embeddings)
    result = run_python(
        _INDEX_FUZZ,
        [",".join(map(str, folders)), "0", "60"],
        rss_limit_mb=1500,
        timeout_s=120,
        env={"FOUNDATION_CHECK_SECONDS": "10", "FOUNDATION_CHECK_MB": "512"},
    )
    assert result.killed_for is None and result.returncode == 0, result.stderr[-2000:]
    assert 20 < int(result.stdout) < 180  # the mutations do damage, and some files stay readable


def test_index_header_declaring_a_huge_vector_buffer_is_one_line(tmp_path, make_embeddings):
    # faiss's flat index: fourcc, d (int32), ntotal (int64), two unused int64, is_trained (1 byte),
    # metric (int32), then the vectors: their float count (uint64) and the floats. 8 GiB of floats
    # declared in a 10 KB file: faiss allocates and zero-fills them before it reads.
    from tests.testkit.bounded import assert_one_line_error, run_foundation

    path, data = make_embeddings(n=300, dim=8)
    index = tmp_path / "flat"
    build_from_file(path, "image", index, kind="flat")
    raw = bytearray((index / "index.faiss").read_bytes())
    assert raw[:4] == b"IxFI" and int.from_bytes(raw[37:45], "little") == 300 * 8
    raw[37:45] = (2 << 30).to_bytes(8, "little")
    (index / "index.faiss").write_bytes(raw)
    args = ["search", "query", "--index", str(index), "--embeddings", str(path), "--query-modality", "image"]
    result = run_foundation([*args, "--id", data["ids"][0]], rss_limit_mb=1500, timeout_s=120)
    assert_one_line_error(result, "index.faiss")


def test_hnsw_graph_with_a_neighbour_beyond_the_index_is_one_line(tmp_path, make_embeddings):
    # A search follows the neighbour ids of the graph unchecked: one id past the end crashes it
    # (SIGSEGV). Recent faiss (1.15 here) refuses such a file when reading it; with older faiss
    # the bounded child's own graph check (tested below) refuses it.
    import faiss

    from tests.testkit.bounded import assert_one_line_error, run_foundation

    path, data = make_embeddings(n=300, dim=8)
    folder = tmp_path / "hnsw"
    build_from_file(path, "image", folder, kind="hnsw", params={"M": 8})
    index = faiss.read_index(str(folder / "index.faiss"))
    graph = faiss.downcast_index(index.index).hnsw
    neighbours = faiss.vector_to_array(graph.neighbors)
    neighbours[neighbours >= 0] = 10**8
    faiss.copy_array_to_vector(neighbours, graph.neighbors)
    faiss.write_index(index, str(folder / "index.faiss"))
    args = ["search", "query", "--index", str(folder), "--embeddings", str(path), "--query-modality", "image"]
    result = run_foundation([*args, "--id", data["ids"][0]], rss_limit_mb=1500, timeout_s=120)
    assert_one_line_error(result, "index.faiss is not a ")
    assert "neighbo" in result.stderr, result.stderr


def test_graph_check_finds_what_would_crash_a_search(tmp_path):
    import faiss

    from foundation.search.index import _check_graph

    index = VectorIndex.build(_clustered(300, 8), kind="hnsw", params={"M": 8}).index
    _check_graph(faiss, index, tmp_path / "index.faiss")  # a sound graph passes
    graph = faiss.downcast_index(index.index if isinstance(index, faiss.IndexIDMap) else index).hnsw
    neighbours = faiss.vector_to_array(graph.neighbors)
    neighbours[neighbours >= 0] = 10**8
    faiss.copy_array_to_vector(neighbours, graph.neighbors)
    with pytest.raises(
        DataError, match=r"index\.faiss is not a sound HNSW index: neighbour ids outside 0\.\.299"
    ):
        _check_graph(faiss, index, tmp_path / "index.faiss")


def test_index_answering_rows_beyond_the_embeddings_is_one_line(tmp_path, make_embeddings):
    # The ids an IVF/HNSW index answers come from its file (the IDMap): a damaged one indexed past
    # the embeddings' rows (an IndexError traceback, or a wrong neighbour through a negative index).
    import faiss

    from tests.testkit.bounded import assert_one_line_error, run_foundation

    path, data = make_embeddings(n=300, dim=8)
    folder = tmp_path / "hnsw"
    build_from_file(path, "image", folder, kind="hnsw", params={"M": 8})
    index = faiss.read_index(str(folder / "index.faiss"))
    faiss.copy_array_to_vector(np.full(index.ntotal, 10**6, dtype=np.int64), index.id_map)
    faiss.write_index(index, str(folder / "index.faiss"))
    args = ["search", "query", "--index", str(folder), "--embeddings", str(path), "--query-modality", "image"]
    result = run_foundation([*args, "--id", data["ids"][0]], rss_limit_mb=1500, timeout_s=120)
    assert_one_line_error(result, "the index answered rows outside 0..299: its file is damaged")
