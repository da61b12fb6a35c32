"""Indexes over embeddings files: build one modality's index, and query it by object id.

Search results are embeddings-file rows; an index records a hash of the file's object ids, which
`query` checks, so that rows are never read from another file than the one indexed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError
from foundation.search.index import VectorIndex
from foundation.search.kinds import normalized
from foundation.search.stream import add_shard, merge_shards, plan_build, read_plan, shard_done
from foundation.search.tuning import DEFAULT_TARGET_RECALL, DEFAULT_TUNE_K, DEFAULT_TUNE_SAMPLE, tuning_rows

STEPS = ("all", "plan", "add", "merge")


def ids_digest(ids: np.ndarray) -> str:
    """sha256 of the ordered object ids: ties index rows to embeddings rows."""
    h = hashlib.sha256()
    for oid in ids.tolist():
        h.update(str(oid).encode())
        h.update(b"\0")
    return h.hexdigest()


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


class FileSource:
    """One modality of one or many embeddings files (e.g. an export's parts, in part order) as a
    VectorSource: rows are numbered across the files in the order given."""

    def __init__(self, paths: list[str | Path], modality: str) -> None:
        from foundation.embeddings import open_embeddings

        if not paths:
            raise DataError("no embeddings files given")
        self.paths = [Path(p) for p in paths]
        self.modality = modality
        self.files = [open_embeddings(p) for p in self.paths]
        dims = {e.dim(modality) for e in self.files}
        if len(dims) != 1:
            raise DataError(f"the embeddings files disagree on the dimension of {modality}: {sorted(dims)}")
        self.dim = dims.pop()
        self.offsets = np.cumsum([0] + [len(e) for e in self.files])
        self.n = int(self.offsets[-1])

    def normalized(self) -> bool:
        return all(e.normalized(self.modality) for e in self.files)

    def ids(self) -> np.ndarray:
        return np.concatenate([e.ids for e in self.files])

    def read(self, rows: np.ndarray, modality: str | None = None) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for f in np.unique(which):
            sel = which == f
            out[sel] = self.files[f].vectors(modality or self.modality, rows[sel] - self.offsets[f])
        return out

    def blocks(self, start: int, stop: int, size: int):
        for s in range(start, stop, size):
            yield s, self.read(np.arange(s, min(stop, s + size)))

    def close(self) -> None:
        for e in self.files:
            e.close()


def build_streamed_from_files(
    embeddings_paths: list[str | Path],
    modality: str,
    out: str | Path,
    *,
    kind: str = "ivf",
    shards: int = 1,
    step: str = "all",
    shard: int | None = None,
    params: dict[str, Any] | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    tune_k: int = DEFAULT_TUNE_K,
    tune_sample: int = DEFAULT_TUNE_SAMPLE,
    tune_modalities: list[str] | None = None,
    seed: int = 0,
    device: str = "auto",
    chunk_rows: int = 20_000,
) -> VectorIndex | None:
    """Index one modality of one or many embeddings files without loading all vectors (see
    foundation.search.stream): the work folder is `out/build/`; `step` runs one stage of it (plan;
    add — every unfinished shard, or only `shard`; merge) for a SLURM array, `all` every stage,
    skipping what is done. Returns the index after a merge, else None."""
    if step not in STEPS:
        raise DataError(f"--step {step!r} is not one of {', '.join(STEPS)}")
    out = Path(out)
    work = out / "build"
    source = FileSource(list(embeddings_paths), modality)
    try:
        if step in ("all", "plan") and not (work / "plan.json").is_file():
            first = source.files[0]
            tune_modalities = tune_modalities or [
                m for m in first.modalities if m == modality or first.dim(m) == source.dim
            ]
            held = tuning_rows(source.n, tune_sample, seed)
            queries = {m: None if m == modality else source.read(held, m) for m in tune_modalities}
            plan_build(
                source, work, kind=kind, shards=shards, normalize=not source.normalized(), params=params,
                seed=seed, target_recall=target_recall, tune_k=tune_k, tune_sample=tune_sample,
                tune_queries=queries, device=device,
                extra={"embeddings": [str(p.resolve()) for p in source.paths], "modality": modality},
            )  # fmt: skip
        _check_plan_matches(work, kind, source)
        if step in ("all", "add"):
            plan = read_plan(work)
            for i in [shard] if shard is not None else range(plan["shards"]):
                if not shard_done(work, i):
                    add_shard(source, work, i, chunk_rows=chunk_rows)
        if step not in ("all", "merge"):
            return None
        index = merge_shards(source, work)
        index.meta.modality = modality
        index.meta.embeddings = str(source.paths[0].resolve()) if len(source.paths) == 1 else None
        index.meta.ids_sha256 = ids_digest(source.ids())
        checkpoint = source.files[0].attrs.get("checkpoint")
        index.meta.checkpoint = str(checkpoint) if checkpoint is not None else None
    finally:
        source.close()
    index.save(out)
    import shutil

    shutil.rmtree(work)
    return index


def _check_plan_matches(work: Path, kind: str, source: FileSource) -> None:
    """A resumed build must be of the same files, modality and kind as its plan."""
    if not (work / "plan.json").is_file():
        return
    plan = read_plan(work)
    now = {"kind": kind, "n": source.n, "modality": source.modality}
    now["embeddings"] = [str(p.resolve()) for p in source.paths]
    differ = [key for key, value in now.items() if plan.get(key) != value]
    if differ:
        raise DataError(
            f"{work} holds an unfinished build with other {', '.join(differ)} "
            f"({', '.join(f'{k}={plan.get(k)!r}' for k in differ)}); pass --overwrite to start again"
        )


def stored_reader(emb: Any, modality: str, normalize: bool):
    """rows -> the (normalised) vectors of `modality` in an open embeddings file: PQ re-ranking."""

    def read(rows: np.ndarray) -> np.ndarray:
        v = emb.vectors(modality, rows)
        return normalized(v, inplace=True) if normalize else v

    return read


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
        if index.meta.modality in emb.modalities:
            index.attach_vectors(stored_reader(emb, index.meta.modality, index.meta.normalize))
        # More neighbours than the index holds cannot be returned; faiss would allocate them all.
        sims, found = index.search(queries, min(k + (1 if exclude_self else 0), index.meta.n))
        targets = {t: emb.target(t) for t in emb.target_names}
        results = []
        for qi, oid in enumerate(ids):
            results.append(
                {
                    "query": oid,
                    "query_modality": query_modality,
                    "index_modality": index.meta.modality,
                    "query_targets": targets_of(targets, rows[qi]),
                    "neighbours": ranked_neighbours(
                        emb.ids, targets, oid, sims[qi], found[qi], k, exclude_self
                    ),
                }
            )
    return results


def ranked_neighbours(
    object_ids: np.ndarray,
    targets: dict[str, np.ndarray],
    oid: str,
    sims: np.ndarray,
    found: np.ndarray,
    k: int,
    exclude_self: bool,
) -> list[dict[str, Any]]:
    """The first k answers of one query (ranked), without empty slots and, with `exclude_self`,
    without the query object itself."""
    neighbours: list[dict[str, Any]] = []
    for sim, row in zip(sims, found, strict=False):
        if row < 0:
            continue
        nid = str(object_ids[row])
        if exclude_self and nid == oid:
            continue
        neighbours.append(
            {
                "rank": len(neighbours) + 1,
                "id": nid,
                "similarity": float(sim),
                "match": nid == oid,
                "targets": targets_of(targets, row),
            }
        )
        if len(neighbours) == k:
            break
    return neighbours


def targets_of(targets: dict[str, np.ndarray], row: int) -> dict[str, float | None]:
    """One object's targets by name, a missing (non-finite) value as None (JSON null)."""
    return {t: _finite_or_none(v[row]) for t, v in targets.items()}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
