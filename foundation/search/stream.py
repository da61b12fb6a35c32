"""Streamed and sharded index builds: train on a sample, add vectors in chunks, merge shards.

For inverted-list kinds (ivf, ivf-sq8, ivf-pq, opq-ivf-pq), so that an index of 10^7-10^8 rows is
built without holding its float vectors in memory, by one process or by a SLURM array:

1. `plan_build` trains the empty index on a seeded sample, picks the held-out tuning rows (as
   `VectorIndex.build` does) and writes both, with the tuning queries, into a work folder;
2. `add_shard(work, i)` adds shard i's rows (a contiguous range) to a copy of the trained index, in
   chunks, and computes the exact top-k of the tuning queries over the same rows; it writes
   `shard-IIIII.faiss` and `shard-IIIII.truth.npz` — a finished shard is skipped, so an
   interrupted build resumes where it stopped;
3. `merge_shards(work, out)` joins the shards' inverted lists (`merge_from`) and their partial
   exact top-k, tunes the query knob on the held-out rows, adds them, and saves the index.

The held-out rows are left out of every shard and added at the end, so the merged index equals a
single-process build over the same rows and the recall measurement is not flattered.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from foundation.atomic import replacing, write_json
from foundation.errors import DataError
from foundation.search.gpu import resolve_faiss_device, train_index
from foundation.search.index import (
    IndexParams,
    VectorIndex,
    kind_and_params,
    rerank_factor,
    reranked,
)
from foundation.search.kinds import (
    ADD_CHUNK,
    PARAM_MAX,
    as_float32,
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
    recall_at_k,
    recall_warning,
    tune_on_sets,
    tuning_rows,
)

PLAN_FILE = "plan.json"
TRAINED_FILE = "trained.faiss"


def max_auto_rerank(n: int) -> int:
    """The largest re-ranking factor the tuning may reach by doubling: 64 up to 10^6 rows, then
    twice as many for every four times the rows, up to the parameter's bound. More rows put more
    near-ties inside the codes' error, so the true top k spreads over more candidates: on realistic
    512-d embeddings 64 reached recall@10 0.957 at 10^6 but only 0.884 at 10^7, where 256 gave 0.952
    (and a lower p50, as nprobe could fall)."""
    factor, rows = 64, 1_000_000
    while rows < n and factor < PARAM_MAX["rerank"]:
        factor, rows = 2 * factor, 4 * rows
    return min(factor, PARAM_MAX["rerank"])


class VectorSource(Protocol):
    """Rows of vectors that can be read by index and streamed in blocks (an array, memmap, files)."""

    n: int
    dim: int

    def read(self, rows: np.ndarray) -> np.ndarray: ...

    def blocks(self, start: int, stop: int, size: int) -> Iterator[tuple[int, np.ndarray]]: ...


@dataclass
class ArraySource:
    """An in-memory array or a `np.memmap` as a VectorSource."""

    array: np.ndarray

    @property
    def n(self) -> int:
        return len(self.array)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def read(self, rows: np.ndarray) -> np.ndarray:
        return as_float32(self.array[np.asarray(rows)])

    def blocks(self, start: int, stop: int, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(start, stop, size):
            yield s, as_float32(self.array[s : min(stop, s + size)])


def shard_bounds(n: int, shards: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `index` of `shards` near-equal contiguous ranges."""
    if not 0 <= index < shards:
        raise DataError(f"shard {index} does not exist: there are {shards} (0..{shards - 1})")
    return n * index // shards, n * (index + 1) // shards


def _shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:05d}{suffix}"


def _write_index(faiss: Any, index: Any, path: Path) -> None:
    """Serialise in memory, write to a temporary and rename (faiss's own writer leaves debris)."""
    blob = faiss.serialize_index(index)
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(blob.data)


def _read_own_index(faiss: Any, path: Path) -> Any:
    """An index this module wrote into its work folder (a missing or unreadable one is a DataError)."""
    if not path.is_file():
        raise DataError(f"{path} is missing; run the step that writes it (plan, then add) first")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DataError(
            f"{path} is not a readable faiss index ({str(exc).splitlines()[0]}); delete it"
        ) from None


def read_plan(work: str | Path) -> dict[str, Any]:
    path = Path(work) / PLAN_FILE
    if not path.is_file():
        raise DataError(f"{work} holds no build plan ({PLAN_FILE}); run the plan step first")
    return json.loads(path.read_text())


def plan_build(
    source: VectorSource,
    work: str | Path,
    *,
    kind: str = "ivf",
    shards: int = 1,
    normalize: bool = True,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    target_recall: float = DEFAULT_TARGET_RECALL,
    tune_k: int = DEFAULT_TUNE_K,
    tune_sample: int = DEFAULT_TUNE_SAMPLE,
    tune_queries: dict[str, np.ndarray | None] | None = None,
    device: str = "auto",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the empty index on a seeded sample and write the plan into `work` (see module doc).

    `tune_queries` as in `VectorIndex.build`: each the held-out rows' vectors in another modality,
    or None for the rows' own vectors. `extra` is recorded in the plan (e.g. the source files).
    """
    faiss = import_faiss()
    n, dim = source.n, source.dim
    if n == 0:
        raise DataError("cannot build an index over zero vectors")
    if not 0.0 < target_recall <= 1.0:
        raise DataError(f"--target-recall {target_recall} must be in (0, 1]")
    kind, p = kind_and_params(kind, n, dim, 0, params)
    if not is_ivf(kind):
        raise DataError(f"a streamed or sharded build needs an inverted-list kind (ivf*, *-pq), not {kind}")
    if shards < 1 or shards > n:
        raise DataError(f"--shards {shards} must be between 1 and the number of vectors ({n})")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, int(p["train_points"])), replace=False))
    train = source.read(sample)
    train = normalized(train, inplace=True) if normalize else train
    index = faiss.index_factory(dim, factory_string(kind, p), faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = seed
    index = train_index(faiss, index, train, resolve_faiss_device(device))
    del train
    held = tuning_rows(n, tune_sample, seed)
    for name, q in (tune_queries or {"indexed": None}).items():
        q = source.read(held) if q is None else q
        if q.shape != (len(held), dim):
            raise DataError(f"tuning queries {name!r} have shape {q.shape}, expected {(len(held), dim)}")
        np.save(work / f"queries-{name}.npy", normalized(q) if normalize else as_float32(q))
    _write_index(faiss, index, work / TRAINED_FILE)
    plan = {
        "kind": kind,
        "params": p,
        "n": n,
        "dim": dim,
        "normalize": normalize,
        "seed": seed,
        "shards": shards,
        "held": held.tolist(),
        "query_sets": list(tune_queries or {"indexed": None}),
        "target_recall": target_recall,
        "tune_k": max(1, min(tune_k, n - len(held))),
        "fixed": (params or {}).get(query_knob(kind)),
        "rerank_given": "rerank" in (params or {}),
        "train_seconds": round(time.perf_counter() - start, 3),
        **(extra or {}),
    }
    write_json(work / PLAN_FILE, plan, indent=2)
    return plan


def shard_done(work: str | Path, index: int) -> bool:
    work = Path(work)
    return (work / _shard_name(index, ".faiss")).is_file() and (
        work / _shard_name(index, ".truth.npz")
    ).is_file()


def add_shard(
    source: VectorSource, work: str | Path, index: int, *, chunk_rows: int = ADD_CHUNK, progress: bool = True
) -> bool:
    """Add shard `index`'s rows to a copy of the trained index (skipped if already done: False)."""
    faiss = import_faiss()
    work = Path(work)
    plan = read_plan(work)
    if source.n != plan["n"] or source.dim != plan["dim"]:
        raise DataError(
            f"the vectors ({source.n}x{source.dim}) are not those {work} was planned for "
            f"({plan['n']}x{plan['dim']})"
        )
    if shard_done(work, index):
        return False
    start_row, stop_row = shard_bounds(plan["n"], plan["shards"], index)
    ivf_index = _read_own_index(faiss, work / TRAINED_FILE)
    held = np.asarray(plan["held"], dtype=np.int64)
    sets = {name: np.load(work / f"queries-{name}.npy") for name in plan["query_sets"]}
    k = plan["tune_k"]
    best = {
        name: (np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64))
        for name, q in sets.items()
    }
    with _progress(stop_row - start_row, f"adding shard {index}", progress) as bar:
        for s, block in source.blocks(start_row, stop_row, chunk_rows):
            rows = np.arange(s, s + len(block), dtype=np.int64)
            keep = ~np.isin(rows, held)
            block, rows = block[keep], rows[keep]
            if plan["normalize"]:
                block = normalized(block, inplace=True)
            if len(rows):
                ivf_index.add_with_ids(block, rows)
                for name, q in sets.items():
                    best[name] = _top_k_merge(best[name], q @ block.T, rows, k)
            bar.update(int(keep.size))
    np.savez(
        _temp_npz(work, index),
        **{f"sims_{name}": best[name][0] for name in sets},
        **{f"rows_{name}": best[name][1] for name in sets},
    )
    _temp_npz(work, index).replace(work / _shard_name(index, ".truth.npz"))
    _write_index(faiss, ivf_index, work / _shard_name(index, ".faiss"))
    return True


def _temp_npz(work: Path, index: int) -> Path:
    return work / _shard_name(index, ".truth.tmp.npz")


def _top_k_merge(
    best: tuple[np.ndarray, np.ndarray], sims: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of the current best (sims, rows) and a new block's sims over `rows`."""
    all_sims = np.concatenate([best[0], sims.astype(np.float32)], axis=1)
    all_rows = np.concatenate([best[1], np.broadcast_to(rows, sims.shape)], axis=1)
    kk = min(k, all_sims.shape[1])
    top = np.argpartition(-all_sims, kk - 1, axis=1)[:, :kk] if kk else np.zeros((len(sims), 0), int)
    return np.take_along_axis(all_sims, top, axis=1), np.take_along_axis(all_rows, top, axis=1)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="vec", disable=not enabled or not sys.stderr.isatty())


def merge_shards(
    source: VectorSource,
    work: str | Path,
    *,
    stored: Callable[[np.ndarray], np.ndarray] | None = None,
) -> VectorIndex:
    """Join the finished shards, tune the knob on the held-out rows, add them; the VectorIndex.

    `stored(sorted rows)` reads the float vectors a PQ kind re-ranks with (default: the source's,
    normalised as planned).
    """
    faiss = import_faiss()
    work = Path(work)
    plan = read_plan(work)
    missing = [i for i in range(plan["shards"]) if not shard_done(work, i)]
    if missing:
        raise DataError(
            f"{len(missing)} of {plan['shards']} shards in {work} are not finished (shards {missing[:10]}); "
            "run the add step for them first"
        )
    start = time.perf_counter()
    index = _read_own_index(faiss, work / TRAINED_FILE)
    ivf = faiss.extract_index_ivf(index)
    truth: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    k = plan["tune_k"]
    for i in range(plan["shards"]):
        part = _read_own_index(faiss, work / _shard_name(i, ".faiss"))
        ivf.merge_from(faiss.extract_index_ivf(part), 0)
        del part
        with np.load(work / _shard_name(i, ".truth.npz"), allow_pickle=False) as z:
            for name in plan["query_sets"]:
                prev = truth.get(name)
                sims, rows = z[f"sims_{name}"], z[f"rows_{name}"]
                truth[name] = (sims, rows) if prev is None else _top_k_merge(prev, sims, rows, k)
    index.ntotal = ivf.ntotal  # a pre-transform (OPQ) wrapper counts its vectors itself
    if stored is None:
        stored = _normalised_reader(source, plan["normalize"])
    sets = {name: (np.load(work / f"queries-{name}.npy"), _sorted_rows(*truth[name])) for name in truth}
    kind, p = plan["kind"], dict(plan["params"])
    knob = query_knob(kind)
    factor = rerank_factor(IndexParams(kind=kind, n=plan["n"], dim=plan["dim"], params=p))
    n_indexed = int(index.ntotal)
    tune = dict(
        knob=knob, k=k, indexed=n_indexed, nlist=p["nlist"], target=plan["target_recall"],
        fixed=plan["fixed"], progress=plan["n"] >= 2 * ADD_CHUNK,
    )  # fmt: skip
    if factor:
        limit = factor if plan.get("rerank_given") else max_auto_rerank(n_indexed)
        factor, tuning = _tune_with_rerank(index, sets, stored, factor, n_indexed, tune, limit)
        p["rerank"] = factor
    else:
        tuning = tune_on_sets(index, sets, **tune)
    held = np.asarray(plan["held"], dtype=np.int64)
    index.add_with_ids(_normalised_reader(source, plan["normalize"])(held), held)
    tuning.update(sample=len(held), seed=plan["seed"], seconds=round(time.perf_counter() - start, 3))
    p[knob] = tuning["value"]
    set_knob(index, knob, p[knob])
    meta = IndexParams(
        kind=kind,
        n=plan["n"],
        dim=plan["dim"],
        normalize=plan["normalize"],
        params=p,
        build_seconds=round(plan.get("train_seconds", 0.0) + time.perf_counter() - start, 3),
        faiss_version=faiss.__version__,
        tuning=tuning,
    )
    if int(index.ntotal) != plan["n"]:
        raise DataError(f"the merged index of {work} holds {index.ntotal} vectors, the plan {plan['n']}")
    if not tuning["reached"]:
        warnings.warn(recall_warning(meta, plan["target_recall"]), RecallTargetWarning, stacklevel=2)
    out = VectorIndex(index, meta)
    if factor:
        out.attach_vectors(stored)
    return out


def _tune_with_rerank(
    index: Any,
    sets: dict[str, tuple[np.ndarray, np.ndarray]],
    stored: Callable[[np.ndarray], np.ndarray],
    factor: int,
    n_indexed: int,
    tune: dict[str, Any],
    limit: int,
) -> tuple[int, dict[str, Any]]:
    """Tune nprobe with re-ranking of factor x k candidates. First the factor: doubled up to
    `limit` until the recall with every list probed (the codes' ceiling) is halfway from the
    target to 1 (0.975 for 0.95); then nprobe at that factor. The recall approaches its ceiling
    slowly as nprobe grows, so a ceiling just above the target costs most of the lists: on
    realistic 1024-d rows (10^6, ivf-pqfs) target 0.96 took nprobe 160 of 2048 at rerank 32
    (6.3 ms p50) and nprobe 60 at rerank 64 (4.4-4.6 ms), re-ranking 320 more rows (~0.6 ms)."""

    def search_with(f: int) -> Callable[[np.ndarray, int], np.ndarray]:
        return lambda q, kk: reranked(index.search, stored, q, kk, f, n_indexed)[1]

    if tune["fixed"] is None:
        set_knob(index, tune["knob"], tune["nlist"])
        wanted = (1 + tune["target"]) / 2
        while 2 * factor <= limit:
            ceiling = min(recall_at_k(t, search_with(factor)(q, tune["k"])) for q, t in sets.values())
            if ceiling >= wanted:
                break
            factor *= 2
    tuning = tune_on_sets(index, sets, search_rows=search_with(factor), **tune)
    tuning["rerank"] = factor
    return factor, tuning


def _sorted_rows(sims: np.ndarray, rows: np.ndarray) -> np.ndarray:
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1)


def _normalised_reader(source: VectorSource, normalize: bool) -> Callable[[np.ndarray], np.ndarray]:
    def read(rows: np.ndarray) -> np.ndarray:
        v = source.read(rows)
        return normalized(v, inplace=True) if normalize else v

    return read


def build_streamed(
    source: VectorSource,
    work: str | Path,
    *,
    shards: int = 1,
    chunk_rows: int = ADD_CHUNK,
    progress: bool = True,
    **plan_options: Any,
) -> VectorIndex:
    """plan, add every shard (resuming finished ones), merge: the whole build in this process."""
    if not (Path(work) / PLAN_FILE).is_file():
        plan_build(source, work, shards=shards, **plan_options)
    for i in range(read_plan(work)["shards"]):
        add_shard(source, work, i, chunk_rows=chunk_rows, progress=progress)
    return merge_shards(source, work)
