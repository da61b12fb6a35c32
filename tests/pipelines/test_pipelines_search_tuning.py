"""`foundation search build` recall targets: the tuned knob reaches the target, is recorded and used."""

from __future__ import annotations

import json

import numpy as np
import pytest

from foundation.cli import main
from foundation.errors import DataError
from foundation.search.files import build_from_file, query
from foundation.search.index import VectorIndex
from foundation.search.kinds import import_faiss
from foundation.search.tuning import RecallTargetWarning, exact_knn, recall_at_k, tuning_rows


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Vectors around 50 centres (one set of centres for every seed): clustered like embeddings."""
    centres = np.random.default_rng(1234).normal(size=(50, dim))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _knob_of(index: VectorIndex) -> int:
    faiss = import_faiss()
    if index.meta.kind.startswith("hnsw"):
        return faiss.downcast_index(index.index.index).hnsw.efSearch
    return faiss.extract_index_ivf(index.index).nprobe


def test_exact_knn_matches_brute_force_and_skips_rows():
    rng = np.random.default_rng(0)
    base, queries = (
        rng.normal(size=(1000, 16)).astype(np.float32),
        rng.normal(size=(7, 16)).astype(np.float32),
    )
    expected = np.argsort(-(queries @ base.T), axis=1)[:, :5]
    np.testing.assert_array_equal(exact_knn(base, queries, 5, block=128), expected)
    skip = expected[:, 0]
    rows = exact_knn(base, queries, 5, skip_rows=skip, block=100)
    assert not np.isin(rows, skip).any()


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivf-sq8"])
def test_tuning_reaches_the_target_with_the_smallest_knob(kind):
    base = _clustered(3000, 32)
    index = VectorIndex.build(base, kind=kind, target_recall=0.9)
    t = index.meta.tuning
    knob = "efSearch" if kind == "hnsw" else "nprobe"
    assert t["knob"] == knob and t["reached"] and t["recall"] >= 0.9
    assert t["sample"] == 300 and t["k"] == 10 and t["target_recall"] == 0.9
    # Every smaller value it measured missed the target: the chosen one is the smallest tried.
    assert all(r < 0.9 for v, r in t["curve"] if v < t["value"])
    assert [t["value"], t["recall"]] in t["curve"]
    # The index searches with the tuned value...
    assert index.meta.params[knob] == t["value"] == _knob_of(index)
    # ...and fresh queries from the same distribution see about the recall the build measured.
    queries = _clustered(300, 32, seed=7)
    truth = exact_knn(_unit(base), _unit(queries), 10)
    fresh = recall_at_k(truth, index.search(queries, 10)[1])
    assert fresh >= 0.85
    # A much smaller knob is measurably worse on the same queries (the knob matters here).
    index.set_search_params(**{knob: 1})
    assert recall_at_k(truth, index.search(queries, 10)[1]) < fresh


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_held_out_tuning_rows_are_in_the_index_under_their_own_row(kind):
    base = _clustered(2000, 16)
    index = VectorIndex.build(base, kind=kind)
    assert index.index.ntotal == 2000
    index.set_search_params(
        **({"efSearch": 500} if kind == "hnsw" else {"nprobe": index.meta.params["nlist"]})
    )
    held = tuning_rows(2000, 300, seed=0)  # the rows added after tuning, and some others
    assert len(held) == 200
    rows = np.concatenate([held, np.arange(0, 2000, 20)])
    top = index.search(base[rows], 1)[1][:, 0]
    assert np.mean(top == rows) >= 0.99


def test_recall_is_recorded_printed_and_used_by_query(make_embeddings, tmp_path, capsys):
    path, _ = make_embeddings(n=1200, dim=16, noise=0.05)
    out = tmp_path / "idx"
    argv = ["search", "build", "--embeddings", str(path), "--modality", "spectrum", "--out", str(out)]
    assert main([*argv, "--kind", "ivf", "--target-recall", "0.9", "--tune-sample", "100"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "index.json").read_text())
    t = meta["tuning"]
    assert t["reached"] and t["recall"] >= 0.9 and t["sample"] == 100 and t["target_recall"] == 0.9
    assert meta["params"]["nprobe"] == t["value"]
    assert f"nprobe={t['value']}" in printed and f"recall@10 {t['recall']:.3f}" in printed
    assert "(spectrum 0." in printed and "image 0." in printed and "on 100 held-out rows" in printed
    assert _knob_of(VectorIndex.load(out)) == t["value"]
    # --param at query time overrides the recorded knob (nprobe=nlist is exhaustive: exact results).
    ids = [f"gal-{i:05d}" for i in range(0, 1200, 60)]
    exact = query(out, ids, query_modality="image", k=5, params={"nprobe": meta["params"]["nlist"]})
    flat_dir = tmp_path / "flat"
    build_from_file(path, "spectrum", flat_dir, kind="flat")
    truth = query(flat_dir, ids, query_modality="image", k=5)
    assert [[nb["id"] for nb in r["neighbours"]] for r in exact] == [
        [nb["id"] for nb in r["neighbours"]] for r in truth
    ]
    assert (
        main(
            [
                "search",
                "query",
                "--index",
                str(out),
                "--query-modality",
                "image",
                "--id",
                ids[0],
                "--param",
                "efSearch=10",
            ]
        )
        == 2
    )
    assert "one query-time parameter, nprobe" in capsys.readouterr().err


def test_unreachable_target_warns_with_what_to_do(make_embeddings, tmp_path, capsys):
    base = _clustered(3000, 32)
    with pytest.warns(RecallTargetWarning, match="--kind flat"):
        index = VectorIndex.build(base, kind="ivf", params={"nlist": 64, "nprobe": 1}, target_recall=0.99)
    t = index.meta.tuning
    assert t["fixed"] and not t["reached"] and t["value"] == 1 and t["recall"] < 0.99
    # The CLI prints it as a warning line, and still writes the index.
    path, _ = make_embeddings(n=1000, dim=16)
    argv = [
        "search",
        "build",
        "--embeddings",
        str(path),
        "--modality",
        "spectrum",
        "--out",
        str(tmp_path / "i"),
    ]
    assert (
        main([*argv, "--kind", "ivf", "--param", "nlist=16", "--param", "nprobe=1", "--target-recall", "1"])
        == 0
    )
    err = capsys.readouterr().err
    assert err.startswith("warning: ivf index reaches recall@10") and "--kind flat" in err
    assert json.loads((tmp_path / "i" / "index.json").read_text())["tuning"]["reached"] is False


def test_tuning_covers_every_query_modality(make_embeddings, tmp_path, capsys):
    path, _ = make_embeddings(n=1000, dim=16, noise=0.1)
    index = build_from_file(path, "spectrum", tmp_path / "idx", kind="hnsw")
    t = index.meta.tuning
    assert set(t["recall_by_queries"]) == {"spectrum", "image"}
    assert t["recall"] == min(t["recall_by_queries"].values()) >= 0.95
    only = build_from_file(path, "spectrum", tmp_path / "i2", kind="hnsw", tune_modalities=["image"])
    assert set(only.meta.tuning["recall_by_queries"]) == {"image"}
    with pytest.raises(DataError, match="--tune-modalities 'radio' is not in"):
        build_from_file(path, "spectrum", tmp_path / "x", kind="hnsw", tune_modalities=["radio"])
    with pytest.raises(DataError, match="tuning queries 'other' have shape"):
        VectorIndex.build(_clustered(500, 8), kind="hnsw", tune_queries={"other": np.ones((3, 8))})


def test_bad_build_parameters_are_clear():
    base = _clustered(500, 8)
    with pytest.raises(DataError, match="nprobe does not apply to a hnsw index"):
        VectorIndex.build(base, kind="hnsw", params={"nprobe": 4})
    with pytest.raises(DataError, match="must be a positive integer"):
        VectorIndex.build(base, kind="ivf", params={"nlist": "many"})
    with pytest.raises(DataError, match="at least 10 vectors"):
        VectorIndex.build(base[:5], kind="ivf")
    with pytest.raises(DataError, match="target-recall"):
        VectorIndex.build(base, kind="hnsw", target_recall=1.5)
