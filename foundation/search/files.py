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
from foundation.search.tuning import DEFAULT_TARGET_RECALL, DEFAULT_TUNE_K, DEFAULT_TUNE_SAMPLE, tuning_rows


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
            results.append(
                {
                    "query": oid,
                    "query_modality": query_modality,
                    "index_modality": index.meta.modality,
                    "query_targets": _targets_of(targets, rows[qi]),
                    "neighbours": _neighbours(emb.ids, targets, oid, sims[qi], found[qi], k, exclude_self),
                }
            )
    return results


def _neighbours(
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
                "targets": _targets_of(targets, row),
            }
        )
        if len(neighbours) == k:
            break
    return neighbours


def _targets_of(targets: dict[str, np.ndarray], row: int) -> dict[str, float | None]:
    return {t: _finite_or_none(v[row]) for t, v in targets.items()}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
