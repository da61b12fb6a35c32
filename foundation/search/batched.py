"""List-major batched search for IVF indexes: each probed list is scored once per batch, by a GEMM.

faiss's CPU IVF search walks the probed lists query by query: every query re-reads its lists from
memory and scores them one vector at a time, so a batch of queries costs about as much as the same
queries one at a time (memory-bound, no BLAS). Here a batch is turned around: all queries are
assigned to their nprobe lists at once, the (query, list) pairs are grouped by list, and each list
is read once and scored against all of its queries with one matrix product; the per-list top-k of
each pair are then merged into each query's top-k. The neighbours are those faiss's own search
returns at the same nprobe (the same lists are scanned exhaustively); only equal scores may come
in another order (here by ascending row), or another of them be kept at the k-th place.

IVF-Flat lists are read in place (their codes are the float32 vectors); 8-bit and fp16 scalar
codes are decoded once per list and batch; where codes are residuals (r = x - c), a query's
scores of a list are q . r plus its coarse score q . c, which the assignment already computed (as
faiss adds it).
Inner-product indexes only (every index of this project). PQ kinds keep faiss's search: their
codes are scored through lookup tables, not vectors.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from foundation.search.kinds import import_faiss

if TYPE_CHECKING:
    import torch

#: `VectorIndex.search` answers a batch list-major when its queries probe each list this many
#: times on average (batch x nprobe >= this x nlist): with fewer, a list's product is a few
#: matrix-vector products, no faster than faiss's scan, plus Python's cost per list. Measured on
#: realistic 512-d rows (docs/search.md): the crossover was between 2.5 and 5 queries a list at
#: 2x10^5 rows (nlist 400, nprobe 64), between 3 and 6 at 10^6 (ivf-fp16, nlist 2048, nprobe 48).
MIN_QUERIES_PER_LIST = 4
#: Queries answered together: the candidates held are queries x nprobe x k (score, id) pairs,
#: 31 MB for 4096 queries at nprobe 64, k 10; a larger batch is answered in blocks of this many.
BLOCK_QUERIES = 4096
#: Value of a missing neighbour (fewer than k vectors in the probed lists), as faiss returns it.
MISSING_SCORE = -np.finfo(np.float32).max


def list_major_index(index: Any) -> Any | None:
    """The IVF index this module can search (IVF-Flat or IVF scalar codes, inner product), or None."""
    faiss = import_faiss()
    if not isinstance(index, faiss.IndexIVF):
        return None
    index = faiss.downcast_index(index)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if isinstance(index, (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
        return index
    return None


def worth_list_major(n_queries: int, nprobe: int, nlist: int) -> bool:
    """Whether a batch shares its probed lists enough for list-major search to beat faiss's."""
    return n_queries * min(nprobe, nlist) >= MIN_QUERIES_PER_LIST * nlist


def list_vectors(ivf: Any, list_no: int, buffer: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(ids, float32 vectors) of one inverted list: IVF-Flat's read in place, without a copy (valid
    while the index is unchanged); scalar codes decoded (residuals where `ivf.by_residual`), fp16
    ones into the front of `buffer` (float32, room for the longest list; reused from list to list:
    a fresh tensor per list made decoding 0.33 s of a 1000-query batch at 10^6 rows, against 0.25)."""
    import torch  # imported here: `search query` on a flat index never needs it

    faiss = import_faiss()
    invlists = ivf.invlists
    size = invlists.list_size(list_no)
    if size == 0:
        return np.zeros(0, np.int64), torch.zeros((0, ivf.d))
    ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
    codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * ivf.code_size).reshape(size, ivf.code_size)
    if isinstance(ivf, faiss.IndexIVFFlat):
        return ids, torch.from_numpy(codes.view(np.float32))
    if ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        # torch's conversion uses the CPU's fp16 instructions: 6x numpy's, 14x faiss's decode
        vectors = buffer[: size * ivf.d].view(size, ivf.d)
        vectors.copy_(torch.from_numpy(codes.view(np.float16)))
    else:
        vectors = torch.from_numpy(ivf.sq.decode(codes))
    return ids, vectors


def batched_search(
    index: Any, queries: np.ndarray, k: int, nprobe: int, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k), of `queries` (float32, C order) in an IVF index, list-major.

    `index` must pass `list_major_index`. `workers` threads score disjoint sets of lists (torch's
    matrix product and numpy's partition release the GIL), each with one-thread BLAS and OpenMP
    (torch's products and fp16 conversion; the caller's torch thread count is restored after):
    the products are small (a list's queries by its few hundred vectors), and thread teams
    spinning up for each of them made a batch 5-10x slower.
    """
    # torch's products: 1.5x numpy's (OpenBLAS) on these shapes, 23 queries x 512 by 488 vectors,
    # one thread, Intel Xeon.
    import torch

    ivf = list_major_index(index)
    if ivf is None:
        raise TypeError(f"list-major search needs an inner-product IVF-Flat or IVF-SQ index, not {index}")
    if len(queries) > BLOCK_QUERIES:
        parts = [
            batched_search(ivf, queries[start : start + BLOCK_QUERIES], k, nprobe, workers)
            for start in range(0, len(queries), BLOCK_QUERIES)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    n_queries = len(queries)
    nprobe = max(1, min(int(nprobe), int(ivf.nlist)))
    coarse, probes = ivf.quantizer.search(queries, nprobe)  # coarse: q . centroid of each pair
    coarse = coarse.ravel()
    groups = pairs_by_list(probes)
    max_list_size = max((ivf.invlists.list_size(list_no) for list_no, _ in groups), default=0)
    cand_scores = np.full((n_queries * nprobe, k), MISSING_SCORE, dtype=np.float32)
    cand_ids = np.full((n_queries * nprobe, k), -1, dtype=np.int64)

    def score_lists(part: list[tuple[int, np.ndarray]]) -> None:
        # A worker's OpenMP settings are its own, and MKL's thread count is global: torch's call
        # sets both (threadpoolctl's per-thread limit left the products 15-20 % slower).
        torch.set_num_threads(1)
        buffer = torch.empty(max_list_size * ivf.d)
        for list_no, pairs in part:
            ids, vectors = list_vectors(ivf, list_no, buffer)
            if len(ids) == 0:
                continue
            scores = torch.mm(torch.from_numpy(queries[pairs // nprobe]), vectors.T)
            if len(ids) > k:
                best, top = torch.topk(scores, k, dim=1, sorted=False)
                best, top = best.numpy(), top.numpy()
            else:
                best, top = scores.numpy(), np.arange(len(ids))
            if ivf.by_residual:  # one coarse score for the pair's whole list: added to its k kept only
                best += coarse[pairs, None]
            cand_scores[pairs, : best.shape[1]] = best
            cand_ids[pairs, : best.shape[1]] = ids[top]

    workers = max(1, min(int(workers), len(groups)))
    torch_threads = torch.get_num_threads()
    try:
        with threadpool_limits(1):
            if workers == 1:
                score_lists(groups)
            else:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(score_lists, [groups[w::workers] for w in range(workers)]))
    finally:
        torch.set_num_threads(torch_threads)
    return merge_top_k(cand_scores.reshape(n_queries, -1), cand_ids.reshape(n_queries, -1), k)


def pairs_by_list(probes: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(list, the pairs that probe it) for every probed list of (Q, nprobe) assignments. Pair p is
    query p // nprobe's probe p % nprobe; its per-list top-k go into row p of the candidates."""
    pair_lists = probes.ravel()
    order = np.argsort(pair_lists, kind="stable")
    sorted_lists = pair_lists[order]
    starts = np.flatnonzero(np.r_[True, sorted_lists[1:] != sorted_lists[:-1]])
    stops = np.r_[starts[1:], len(order)]
    return [
        (int(sorted_lists[a]), order[a:b]) for a, b in zip(starts, stops, strict=True) if sorted_lists[a] >= 0
    ]


def merge_top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (score, id) pairs, by descending score, then ascending id (missing last)."""
    if scores.shape[1] > k:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, top, axis=1), np.take_along_axis(ids, top, axis=1)
    sort_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((sort_ids, -scores), axis=1) if scores.size else np.zeros(scores.shape, np.int64)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
