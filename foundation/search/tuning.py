"""Recall tuning: the smallest query knob (efSearch, nprobe) whose measured recall@k reaches a target.

The recall at a given knob depends on the data, so it is measured at build time: a seeded sample of
the database's own vectors is held out of the index while it is built, queried against it, and
compared with exact search over the rest. The held-out vectors are added afterwards (with their own
row ids), so the index is complete and the measurement is not flattered by queries that are index
points.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from foundation.errors import DataError
from foundation.search.kinds import ADD_CHUNK, add_vectors, as_float32, normalized, set_knob

if TYPE_CHECKING:
    from foundation.search.index import IndexParams

DEFAULT_TARGET_RECALL = 0.95
DEFAULT_TUNE_K = 10
DEFAULT_TUNE_SAMPLE = 300
MAX_EF_SEARCH = 4096  # beyond this an HNSW query costs about as much as an exact scan


class RecallTargetWarning(UserWarning):
    """An approximate index cannot reach the requested recall with any query knob tried."""


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


def knob_candidates(knob: str, k: int, indexed: int, nlist: int | None) -> list[int]:
    """The doubling ladder `tune_knob` climbs: efSearch from 16 up to MAX_EF_SEARCH (and at least k),
    nprobe from 1 up to nlist."""
    if knob == "efSearch":
        cap = max(k, min(MAX_EF_SEARCH, indexed))
        candidates = sorted({min(cap, 2**e) for e in range(4, 13)} | {cap})
        return [c for c in candidates if c >= k] or [cap]
    assert nlist is not None
    return sorted({min(nlist, 2**e) for e in range(0, max(1, nlist.bit_length()))} | {nlist})


def tuning_query_sets(
    vectors: np.ndarray,
    held: np.ndarray,
    k: int,
    tune_queries: dict[str, np.ndarray | None] | None,
    normalize: bool,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each named query set (None: the held-out rows' own vectors) with its ground truth, the exact
    top-k over the vectors that are not held out."""
    sets = {}
    for name, q in (tune_queries or {"indexed": None}).items():
        if q is None:
            q = vectors[held]
        elif q.shape != (len(held), vectors.shape[1]):
            raise DataError(
                f"tuning queries {name!r} have shape {q.shape}, expected {(len(held), vectors.shape[1])}"
            )
        else:
            q = normalized(q) if normalize else as_float32(q)
        sets[name] = (q, exact_knn(vectors, q, k, skip_rows=held))
    return sets


def add_tuned(
    index: Any,
    vectors: np.ndarray,
    *,
    kind: str,
    knob: str,
    nlist: int | None,
    seed: int,
    target: float,
    k: int,
    sample: int,
    tune_queries: dict[str, np.ndarray | None] | None,
    normalize: bool,
    fixed: int | None,
    search_rows: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Add all rows to `index` (an id-mapped or IVF index), measuring recall on a held-out sample.

    `search_rows(queries, k)` answers the measured searches (default: `index.search`'s rows; a PQ
    kind passes its re-ranking search).
    The sample's rows are added last, after the measurement: while it runs the index holds the
    other N - S vectors and the ground truth is exact search over those same vectors.
    """

    n = len(vectors)
    held = tuning_rows(n, sample, seed)
    rest = np.setdiff1d(np.arange(n), held)
    add_vectors(index, vectors, rest, f"indexing ({kind})")
    start = time.perf_counter()
    k = max(1, min(k, len(rest)))
    sets = tuning_query_sets(vectors, held, k, tune_queries, normalize)
    result = tune_on_sets(
        index,
        sets,
        knob=knob,
        k=k,
        indexed=len(rest),
        nlist=nlist,
        target=target,
        fixed=fixed,
        search_rows=search_rows,
        progress=n >= 2 * ADD_CHUNK,
    )
    seconds = time.perf_counter() - start
    add_vectors(index, vectors, held, f"indexing ({kind}, held-out)")
    result.update(sample=len(held), seed=seed, seconds=round(seconds, 3))
    return result


def tune_on_sets(
    index: Any,
    sets: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    knob: str,
    k: int,
    indexed: int,
    nlist: int | None,
    target: float,
    fixed: int | None,
    search_rows: Callable[[np.ndarray, int], np.ndarray] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """`tune_knob` over named (queries, exact top-k) sets: the knob must reach `target` on each."""
    from tqdm.auto import tqdm

    search_rows = search_rows or (lambda q, kk: index.search(q, kk)[1])
    per_set: dict[int, dict[str, float]] = {}
    bar = tqdm(desc=f"tuning {knob}", unit="try", disable=not sys.stderr.isatty() or not progress)

    def measure(value: int) -> float:
        set_knob(index, knob, value)
        per_set[value] = {name: recall_at_k(truth, search_rows(q, k)) for name, (q, truth) in sets.items()}
        bar.set_postfix_str(f"{knob}={value} recall@{k}={min(per_set[value].values()):.3f}")
        bar.update(1)
        return min(per_set[value].values())

    result = tune_knob(measure, knob, knob_candidates(knob, k, indexed, nlist), target, fixed=fixed)
    bar.close()
    result.update(
        recall_by_queries={name: round(r, 4) for name, r in per_set[result["value"]].items()},
        target_recall=target,
        k=k,
        fixed=fixed is not None,
    )
    return result


def recall_warning(meta: IndexParams, target: float) -> str:
    """What a build that missed its recall target says, with what to change."""
    t = meta.tuning or {}
    tried = "" if t.get("fixed") else f" (the best of {t['knob']} up to {t['curve'][-1][0]})"
    if meta.kind.endswith(("-sq8", "-fp16")):
        remedy = f"--kind {meta.kind.rsplit('-', 1)[0]} (full vectors: its scalar codes limit recall)"
    elif "-pq" in meta.kind:
        remedy = "a larger rerank or pq_m (--param; re-ranking needs the embeddings file)"
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
