"""`VectorIndex`: a faiss index plus the parameters it was built with, saved as one index directory.

An index directory holds `index.faiss` (the faiss index) and `index.json` (kind, parameters, which
embeddings file and modality it indexes, a hash of its object ids, build time, measured recall).
Loading checks the file in a memory-bounded child first: faiss trusts the sizes in the file.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from foundation.atomic import replacing, write_json
from foundation.errors import DataError
from foundation.isolated import run_isolated
from foundation.search.batched import batched_search, list_major_index, worth_list_major
from foundation.search.kinds import (
    KINDS,
    add_vectors,
    as_float32,
    check_params,
    choose_kind,
    default_exact_max,
    default_params,
    factory_string,
    import_faiss,
    is_ivf,
    normalized,
    query_knob,
    set_knob,
)
from foundation.search.tuning import (
    DEFAULT_TARGET_RECALL,
    DEFAULT_TUNE_K,
    DEFAULT_TUNE_SAMPLE,
    RecallTargetWarning,
    add_tuned,
    recall_warning,
)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
#: Memory (beyond FOUNDATION_CHECK_MB) that reading an index may take, per byte of its file: a
#: genuine index holds what its file stores, and faiss may copy a buffer once while reading.
INDEX_MEMORY_FACTOR = 3


@dataclass
class IndexParams:
    """What an index is; written to index.json so a query (and a person) knows how it was built."""

    kind: str
    n: int
    dim: int
    metric: str = "inner_product"
    normalize: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    embeddings: str | None = None
    ids_sha256: str | None = None
    checkpoint: str | None = None
    build_seconds: float | None = None
    faiss_version: str | None = None
    tuning: dict[str, Any] | None = None


def kind_and_params(
    kind: str, n: int, dim: int, exact_max: int | None, params: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The concrete kind (`auto` resolved) and its build parameters, refused where they cannot work."""
    exact_max = default_exact_max(dim) if exact_max is None else exact_max
    kind = choose_kind(n, exact_max) if kind == "auto" else kind
    p = default_params(kind, n, dim)
    check_params(kind, params or {})
    p.update(params or {})
    if query_knob(kind) is not None and n < 10:
        raise DataError(f"a {kind} index needs at least 10 vectors (got {n}); use --kind flat")
    if is_ivf(kind) and n < p["nlist"]:
        raise DataError(f"IVF with nlist={p['nlist']} needs at least that many vectors, got {n}")
    if "pq_m" in p and dim % p["pq_m"]:
        raise DataError(f"--param pq_m={p['pq_m']} must divide the dimension {dim} (e.g. {dim // 16 or 1})")
    if kind == "ivf-pqfs" and p["pq_bits"] != 4:
        raise DataError(f"--param pq_bits={p['pq_bits']}: ivf-pqfs codes have 4 bits (fast-scan); use ivf-pq")
    if "pq_bits" in p and p["pq_bits"] > 8 and kind.startswith("opq"):
        raise DataError(f"--param pq_bits={p['pq_bits']}: OPQ trains with at most 8 bits per code")
    return kind, p


def rerank_factor(meta: IndexParams) -> int:
    """How many times k candidates a PQ index fetches to re-score exactly (0: none)."""
    return int(meta.params.get("rerank", 0) or 0)


#: Queries whose candidates one faiss call finds: faiss's fast-scan search of a batch costs far less
#: per query than of a few (1000 1024-d queries: 0.46 s in one call, 1.26 s in ten).
RERANK_SEARCH_QUERIES = 4096
#: Bytes of candidate vectors held at once. A query re-ranking rerank x k candidates of dimension D
#: may hold rerank x k x D x 4 bytes (2.6 MB at 1024-d, rerank 64, k 10), so 10^4 queries at once
#: could hold 26 GB: where a batch's distinct candidates exceed this, they are read and re-scored
#: ~400 queries at a time. (Queries share candidates: 1000 realistic 1024-d queries had 184,000
#: distinct ones, 0.7 GB, read at once in 0.2 s; read 100 queries at a time, 0.6 s.)
RERANK_BLOCK_BYTES = 1 << 30


def reranked(
    raw_search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    stored: Callable[[np.ndarray], np.ndarray],
    queries: np.ndarray,
    k: int,
    factor: int,
    n: int,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The top k of `factor` x k approximate candidates, re-scored by exact inner products with
    their stored vectors (`stored(sorted rows)`): PQ codes keep 64 bytes of a vector, enough to
    find candidates, not to order them finely. Equal scores keep the codes' order. `workers`
    threads re-score disjoint queries of a batch."""
    wanted = min(n, k * factor)
    row_bytes = queries.shape[1] * 4
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for first in range(0, len(queries), RERANK_SEARCH_QUERIES):
        searched = queries[first : first + RERANK_SEARCH_QUERIES]
        _, cand = raw_search(searched, wanted)
        uniq = np.unique(cand[cand >= 0])
        fits = len(uniq) * row_bytes <= RERANK_BLOCK_BYTES
        block = len(searched) if fits else max(1, RERANK_BLOCK_BYTES // (wanted * row_bytes))
        for start in range(0, len(searched), block):
            stop = min(start + block, len(searched))
            sims[first + start : first + stop], rows[first + start : first + stop] = _rescored(
                stored, searched[start:stop], cand[start:stop], k, uniq if fits else None, workers
            )
    return sims, rows


def _rescored(
    stored: Callable[[np.ndarray], np.ndarray],
    queries: np.ndarray,
    cand: np.ndarray,
    k: int,
    uniq: np.ndarray | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top k of its candidate rows (-1: none; `uniq`: their distinct rows, sorted),
    by exact inner product; one product per query (a (queries, candidates, D) gather and one
    batched product took 2.4x as long). The gathers and products release the GIL, so `workers`
    threads take a share of the queries each (1000 realistic 1024-d queries of 640 candidates:
    0.40-0.42 s on two threads, 0.65-0.76 s on one)."""
    if uniq is None:
        uniq = np.unique(cand[cand >= 0])
    vectors = stored(uniq) if len(uniq) else np.zeros((0, queries.shape[1]), np.float32)
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)

    def rescore(part: range) -> None:
        for i in part:
            c = cand[i][cand[i] >= 0]
            scores = vectors[np.searchsorted(uniq, c)] @ queries[i]
            top = np.argsort(-scores, kind="stable")[:k]
            sims[i, : len(top)], rows[i, : len(top)] = scores[top], c[top]

    workers = max(1, min(int(workers), len(queries)))
    if workers == 1:
        rescore(range(len(queries)))
    else:
        bounds = np.linspace(0, len(queries), workers + 1).astype(int)
        with threadpool_limits(1), ThreadPoolExecutor(workers) as pool:
            list(pool.map(rescore, [range(a, b) for a, b in itertools.pairwise(bounds)]))
    return sims, rows


def _trained_index(faiss: Any, vectors: np.ndarray, kind: str, p: dict[str, Any], seed: int) -> Any:
    """An empty faiss index of `kind`, trained (IVF k-means on a seeded sample) where it needs it."""
    n, dim = vectors.shape
    index = faiss.index_factory(dim, factory_string(kind, p), faiss.METRIC_INNER_PRODUCT)
    if kind.startswith("hnsw"):
        index.hnsw.efConstruction = int(p["efConstruction"])
    if is_ivf(kind):
        faiss.extract_index_ivf(index).cp.seed = seed
    if not index.is_trained:
        train = vectors
        limit = int(p.get("train_points", n))
        if n > limit:
            train = vectors[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]
        index.train(train)
        del train
    return index


class VectorIndex:
    """A faiss index plus its parameters; search results are embeddings-file rows."""

    def __init__(self, index: Any, meta: IndexParams) -> None:
        self.index = index
        self.meta = meta
        self.stored_vectors: Callable[[np.ndarray], np.ndarray] | None = None
        """rows -> their (normalised) float vectors, for a PQ kind's re-ranking; None: PQ scores."""

    def attach_vectors(self, stored: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """Where a PQ index reads the float vectors it re-ranks with (sorted rows -> (len, D))."""
        self.stored_vectors = stored

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        *,
        kind: str = "auto",
        normalize: bool = True,
        exact_max: int | None = None,
        params: dict[str, Any] | None = None,
        seed: int = 0,
        target_recall: float = DEFAULT_TARGET_RECALL,
        tune_k: int = DEFAULT_TUNE_K,
        tune_sample: int = DEFAULT_TUNE_SAMPLE,
        tune_queries: dict[str, np.ndarray | None] | None = None,
        inplace: bool = False,
    ) -> VectorIndex:
        """Index (N, D) vectors; `normalize` L2-normalises them (cosine similarity).

        Approximate kinds are tuned to `target_recall` (see foundation.search.tuning); `params` with
        the kind's knob (efSearch / nprobe) fixes it, and its recall is measured instead.
        `tune_queries` names the tuning query sets: each the (S, D) vectors of the held-out rows
        `tuning_rows(N, tune_sample, seed)` in another modality, or None for the indexed vectors
        themselves (the default: {"indexed": None}); the knob must reach the target for every set.
        `inplace` lets normalisation overwrite `vectors` (saves a copy of a large array).
        """
        faiss = import_faiss()

        vectors = normalized(vectors, inplace) if normalize else as_float32(vectors)
        n, dim = vectors.shape
        if n == 0:
            raise DataError("cannot build an index over zero vectors")
        if not 0.0 < target_recall <= 1.0:
            raise DataError(f"--target-recall {target_recall} must be in (0, 1]")
        kind, p = kind_and_params(kind, n, dim, exact_max, params)
        knob = query_knob(kind)
        start = time.perf_counter()
        index = _trained_index(faiss, vectors, kind, p, seed)
        tuning = None
        if knob is None:
            add_vectors(index, vectors, None, f"indexing ({kind})")
        else:
            if kind.startswith("hnsw"):
                index = faiss.IndexIDMap(index)  # rows are added out of order (held-out last)
            factor = int(p.get("rerank", 0))
            search_rows = None
            if factor:

                def search_rows(q: np.ndarray, k: int) -> np.ndarray:
                    return reranked(index.search, vectors.__getitem__, q, k, factor, n)[1]

            tuning = add_tuned(
                index,
                vectors,
                search_rows=search_rows,
                kind=kind,
                knob=knob,
                nlist=p.get("nlist"),
                seed=seed,
                target=target_recall,
                k=tune_k,
                sample=tune_sample,
                tune_queries=tune_queries,
                normalize=normalize,
                fixed=(params or {}).get(knob),
            )
            p[knob] = tuning["value"]
            set_knob(index, knob, p[knob])
        meta = IndexParams(
            kind=kind,
            n=n,
            dim=dim,
            normalize=normalize,
            params=p,
            build_seconds=round(time.perf_counter() - start, 3),
            faiss_version=faiss.__version__,
            tuning=tuning,
        )
        if tuning is not None and not tuning["reached"]:
            warnings.warn(recall_warning(meta, target_recall), RecallTargetWarning, stacklevel=2)
        out = cls(index, meta)
        if rerank_factor(meta):
            out.attach_vectors(vectors.__getitem__)
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each (Q, k); rows of -1 where fewer than k neighbours exist."""
        queries = normalized(queries) if self.meta.normalize else as_float32(queries)
        if queries.shape[1] != self.meta.dim:
            raise DataError(f"query vectors have dimension {queries.shape[1]}, the index has {self.meta.dim}")
        k = min(int(k), self.meta.n)
        if rerank_factor(self.meta) and self.stored_vectors is not None:
            sims, rows = reranked(
                self.index.search,
                self.stored_vectors,
                queries,
                k,
                rerank_factor(self.meta),
                self.meta.n,
                workers=import_faiss().omp_get_max_threads(),
            )
        else:
            sims, rows = self._search_vectors(queries, k)
        if rows.size and (rows.min() < -1 or rows.max() >= self.meta.n):
            raise DataError(
                f"the index answered rows outside 0..{self.meta.n - 1}: its file is damaged; rebuild it"
            )
        return sims, rows

    def _search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's search, or for a batch that shares its IVF lists the list-major one (the same
        neighbours, one matrix product per list instead of a scan per query)."""
        ivf = list_major_index(self.index)
        if ivf is not None and worth_list_major(len(queries), ivf.nprobe, ivf.nlist):
            faiss = import_faiss()
            return batched_search(ivf, queries, k, ivf.nprobe, workers=faiss.omp_get_max_threads())
        return self.index.search(queries, k)

    def set_search_params(self, **params: Any) -> None:
        """Adjust the query-time knob (efSearch for HNSW, nprobe for IVF; rerank for PQ kinds)."""
        knob = query_knob(self.meta.kind)
        for name, value in params.items():
            if name == "rerank" and "rerank" in self.meta.params:
                if not isinstance(value, int) or value < 0:
                    raise DataError(f"rerank={value!r} must be a non-negative integer")
                continue
            if name != knob:
                raise DataError(
                    f"a {self.meta.kind} index has "
                    + (f"one query-time parameter, {knob}" if knob else "no query-time parameters")
                    + f"; got {name}"
                )
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{name}={value!r} must be a positive integer")
            if name != "rerank":
                set_knob(self.index, name, value)
        self.meta.params.update(params)

    def save(self, directory: str | Path) -> Path:
        """Write index.faiss and index.json into `directory` (each atomically)."""
        faiss = import_faiss()

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Serialised here and written by Python: faiss's own writer reports a full disk as a
        # RuntimeError, and leaves the half-written temporary behind.
        blob = faiss.serialize_index(self.index)
        with replacing(directory / INDEX_FILE) as tmp, open(tmp, "wb") as handle:
            handle.write(blob.data)
        write_json(directory / META_FILE, asdict(self.meta), indent=2)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> VectorIndex:
        faiss = import_faiss()

        directory = Path(directory)
        meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
        if not meta_path.is_file() or not index_path.is_file():
            raise DataError(
                f"{directory} is not a search index (needs {INDEX_FILE} and {META_FILE}); "
                "build one with `foundation search build`"
            )
        try:
            meta = IndexParams(**json.loads(meta_path.read_text()))
        except (ValueError, TypeError) as exc:
            raise DataError(f"{meta_path} is malformed: {exc}") from None
        if meta.kind not in KINDS:
            raise DataError(f"{meta_path} names an unknown index kind {meta.kind!r}")
        # faiss trusts the sizes in the file: a damaged one makes it allocate without bound, loop or
        # crash. A bounded child reads it first, with memory for what a genuine index of this size needs.
        extra_mb = INDEX_MEMORY_FACTOR * index_path.stat().st_size / 2**20
        run_isolated(
            lambda: _check_graph(faiss, _read_index(faiss, index_path, meta, meta_path), index_path),
            str(index_path),
            extra_mb=extra_mb,
        )
        out = cls(_read_index(faiss, index_path, meta, meta_path), meta)
        knob = query_knob(meta.kind)
        if knob in meta.params:
            out.set_search_params(**{knob: int(meta.params[knob])})
        return out


def _read_index(faiss: Any, index_path: Path, meta: IndexParams, meta_path: Path) -> Any:
    """`faiss.read_index`, as a DataError when faiss refuses the file or it disagrees with its metadata."""
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise DataError(f"{index_path} is not a readable faiss index: {str(exc).splitlines()[0]}") from None
    if index.ntotal != meta.n or index.d != meta.dim:
        raise DataError(
            f"{index_path} holds {index.ntotal}x{index.d} vectors but {meta_path} says {meta.n}x{meta.dim}"
        )
    return index


def _check_graph(faiss: Any, index: Any, index_path: Path) -> None:
    """Refuse an HNSW graph that would make a search read outside its arrays (faiss follows the
    neighbour ids and offsets in the file unchecked: one damaged id crashed the process)."""
    # `inner` does not own its memory: `index` must stay referenced while it is used.
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if not isinstance(inner, faiss.IndexHNSW):
        return
    problem = _graph_problem(faiss, inner.hnsw, int(inner.ntotal))
    if problem is None and inner.storage is not None and inner.storage.ntotal != inner.ntotal:
        problem = f"its storage holds {inner.storage.ntotal} vectors, the graph {inner.ntotal}"
    if problem:
        raise DataError(f"{index_path} is not a sound HNSW index: {problem}; rebuild it")


def _graph_problem(faiss: Any, hnsw: Any, n: int) -> str | None:
    """What is inconsistent in an HNSW graph of `n` nodes, or None."""
    neighbours = faiss.vector_to_array(hnsw.neighbors)
    offsets = faiss.vector_to_array(hnsw.offsets).astype(np.int64)
    levels = faiss.vector_to_array(hnsw.levels).astype(np.int64)
    per_level = faiss.vector_to_array(hnsw.cum_nneighbor_per_level).astype(np.int64)
    if len(levels) != n or len(offsets) != n + 1:
        return f"{len(levels)} levels and {len(offsets)} offsets for {n} nodes"
    if n == 0:
        return None
    if levels.min() < 1 or levels.max() >= len(per_level) or hnsw.max_level != levels.max() - 1:
        return "node levels outside the levels the graph declares"
    if offsets[0] != 0 or offsets[-1] != len(neighbours) or np.any(np.diff(offsets) != per_level[levels]):
        return "neighbour offsets that disagree with the node levels"
    if neighbours.size and (neighbours.min() < -1 or neighbours.max() >= n):
        return f"neighbour ids outside 0..{n - 1}"
    if not 0 <= hnsw.entry_point < n:
        return f"entry point {hnsw.entry_point} outside 0..{n - 1}"
    return None
