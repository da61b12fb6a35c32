"""`foundation search build|query`: faiss indexes over exported embeddings, and cross-modal queries.

An index directory holds `index.faiss` (the faiss index), `index.json` (kind, parameters, which
embeddings file and modality it indexes, a hash of its object ids, build time, measured recall) and
nothing else: search results are embeddings-file rows, which `query` checks through the id hash.
Similarity is cosine: vectors are L2-normalised before indexing and querying unless the file
records them as normalised already, so inner product == cosine.

Index kinds: exact `flat` inner product; `hnsw` (graph, no training) and `ivf` (inverted lists,
k-means trained), each with full float32 vectors or, as `hnsw-sq8` / `ivf-sq8`, 8-bit scalar
quantised ones (a quarter of the memory). `auto` is exact while the vectors fit in `--exact-max`
(default: 1 GiB of float32, 262 144 vectors of 1024-d — a brute-force query is one scan of that
memory, 0.1-0.2 s on one core) and IVF above (measured faster to build and to query at a given
recall than HNSW on this project's benchmark; docs/search.md).

An approximate index has a query-time knob (efSearch for HNSW, nprobe for IVF) that trades latency
for recall, and the recall at a given knob depends on the data. So `build` measures it: a sample of
the database's own vectors (seeded) is held out of the index while it is built, queried against it,
and compared with exact search over the rest; the smallest knob whose recall@k reaches
`--target-recall` is recorded in index.json (with the measured recall, the curve and the sample
size) and used by `query`. The held-out vectors are added afterwards (with their own row ids), so
the index is complete and the measurement is not flattered by queries that are index points.
The measured latency/recall of each kind is in benchmarks/search.py and docs/search.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foundation.cli import Command
from foundation.errors import DataError
from foundation.isolated import run_isolated

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
#: Memory (beyond FOUNDATION_CHECK_MB) that reading an index may take, per byte of its file: a
#: genuine index holds what its file stores, and faiss may copy a buffer once while reading.
INDEX_MEMORY_FACTOR = 3
EXACT_MAX_BYTES = 1 << 30  # auto: exact search while the float32 vectors fit in 1 GiB
KINDS = ("flat", "hnsw", "ivf", "hnsw-sq8", "ivf-sq8")
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_TUNE_K = 10
DEFAULT_TUNE_SAMPLE = 300
MAX_EF_SEARCH = 4096  # beyond this an HNSW query costs about as much as an exact scan
ADD_CHUNK = 20_000  # vectors per add() call: a progress bar step on long builds


class RecallTargetWarning(UserWarning):
    """An approximate index cannot reach the requested recall with any query knob tried."""


def import_faiss() -> Any:
    """faiss, without its INFO-level log lines about which CPU build it loaded."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def ids_digest(ids: np.ndarray) -> str:
    """sha256 of the ordered object ids: ties index rows to embeddings rows."""
    h = hashlib.sha256()
    for oid in ids.tolist():
        h.update(str(oid).encode())
        h.update(b"\0")
    return h.hexdigest()


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


def default_exact_max(dim: int) -> int:
    """Largest N searched exactly by `--kind auto`: the vectors fit in EXACT_MAX_BYTES."""
    return max(1, EXACT_MAX_BYTES // (4 * dim))


def choose_kind(n: int, exact_max: int) -> str:
    return "flat" if n <= exact_max else "ivf"


def query_knob(kind: str) -> str | None:
    """The query-time parameter that trades latency for recall (None for exact search)."""
    if kind.startswith("hnsw"):
        return "efSearch"
    if kind.startswith("ivf"):
        return "nprobe"
    return None


def default_params(kind: str, n: int) -> dict[str, Any]:
    """Build parameters of each kind (the query knob's default is only used untuned)."""
    if kind == "flat":
        return {}
    if kind.startswith("hnsw"):
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    if kind.startswith("ivf"):
        nlist = int(max(1, min(n // 39, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))))
        # k-means on 64 points per list: faiss caps at 256 and warns below 39; the recall
        # tuning raises nprobe to make up for coarser centroids.
        return {"nlist": nlist, "nprobe": max(1, nlist // 16), "train_points": min(n, 64 * nlist)}
    raise DataError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(KINDS)}")


#: Upper bounds of index parameters: beyond them faiss allocates without limit (std::bad_alloc).
_PARAM_MAX = {
    "M": 512,
    "efConstruction": 1 << 16,
    "efSearch": 1 << 16,
    "nlist": 1 << 24,
    "nprobe": 1 << 24,
    "train_points": 1 << 31,
}


def _check_params(kind: str, params: dict[str, Any]) -> None:
    allowed = set(default_params(kind, 10_000))
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise DataError(
            f"--param {', '.join(unknown)} does not apply to a {kind} index "
            f"(its parameters: {', '.join(sorted(allowed)) or 'none'})"
        )
    for key, value in params.items():
        if not isinstance(value, int) or value < 1:
            raise DataError(f"--param {key}={value!r} must be a positive integer")
        if value > _PARAM_MAX[key]:
            raise DataError(f"--param {key}={value} is beyond any sensible value (at most {_PARAM_MAX[key]})")


def _factory_string(kind: str, p: dict[str, Any]) -> str:
    storage = "SQ8" if kind.endswith("-sq8") else "Flat"
    if kind == "flat":
        return "Flat"
    if kind.startswith("hnsw"):
        return f"HNSW{int(p['M'])},{storage}"
    return f"IVF{int(p['nlist'])},{storage}"


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _normalized(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    x = _as_float32(x)
    if not inplace:
        x = x.copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise DataError(f"{int((norms == 0).sum())} zero vectors cannot be normalised for cosine search")
    x /= norms
    return x


def exact_knn(
    vectors: np.ndarray, queries: np.ndarray, k: int, skip_rows: np.ndarray | None = None, block: int = 65_536
) -> np.ndarray:
    """Rows of the k largest inner products of each query, ignoring `skip_rows`; (Q, k).

    Blockwise over the database (one BLAS product per block), so it needs no copy of `vectors`.
    """
    n = len(vectors)
    k = min(k, n - (0 if skip_rows is None else len(skip_rows)))
    best_sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    skip = np.zeros(n, dtype=bool)
    if skip_rows is not None:
        skip[skip_rows] = True
    for start in range(0, n, block):
        sims = queries @ vectors[start : start + block].T
        sims[:, skip[start : start + block]] = -np.inf
        rows = np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)
        all_sims = np.concatenate([best_sims, sims], axis=1)
        all_rows = np.concatenate([best_rows, rows], axis=1)
        top = np.argpartition(-all_sims, k - 1, axis=1)[:, :k]
        best_sims = np.take_along_axis(all_sims, top, axis=1)
        best_rows = np.take_along_axis(all_rows, top, axis=1)
    order = np.argsort(-best_sims, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, axis=1)


def recall_at_k(truth: np.ndarray, found: np.ndarray) -> float:
    """Mean fraction of each query's true top-k found in its approximate top-k."""
    k = truth.shape[1]
    return float(np.mean([len(set(t) & set(f[:k])) / k for t, f in zip(truth, found, strict=True)]))


def _set_knob(index: Any, name: str, value: int) -> None:
    import_faiss().ParameterSpace().set_index_parameter(index, name, int(value))


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="vec", disable=not sys.stderr.isatty() or total < 2 * ADD_CHUNK)


def _add(index: Any, vectors: np.ndarray, rows: np.ndarray | None, desc: str) -> None:
    """index.add[_with_ids] in chunks, with a progress bar on long builds."""
    n = len(vectors) if rows is None else len(rows)
    with _progress(n, desc) as bar:
        for start in range(0, n, ADD_CHUNK):
            if rows is None:
                index.add(vectors[start : start + ADD_CHUNK])
            else:
                chunk = rows[start : start + ADD_CHUNK]
                index.add_with_ids(vectors[chunk], chunk.astype(np.int64))
            bar.update(min(ADD_CHUNK, n - start))


def tuning_rows(n: int, sample: int, seed: int) -> np.ndarray:
    """The rows held out of the index to tune it: min(sample, N/10) of them, sorted, seeded."""
    return np.sort(np.random.default_rng(seed).choice(n, max(1, min(sample, n // 10)), replace=False))


def tune_knob(
    measure: Callable[[int], float],
    knob: str,
    candidates: list[int],
    target: float,
    fixed: int | None = None,
) -> dict[str, Any]:
    """Smallest knob value whose recall (`measure(value)`) reaches `target`.

    Doubling over `candidates`, then bisection between the last miss and the first hit to ~1/8 of
    the value; if none reaches it, the best one tried. `fixed` measures one given value instead.
    """
    curve: dict[int, float] = {}

    def recall(value: int) -> float:
        if value not in curve:
            curve[value] = measure(value)
        return curve[value]

    if fixed is not None:
        recall(fixed)
        value = fixed
    else:
        value, lo, best, flat_steps = None, None, -1.0, 0
        for cand in candidates:
            if recall(cand) >= target:
                value = cand
                break
            lo = cand
            # Two doublings without gain: a plateau (e.g. quantised codes); larger values cost only time.
            flat_steps = flat_steps + 1 if curve[cand] <= best + 1e-3 else 0
            best = max(best, curve[cand])
            if flat_steps == 2:
                break
        if value is None:
            value = max(curve, key=lambda v: (curve[v], -v))
        elif lo is not None:
            hi = value
            while hi - lo > max(1, lo // 8):
                mid = (lo + hi) // 2
                if recall(mid) >= target:
                    hi = mid
                else:
                    lo = mid
            value = hi
    return {
        "knob": knob,
        "value": int(value),
        "recall": round(curve[value], 4),
        "reached": curve[value] >= target,
        "curve": [[v, round(r, 4)] for v, r in sorted(curve.items())],
    }


class VectorIndex:
    """A faiss index plus its parameters; search results are embeddings-file rows."""

    def __init__(self, index: Any, meta: IndexParams) -> None:
        self.index = index
        self.meta = meta

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

        Approximate kinds are tuned to `target_recall` (see the module docstring); `params` with
        the kind's knob (efSearch / nprobe) fixes it, and its recall is measured instead.
        `tune_queries` names the tuning query sets: each the (S, D) vectors of the held-out rows
        `tuning_rows(N, tune_sample, seed)` in another modality, or None for the indexed vectors
        themselves (the default: {"indexed": None}); the knob must reach the target for every set.
        `inplace` lets normalisation overwrite `vectors` (saves a copy of a large array).
        """
        faiss = import_faiss()

        vectors = _normalized(vectors, inplace) if normalize else _as_float32(vectors)
        n, dim = vectors.shape
        if n == 0:
            raise DataError("cannot build an index over zero vectors")
        if not 0.0 < target_recall <= 1.0:
            raise DataError(f"--target-recall {target_recall} must be in (0, 1]")
        exact_max = default_exact_max(dim) if exact_max is None else exact_max
        kind = choose_kind(n, exact_max) if kind == "auto" else kind
        p = default_params(kind, n)
        _check_params(kind, params or {})
        p.update(params or {})
        knob = query_knob(kind)
        if knob is not None and n < 10:
            raise DataError(f"a {kind} index needs at least 10 vectors (got {n}); use --kind flat")
        if kind.startswith("ivf") and n < p["nlist"]:
            raise DataError(f"IVF with nlist={p['nlist']} needs at least that many vectors, got {n}")
        start = time.perf_counter()
        index = faiss.index_factory(dim, _factory_string(kind, p), faiss.METRIC_INNER_PRODUCT)
        if kind.startswith("hnsw"):
            index.hnsw.efConstruction = int(p["efConstruction"])
        if kind.startswith("ivf"):
            faiss.extract_index_ivf(index).cp.seed = seed
        if not index.is_trained:
            train = vectors
            limit = int(p.get("train_points", n))
            if n > limit:
                train = vectors[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]
            index.train(train)
            del train
        tuning = None
        if knob is None:
            _add(index, vectors, None, f"indexing ({kind})")
        else:
            if kind.startswith("hnsw"):
                index = faiss.IndexIDMap(index)  # rows are added out of order (held-out last)
            tuning = _build_tuned(
                index,
                vectors,
                kind,
                knob,
                p,
                seed,
                target_recall,
                tune_k,
                tune_sample,
                tune_queries,
                normalize,
                fixed=(params or {}).get(knob),
            )
            p[knob] = tuning["value"]
            _set_knob(index, knob, p[knob])
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
        return cls(index, meta)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each (Q, k); rows of -1 where fewer than k neighbours exist."""
        queries = _normalized(queries) if self.meta.normalize else _as_float32(queries)
        if queries.shape[1] != self.meta.dim:
            raise DataError(f"query vectors have dimension {queries.shape[1]}, the index has {self.meta.dim}")
        k = min(int(k), self.meta.n)
        sims, rows = self.index.search(queries, k)
        if rows.size and (rows.min() < -1 or rows.max() >= self.meta.n):
            raise DataError(
                f"the index answered rows outside 0..{self.meta.n - 1}: its file is damaged; rebuild it"
            )
        return sims, rows

    def set_search_params(self, **params: Any) -> None:
        """Adjust the query-time knob (efSearch for HNSW, nprobe for IVF)."""
        knob = query_knob(self.meta.kind)
        for name, value in params.items():
            if name != knob:
                raise DataError(
                    f"a {self.meta.kind} index has "
                    + (f"one query-time parameter, {knob}" if knob else "no query-time parameters")
                    + f"; got {name}"
                )
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{name}={value!r} must be a positive integer")
            _set_knob(self.index, name, value)
        self.meta.params.update(params)

    def save(self, directory: str | Path) -> Path:
        """Write index.faiss and index.json into `directory` (each atomically)."""
        faiss = import_faiss()

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (INDEX_FILE + ".tmp")
        # Serialised here and written by Python: faiss's own writer reports a full disk as a
        # RuntimeError, and leaves the half-written temporary behind.
        blob = faiss.serialize_index(self.index)
        try:
            with open(tmp, "wb") as handle:
                handle.write(blob.data)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(directory / INDEX_FILE)
        tmp_meta = directory / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(asdict(self.meta), indent=2) + "\n")
        tmp_meta.replace(directory / META_FILE)
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


def _build_tuned(
    index: Any,
    vectors: np.ndarray,
    kind: str,
    knob: str,
    p: dict[str, Any],
    seed: int,
    target: float,
    k: int,
    sample: int,
    tune_queries: dict[str, np.ndarray | None] | None,
    normalize: bool,
    fixed: int | None,
) -> dict[str, Any]:
    """Add all rows to `index` (an id-mapped or IVF index), measuring recall on a held-out sample.

    The sample's rows are added last, after the measurement: while it runs the index holds the
    other N - S vectors and the ground truth is exact search over those same vectors.
    """
    from tqdm.auto import tqdm

    n = len(vectors)
    held = tuning_rows(n, sample, seed)
    rest = np.setdiff1d(np.arange(n), held)
    _add(index, vectors, rest, f"indexing ({kind})")
    start = time.perf_counter()
    k = max(1, min(k, len(rest)))
    sets = {}
    for name, q in (tune_queries or {"indexed": None}).items():
        if q is None:
            q = vectors[held]
        elif q.shape != (len(held), vectors.shape[1]):
            raise DataError(
                f"tuning queries {name!r} have shape {q.shape}, expected {(len(held), vectors.shape[1])}"
            )
        else:
            q = _normalized(q) if normalize else _as_float32(q)
        sets[name] = (q, exact_knn(vectors, q, k, skip_rows=held))
    per_set: dict[int, dict[str, float]] = {}
    bar = tqdm(desc=f"tuning {knob}", unit="try", disable=not sys.stderr.isatty() or n < 2 * ADD_CHUNK)

    def measure(value: int) -> float:
        _set_knob(index, knob, value)
        per_set[value] = {
            name: recall_at_k(truth, index.search(q, k)[1]) for name, (q, truth) in sets.items()
        }
        bar.set_postfix_str(f"{knob}={value} recall@{k}={min(per_set[value].values()):.3f}")
        bar.update(1)
        return min(per_set[value].values())

    if knob == "efSearch":
        cap = max(k, min(MAX_EF_SEARCH, len(rest)))
        candidates = sorted({min(cap, 2**e) for e in range(4, 13)} | {cap})
        candidates = [c for c in candidates if c >= k] or [cap]
    else:
        nlist = int(p["nlist"])
        candidates = sorted({min(nlist, 2**e) for e in range(0, max(1, nlist.bit_length()))} | {nlist})
    result = tune_knob(measure, knob, candidates, target, fixed=fixed)
    bar.close()
    seconds = time.perf_counter() - start
    _add(index, vectors, held, f"indexing ({kind}, held-out)")
    result.update(
        recall_by_queries={name: round(r, 4) for name, r in per_set[result["value"]].items()},
        target_recall=target,
        k=k,
        sample=len(held),
        seed=seed,
        seconds=round(seconds, 3),
        fixed=fixed is not None,
    )
    return result


def recall_warning(meta: IndexParams, target: float) -> str:
    t = meta.tuning or {}
    tried = "" if t.get("fixed") else f" (the best of {t['knob']} up to {t['curve'][-1][0]})"
    if meta.kind.endswith("-sq8"):
        remedy = f"--kind {meta.kind[:-4]} (full vectors: its 8-bit codes limit recall)"
    elif meta.kind.startswith("hnsw"):
        remedy = "a larger M or efConstruction (--param)"
    else:
        remedy = "a larger nlist or train_points (--param)"
    return (
        f"{meta.kind} index reaches recall@{t['k']} {t['recall']:.3f} < target {target} with "
        f"{t['knob']}={t['value']}{tried}. Rebuild with --kind flat for exact results, or with "
        f"{remedy}, or accept a lower --target-recall"
    )


def describe_tuning(meta: IndexParams) -> str:
    """One line: the chosen knob and the recall measured for it."""
    t = meta.tuning
    if not t:
        return "exact search (recall 1)"
    how = "given" if t["fixed"] else f"tuned for recall@{t['k']} >= {t['target_recall']}"
    by = t.get("recall_by_queries", {})
    sets = ", ".join(f"{name} {r:.3f}" for name, r in by.items())
    return (
        f"{t['knob']}={t['value']} ({how}): recall@{t['k']} {t['recall']:.3f} "
        + (f"({sets}) " if len(by) > 1 else f"({next(iter(by), 'indexed')} vectors as queries) ")
        + f"on {t['sample']} held-out rows vs exact search"
    )


# ----------------------------------------------------------------------------- build


def build_from_file(
    embeddings_path: str | Path,
    modality: str,
    out: str | Path,
    *,
    kind: str = "auto",
    exact_max: int | None = None,
    params: dict[str, Any] | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    tune_k: int = DEFAULT_TUNE_K,
    tune_sample: int = DEFAULT_TUNE_SAMPLE,
    tune_modalities: list[str] | None = None,
    seed: int = 0,
) -> VectorIndex:
    """Index one modality of an embeddings file into directory `out` (see VectorIndex.build).

    The knob is tuned with the held-out rows' vectors of each of `tune_modalities` as queries
    (default: every modality of the file with the indexed one's dimension — an index of spectra
    is queried with spectra and with images), and must reach the target for each.
    """
    from foundation.embeddings import open_embeddings

    with open_embeddings(embeddings_path) as emb:
        vectors = emb.vectors(modality)
        dim = vectors.shape[1] if vectors.ndim == 2 else None
        if tune_modalities is None:
            tune_modalities = [modality] + [
                m for m in emb.modalities if m != modality and emb.vectors(m, [0]).shape[1] == dim
            ]
        for m in tune_modalities:
            if m not in emb.modalities:
                raise DataError(
                    f"--tune-modalities {m!r} is not in {embeddings_path} "
                    f"(it has {', '.join(emb.modalities)})"
                )
        held = tuning_rows(len(vectors), tune_sample, seed)
        queries = {m: None if m == modality else emb.vectors(m, held) for m in tune_modalities}
        index = VectorIndex.build(
            vectors,
            kind=kind,
            normalize=not emb.normalized(modality),
            exact_max=exact_max,
            params=params,
            seed=seed,
            target_recall=target_recall,
            tune_k=tune_k,
            tune_sample=tune_sample,
            tune_queries=queries,
            inplace=True,
        )
        del vectors
        index.meta.modality = modality
        index.meta.embeddings = str(Path(embeddings_path).resolve())
        index.meta.ids_sha256 = ids_digest(emb.ids)
        checkpoint = emb.attrs.get("checkpoint")
        index.meta.checkpoint = str(checkpoint) if checkpoint is not None else None
    index.save(out)
    return index


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"--param {item!r} is not of the form NAME=VALUE (e.g. nlist=1024)")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embeddings", required=True, help="Embeddings HDF5 file (from `foundation export`)."
    )
    parser.add_argument(
        "--modality", required=True, help="Which modality's vectors to index (e.g. spectrum)."
    )
    parser.add_argument("--out", required=True, help="Index directory to write (index.faiss + index.json).")
    parser.add_argument(
        "--kind",
        default="auto",
        choices=["auto", *KINDS],
        help="auto = exact flat up to --exact-max vectors, IVF above (default: auto).",
    )
    parser.add_argument(
        "--exact-max",
        type=int,
        help="Largest N that auto indexes exactly (default: as many as fit 1 GiB of float32, "
        "262144 at 1024-d).",
    )
    parser.add_argument(
        "--target-recall",
        type=float,
        default=DEFAULT_TARGET_RECALL,
        help="Approximate kinds: pick the smallest efSearch/nprobe whose measured recall@k "
        f"reaches this (default {DEFAULT_TARGET_RECALL}).",
    )
    parser.add_argument(
        "--tune-k",
        type=int,
        default=DEFAULT_TUNE_K,
        help=f"k of the tuned recall@k (default {DEFAULT_TUNE_K}).",
    )
    parser.add_argument(
        "--tune-sample",
        type=int,
        default=DEFAULT_TUNE_SAMPLE,
        help=f"Held-out vectors used as tuning queries (default {DEFAULT_TUNE_SAMPLE}, at most N/10).",
    )
    parser.add_argument(
        "--tune-modalities",
        metavar="MOD,...",
        help="Query modalities the knob is tuned for (default: every modality of the file with the "
        "indexed one's dimension, e.g. spectrum,image for a spectrum index).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tuning sample and k-means.")
    parser.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="Set an index parameter (M, efConstruction, nlist, train_points; efSearch/nprobe "
        "fix the query knob instead of tuning it).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing index directory.")


def _run_build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / META_FILE).exists() and not args.overwrite:
        raise DataError(f"{out} already holds an index; pass --overwrite to rebuild it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecallTargetWarning)
        index = build_from_file(
            args.embeddings,
            args.modality,
            out,
            kind=args.kind,
            exact_max=args.exact_max,
            params=_parse_params(args.param),
            target_recall=args.target_recall,
            tune_k=args.tune_k,
            tune_sample=args.tune_sample,
            tune_modalities=args.tune_modalities.split(",") if args.tune_modalities else None,
            seed=args.seed,
        )
    m = index.meta
    build = ", ".join(f"{k}={v}" for k, v in m.params.items() if k != query_knob(m.kind))
    print(
        f"built {m.kind} index over {m.n} {m.modality} vectors (dim {m.dim}{', ' + build if build else ''}) "
        f"in {m.build_seconds:.2f} s -> {out}"
    )
    print(f"  {describe_tuning(m)}")
    for w in caught:
        if issubclass(w.category, RecallTargetWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return 0


# ----------------------------------------------------------------------------- query


def query(
    index_dir: str | Path,
    ids: list[str],
    *,
    query_modality: str,
    k: int = 10,
    embeddings_path: str | Path | None = None,
    exclude_self: bool | None = None,
    params: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Neighbours of each object id's `query_modality` vector in the index.

    `exclude_self` (default: only when querying a modality against itself) drops the query object
    from its own results. Each result lists rank, id, cosine similarity, the row's targets, and
    `match` = whether the neighbour is the query object (its partner in the other modality).
    `params` overrides the recorded query knob (efSearch / nprobe).
    """
    from foundation.embeddings import open_embeddings

    index = VectorIndex.load(index_dir)
    if params:
        index.set_search_params(**params)
    path = embeddings_path or index.meta.embeddings
    if path is None:
        raise DataError(f"{index_dir} does not record its embeddings file; pass --embeddings")
    with open_embeddings(path) as emb:
        if index.meta.ids_sha256 and ids_digest(emb.ids) != index.meta.ids_sha256:
            raise DataError(
                f"{path} is not the embeddings file the index in {index_dir} was built from "
                "(object ids differ); rebuild the index or pass the right --embeddings"
            )
        if exclude_self is None:
            exclude_self = query_modality == index.meta.modality
        rows = emb.rows_of(ids)
        queries = emb.vectors(query_modality, rows)
        # More neighbours than the index holds cannot be returned; faiss would allocate them all.
        sims, found = index.search(queries, min(k + (1 if exclude_self else 0), index.meta.n))
        targets = {t: emb.target(t) for t in emb.target_names}
        results = []
        for qi, oid in enumerate(ids):
            neighbours = []
            for sim, row in zip(sims[qi], found[qi], strict=False):
                if row < 0:
                    continue
                nid = str(emb.ids[row])
                if exclude_self and nid == oid:
                    continue
                neighbours.append(
                    {
                        "rank": len(neighbours) + 1,
                        "id": nid,
                        "similarity": float(sim),
                        "match": nid == oid,
                        "targets": {t: _finite_or_none(v[row]) for t, v in targets.items()},
                    }
                )
                if len(neighbours) == k:
                    break
            q_row = rows[qi]
            results.append(
                {
                    "query": oid,
                    "query_modality": query_modality,
                    "index_modality": index.meta.modality,
                    "query_targets": {t: _finite_or_none(v[q_row]) for t, v in targets.items()},
                    "neighbours": neighbours,
                }
            )
    return results


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def format_results(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        qt = ", ".join(f"{k}={v:.4g}" for k, v in res["query_targets"].items() if v is not None)
        lines.append(
            f"query {res['query']} ({res['query_modality']} -> {res['index_modality']})"
            + (f"  [{qt}]" if qt else "")
        )
        names = list(res["query_targets"])
        header = f"  {'rank':>4}  {'id':<24} {'similarity':>10}" + "".join(f" {n:>12}" for n in names)
        lines.append(header)
        for nb in res["neighbours"]:
            cells = "".join(
                f" {nb['targets'][n]:>12.4g}" if nb["targets"][n] is not None else f" {'-':>12}"
                for n in names
            )
            mark = "  <- same object" if nb["match"] else ""
            lines.append(f"  {nb['rank']:>4}  {nb['id']:<24} {nb['similarity']:>10.4f}{cells}{mark}")
    return "\n".join(lines)


def _parse_fields(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    from pipelines.raw_inputs import parse_field_map

    return parse_field_map(text, [])


def _read_ids_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--ids-file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--ids-file {path} is not a UTF-8 text file (one object id per line)") from None
    ids = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not ids:
        raise DataError(f"--ids-file {path} lists no object ids (one per line)")
    return ids


def _add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="Index directory from `foundation search build`.")
    parser.add_argument(
        "--embeddings",
        help="Embeddings file holding the query vectors (default: the one the index was built from).",
    )
    parser.add_argument("--query-modality", required=True, help="Modality of the query vectors (e.g. image).")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--id", action="append", dest="ids", metavar="OBJ", help="Object id to query (repeatable)."
    )
    who.add_argument("--ids-file", help="File with one object id per line.")
    parser.add_argument("--k", type=int, default=10, help="Neighbours per query (default 10).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    parser.add_argument("--save", metavar="JSON", help="Also write the results as JSON to this file.")
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="PNG of each query's input beside its neighbours' inputs (query image, retrieved spectra).",
    )
    parser.add_argument(
        "--data", help="Shard set holding the raw inputs, for --plot (default: the export's)."
    )
    parser.add_argument(
        "--plot-fields", metavar="MOD=FIELD,...", help="Sample field of each modality's input, for --plot."
    )
    parser.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="Override the query knob recorded at build (efSearch for HNSW, nprobe for IVF).",
    )
    parser.add_argument(
        "--include-self",
        action="store_true",
        help="Keep the query object in its own results when querying a modality against itself.",
    )


def _run_query(args: argparse.Namespace) -> int:
    ids = args.ids or _read_ids_file(args.ids_file)
    results = query(
        args.index,
        ids,
        query_modality=args.query_modality,
        k=args.k,
        embeddings_path=args.embeddings,
        exclude_self=False if args.include_self else None,
        params=_parse_params(args.param),
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_results(results))
    if args.save:
        save = Path(args.save)
        save.parent.mkdir(parents=True, exist_ok=True)
        tmp = save.with_name(save.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(save)
    if args.plot:
        from pipelines.search_plot import plot_neighbours

        path = plot_neighbours(
            results,
            args.plot,
            data=args.data,
            embeddings=args.embeddings or VectorIndex.load(args.index).meta.embeddings,
            fields=_parse_fields(args.plot_fields),
        )
        if not args.json:
            print(f"plot -> {path}")
    return 0


COMMANDS = [
    Command(
        ("search", "build"),
        "Build a faiss index over one modality of an embeddings file.",
        _add_build_arguments,
        _run_build,
    ),
    Command(
        ("search", "query"),
        "Find the nearest neighbours of objects (cross-modal: image queries against a spectrum index).",
        _add_query_arguments,
        _run_query,
    ),
]
