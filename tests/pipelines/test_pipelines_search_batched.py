"""List-major batched IVF search: the same neighbours as faiss's own search at the same nprobe, for
IVF-Flat and scalar codes, cosine and raw inner product, with ties, short lists and missing rows;
and VectorIndex.search takes it only for batches that share their lists."""

from __future__ import annotations

import numpy as np
import pytest

from foundation.search import batched
from foundation.search.batched import MISSING_SCORE, batched_search, list_major_index, worth_list_major
from foundation.search.index import VectorIndex
from foundation.search.kinds import import_faiss


def _vectors(n: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _ivf(x: np.ndarray, spec: str, nprobe: int) -> object:
    faiss = import_faiss()
    index = faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = 0
    index.train(x)
    index.add(x)
    index.nprobe = nprobe
    return index


def assert_same_neighbours(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> None:
    """Equal scores (to float rounding) in order, and the same rows, except that rows of equal
    score may come in another order or, at the k-th place, be other rows of that score."""
    (ref_s, ref_i), (got_s, got_i) = ref, got
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-5, atol=1e-5)
    for rs, ri, gs, gi in zip(ref_s, ref_i, got_s, got_i, strict=True):
        last = rs[-1]
        strictly_better = rs > last + 1e-5
        assert set(ri[strictly_better]) == set(gi[gs > last + 1e-5])
        assert len(set(gi)) == len(gi) or (gi == -1).any()


@pytest.mark.parametrize("spec", ["IVF16,Flat", "IVF16,SQ8", "IVF16,SQfp16"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "inner-product"])
def test_list_major_search_finds_what_faiss_finds(spec, normalize):
    x, q = _vectors(3000), _vectors(200, seed=1)
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = _ivf(x, spec, nprobe=3)
    ref = index.search(q, 10)
    got = batched_search(index, q, 10, nprobe=3, workers=2)
    np.testing.assert_array_equal(got[1], ref[1])  # distinct random scores: the very same rows
    assert_same_neighbours(ref, got)


def test_ties_keep_rows_of_the_tied_score():
    base = _vectors(500)
    x = np.concatenate([base, base, base])  # every score three times
    q = _vectors(50, seed=1)
    index = _ivf(x, "IVF8,Flat", nprobe=2)
    ref, got = index.search(q, 10), batched_search(index, q, 10, nprobe=2)
    assert_same_neighbours(ref, got)
    np.testing.assert_allclose(got[0], np.einsum("qd,qkd->qk", q, x[got[1]]), rtol=1e-5, atol=1e-5)
    # Ties are ordered by row, so a search is reproducible.
    for s, i in zip(*got, strict=True):
        same = s[:-1] == s[1:]
        assert np.all(i[:-1][same] < i[1:][same])


def test_short_lists_leave_missing_rows_as_faiss_does():
    x = _vectors(64, dim=8)
    index = _ivf(x, "IVF8,Flat", nprobe=1)
    q = _vectors(30, dim=8, seed=1)
    ref, got = index.search(q, 40), batched_search(index, q, 40, nprobe=1)
    assert (ref[1] == -1).any()
    np.testing.assert_array_equal(got[1] == -1, ref[1] == -1)
    assert np.all(got[0][got[1] == -1] == MISSING_SCORE)
    assert_same_neighbours(ref, got)


def test_nprobe_beyond_nlist_probes_every_list_once():
    x, q = _vectors(400), _vectors(20, seed=1)
    index = _ivf(x, "IVF4,Flat", nprobe=4)
    np.testing.assert_array_equal(batched_search(index, q, 5, nprobe=99)[1], index.search(q, 5)[1])


def test_large_batches_are_answered_in_blocks_with_the_same_result(monkeypatch):
    x, q = _vectors(2000), _vectors(250, seed=1)
    index = _ivf(x, "IVF16,Flat", nprobe=3)
    whole = batched_search(index, q, 10, nprobe=3)
    monkeypatch.setattr(batched, "BLOCK_QUERIES", 64)
    blocks = batched_search(index, q, 10, nprobe=3)
    np.testing.assert_array_equal(blocks[1], whole[1])
    np.testing.assert_allclose(blocks[0], whole[0], rtol=1e-6)  # BLAS blocking: rounding differs


def test_other_kinds_are_not_searched_list_major():
    faiss = import_faiss()
    x = _vectors(2000, dim=16)
    assert list_major_index(faiss.IndexFlatIP(16)) is None
    pq = faiss.index_factory(16, "IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    assert list_major_index(pq) is None
    l2 = faiss.index_factory(16, "IVF8,Flat")
    assert list_major_index(l2) is None
    with pytest.raises(TypeError, match="list-major"):
        batched_search(pq, x[:4], 3, 2)


@pytest.mark.filterwarnings("ignore::foundation.search.tuning.RecallTargetWarning")
def test_vector_index_batches_list_major_only_when_lists_are_shared(monkeypatch):
    x = _vectors(3000)
    index = VectorIndex.build(x, kind="ivf", params={"nlist": 16, "nprobe": 4})
    calls = []
    real = batched.batched_search

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr("foundation.search.index.batched_search", spy)
    q = _vectors(100, seed=1)
    faiss_rows = index.index.search(q / np.linalg.norm(q, axis=1, keepdims=True), 10)[1]
    assert not worth_list_major(1, 4, 16) and worth_list_major(16, 4, 16)
    np.testing.assert_array_equal(index.search(q[:1], 10)[1], faiss_rows[:1])
    assert calls == []
    np.testing.assert_array_equal(index.search(q, 10)[1], faiss_rows)
    assert calls == [100]
