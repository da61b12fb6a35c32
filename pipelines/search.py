"""`foundation search build|query`: faiss indexes over exported embeddings, and cross-modal queries.

An index directory holds `index.faiss` (the faiss index), `index.json` (kind, parameters, which
embeddings file and modality it indexes, a hash of its object ids, build time) and nothing else:
row `i` of the index is row `i` of the embeddings file, which `query` checks through the id hash.
Similarity is cosine: vectors are L2-normalised before indexing and querying unless the file
records them as normalised already, so inner product == cosine.

Index kind by size (`--kind auto`): exact `Flat` inner product up to `--exact-max` vectors
(default 50 000: a 1024-d brute-force query over 5e4 vectors is ~50 MFLOP, about a millisecond),
HNSW above that (no training, high recall; M=32, efConstruction=80, efSearch=128), and IVF-Flat
with nlist ~ 4 sqrt(N) and nprobe = nlist/16 on request (less memory per vector than HNSW, training
needed). The measured latency/recall of each is in benchmarks/search.py and docs/search.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foundation.cli import Command
from foundation.errors import DataError

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
DEFAULT_EXACT_MAX = 50_000


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


def choose_kind(n: int, exact_max: int = DEFAULT_EXACT_MAX) -> str:
    return "flat" if n <= exact_max else "hnsw"


def default_params(kind: str, n: int) -> dict[str, Any]:
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    if kind == "ivf":
        nlist = int(max(1, min(n // 39, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))))
        return {"nlist": nlist, "nprobe": max(1, nlist // 16)}
    raise DataError(f"unknown index kind {kind!r}; choose auto, flat, hnsw or ivf")


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _normalized(x: np.ndarray) -> np.ndarray:
    x = _as_float32(x).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise DataError(f"{int((norms == 0).sum())} zero vectors cannot be normalised for cosine search")
    return x / norms


class VectorIndex:
    """A faiss index plus its parameters; rows are embeddings-file rows."""

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
        exact_max: int = DEFAULT_EXACT_MAX,
        params: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> VectorIndex:
        """Index (N, D) vectors; `normalize` L2-normalises them (cosine similarity)."""
        faiss = import_faiss()

        vectors = _normalized(vectors) if normalize else _as_float32(vectors)
        n, dim = vectors.shape
        if n == 0:
            raise DataError("cannot build an index over zero vectors")
        kind = choose_kind(n, exact_max) if kind == "auto" else kind
        p = default_params(kind, n)
        p.update(params or {})
        start = time.perf_counter()
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(p["efConstruction"])
            index.hnsw.efSearch = int(p["efSearch"])
        else:
            if n < p["nlist"]:
                raise DataError(f"IVF with nlist={p['nlist']} needs at least that many vectors, got {n}")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, int(p["nlist"]), faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            train = vectors
            max_train = 256 * int(p["nlist"])  # faiss's own cap on k-means training points
            if n > max_train:
                rows = np.random.default_rng(seed).choice(n, max_train, replace=False)
                train = vectors[np.sort(rows)]
            index.train(train)
            index.nprobe = int(p["nprobe"])
        index.add(vectors)
        meta = IndexParams(
            kind=kind,
            n=n,
            dim=dim,
            normalize=normalize,
            params=p,
            build_seconds=round(time.perf_counter() - start, 3),
            faiss_version=faiss.__version__,
        )
        return cls(index, meta)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, rows), each (Q, k); rows of -1 where fewer than k neighbours exist."""
        queries = _normalized(queries) if self.meta.normalize else _as_float32(queries)
        if queries.shape[1] != self.meta.dim:
            raise DataError(f"query vectors have dimension {queries.shape[1]}, the index has {self.meta.dim}")
        k = min(int(k), self.meta.n)
        sims, rows = self.index.search(queries, k)
        return sims, rows

    def set_search_params(self, **params: Any) -> None:
        """Adjust query-time knobs (efSearch for HNSW, nprobe for IVF)."""
        if self.meta.kind == "hnsw" and "efSearch" in params:
            self.index.hnsw.efSearch = int(params["efSearch"])
        if self.meta.kind == "ivf" and "nprobe" in params:
            self.index.nprobe = int(params["nprobe"])
        self.meta.params.update(params)

    def save(self, directory: str | Path) -> Path:
        """Write index.faiss and index.json into `directory` (each atomically)."""
        faiss = import_faiss()

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (INDEX_FILE + ".tmp")
        faiss.write_index(self.index, str(tmp))
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
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise DataError(
                f"{index_path} is not a readable faiss index: {str(exc).splitlines()[0]}"
            ) from None
        if index.ntotal != meta.n or index.d != meta.dim:
            raise DataError(
                f"{index_path} holds {index.ntotal}x{index.d} vectors but {meta_path} says "
                f"{meta.n}x{meta.dim}"
            )
        out = cls(index, meta)
        out.set_search_params(**{k: v for k, v in meta.params.items() if k in ("efSearch", "nprobe")})
        return out


# ----------------------------------------------------------------------------- build


def build_from_file(
    embeddings_path: str | Path,
    modality: str,
    out: str | Path,
    *,
    kind: str = "auto",
    exact_max: int = DEFAULT_EXACT_MAX,
    params: dict[str, Any] | None = None,
) -> VectorIndex:
    from foundation.embeddings import open_embeddings

    with open_embeddings(embeddings_path) as emb:
        vectors = emb.vectors(modality)
        index = VectorIndex.build(
            vectors, kind=kind, normalize=not emb.normalized(modality), exact_max=exact_max, params=params
        )
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
        choices=["auto", "flat", "hnsw", "ivf"],
        help="auto = exact Flat up to --exact-max vectors, HNSW above (default: auto).",
    )
    parser.add_argument("--exact-max", type=int, default=DEFAULT_EXACT_MAX, help="Largest N indexed exactly.")
    parser.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="Override an index parameter (M, efSearch, nlist, nprobe).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing index directory.")


def _run_build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / META_FILE).exists() and not args.overwrite:
        raise DataError(f"{out} already holds an index; pass --overwrite to rebuild it")
    index = build_from_file(
        args.embeddings,
        args.modality,
        out,
        kind=args.kind,
        exact_max=args.exact_max,
        params=_parse_params(args.param),
    )
    m = index.meta
    extra = ", ".join(f"{k}={v}" for k, v in m.params.items())
    print(
        f"built {m.kind} index over {m.n} {m.modality} vectors (dim {m.dim}{', ' + extra if extra else ''}) "
        f"in {m.build_seconds:.2f} s -> {out}"
    )
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
) -> list[dict[str, Any]]:
    """Neighbours of each object id's `query_modality` vector in the index.

    `exclude_self` (default: only when querying a modality against itself) drops the query object
    from its own results. Each result lists rank, id, cosine similarity, the row's targets, and
    `match` = whether the neighbour is the query object (its partner in the other modality).
    """
    from foundation.embeddings import open_embeddings

    index = VectorIndex.load(index_dir)
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
        sims, found = index.search(queries, k + (1 if exclude_self else 0))
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
    ids = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
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
        "--include-self",
        action="store_true",
        help="Keep the query object in its own results when querying a modality against itself.",
    )


def _run_query(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise DataError("--k must be >= 1")
    ids = args.ids or _read_ids_file(args.ids_file)
    results = query(
        args.index,
        ids,
        query_modality=args.query_modality,
        k=args.k,
        embeddings_path=args.embeddings,
        exclude_self=False if args.include_self else None,
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
