"""Index kinds, their build parameters and query knobs, and the faiss calls every kind shares."""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import numpy as np

from foundation.errors import DataError

EXACT_MAX_BYTES = 1 << 30  # auto: exact search while the float32 vectors fit in 1 GiB
KINDS = ("flat", "hnsw", "ivf", "hnsw-sq8", "ivf-sq8", "ivf-fp16", "ivf-pq", "opq-ivf-pq", "ivf-pqfs")
#: Kinds that store product-quantisation codes (pq_m x pq_bits / 8 bytes a vector) and re-rank
#: candidates with the stored float vectors: the kinds for 10^7-10^8 rows, and `ivf-pqfs` (4-bit
#: codes in faiss's fast-scan layout, scored with SIMD lookup tables) for fast single queries.
PQ_KINDS = ("ivf-pq", "opq-ivf-pq", "ivf-pqfs")
#: Scalar-code storage of the IVF/HNSW kinds by name suffix (faiss factory names).
_SCALAR_CODES = {"-sq8": "SQ8", "-fp16": "SQfp16"}
ADD_CHUNK = 20_000  # vectors per add() call: a progress bar step on long builds

#: Upper bounds of index parameters: beyond them faiss allocates without limit (std::bad_alloc).
PARAM_MAX = {
    "M": 512,
    "efConstruction": 1 << 16,
    "efSearch": 1 << 16,
    "nlist": 1 << 24,
    "nprobe": 1 << 24,
    "train_points": 1 << 31,
    "pq_m": 1024,
    "pq_bits": 12,
    "rerank": 1024,
}


@functools.cache
def import_faiss() -> Any:
    """faiss, without its INFO-level log lines about which CPU build it loaded (set once: setting a
    logger's level clears the logging caches, and list-major search asks for faiss once a list)."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def default_exact_max(dim: int) -> int:
    """Largest N searched exactly by `--kind auto`: the vectors fit in EXACT_MAX_BYTES."""
    return max(1, EXACT_MAX_BYTES // (4 * dim))


def choose_kind(n: int, exact_max: int) -> str:
    """`auto`: exact while the vectors fit `exact_max`, else IVF with fp16 codes (at 10^6 realistic
    rows as fast as float32 lists for the same recall or faster, in half the memory)."""
    return "flat" if n <= exact_max else "ivf-fp16"


def query_knob(kind: str) -> str | None:
    """The query-time parameter that trades latency for recall (None for exact search)."""
    if kind.startswith("hnsw"):
        return "efSearch"
    if is_ivf(kind):
        return "nprobe"
    return None


def is_ivf(kind: str) -> bool:
    """Inverted-list kinds: trained by k-means, searched with nprobe, shardable with merge_from."""
    return kind.startswith("ivf") or kind in PQ_KINDS


def default_pq_m(dim: int, dims_per_code: int = 8) -> int:
    """Sub-quantisers of a PQ kind: one per 8 dimensions (8-bit codes: 128 B at 1024-d, 10^8 rows
    in ~14 GB; one per 16 capped recall@10 below 0.9 on realistic 512-d embeddings), one per 2 for
    `ivf-pqfs`'s 4-bit codes; the largest divisor of `dim` not above dim / dims_per_code (faiss
    needs dim % pq_m == 0)."""
    target = max(1, dim // dims_per_code)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def default_params(kind: str, n: int, dim: int = 1024) -> dict[str, Any]:
    """Build parameters of each kind (the query knob's default is only used untuned)."""
    if kind == "flat":
        return {}
    if kind.startswith("hnsw"):
        return {"M": 32, "efConstruction": 80, "efSearch": 128}
    if is_ivf(kind):
        nlist = int(max(1, min(n // 39, 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n)))))))
        # k-means on 64 points per list: faiss caps at 256 and warns below 39; the recall
        # tuning raises nprobe to make up for coarser centroids.
        p = {"nlist": nlist, "nprobe": max(1, nlist // 16), "train_points": min(n, 64 * nlist)}
        if kind in PQ_KINDS:
            # The PQ codebooks (256 centroids per sub-quantiser) need ~40 points per centroid; the
            # top `rerank` x k candidates are re-scored exactly from the stored float vectors.
            if kind == "ivf-pqfs":
                # 4-bit fast-scan codes, one per 2 dimensions: at 512-d 128 B, which with 32 x k
                # re-ranked candidates reached recall@10 0.95 on realistic embeddings at 10^5.
                p.update(pq_m=default_pq_m(dim, 2), pq_bits=4, rerank=8)
            else:
                p.update(pq_m=default_pq_m(dim), pq_bits=8, rerank=4)
            p["train_points"] = min(n, max(p["train_points"], 1 << 16))
        return p
    raise DataError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(KINDS)}")


def check_params(kind: str, params: dict[str, Any]) -> None:
    """Refuse `--param`s the kind does not have, and values beyond `PARAM_MAX`."""
    allowed = set(default_params(kind, 10_000, 1024))
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise DataError(
            f"--param {', '.join(unknown)} does not apply to a {kind} index "
            f"(its parameters: {', '.join(sorted(allowed)) or 'none'})"
        )
    for key, value in params.items():
        if key == "rerank" and value == 0:
            continue  # rerank=0: the PQ distances as they are
        if not isinstance(value, int) or value < 1:
            raise DataError(f"--param {key}={value!r} must be a positive integer")
        if value > PARAM_MAX[key]:
            raise DataError(f"--param {key}={value} is beyond any sensible value (at most {PARAM_MAX[key]})")


def factory_string(kind: str, p: dict[str, Any]) -> str:
    """The `faiss.index_factory` description of a kind with build parameters `p`."""
    storage = next((code for suffix, code in _SCALAR_CODES.items() if kind.endswith(suffix)), "Flat")
    if kind == "flat":
        return "Flat"
    if kind.startswith("hnsw"):
        return f"HNSW{int(p['M'])},{storage}"
    if kind == "ivf-pqfs":
        return f"IVF{int(p['nlist'])},PQ{int(p['pq_m'])}x4fs"
    if kind in PQ_KINDS:
        pq = f"IVF{int(p['nlist'])},PQ{int(p['pq_m'])}x{int(p['pq_bits'])}"
        return f"OPQ{int(p['pq_m'])},{pq}" if kind.startswith("opq") else pq
    return f"IVF{int(p['nlist'])},{storage}"


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def normalized(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit L2 norm (inner product == cosine); `inplace` may overwrite `x`."""
    x = as_float32(x)
    if not inplace:
        x = x.copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise DataError(f"{int((norms == 0).sum())} zero vectors cannot be normalised for cosine search")
    x /= norms
    return x


def set_knob(index: Any, name: str, value: int) -> None:
    import_faiss().ParameterSpace().set_index_parameter(index, name, int(value))


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="vec", disable=not sys.stderr.isatty() or total < 2 * ADD_CHUNK)


def add_vectors(index: Any, vectors: np.ndarray, rows: np.ndarray | None, desc: str) -> None:
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
