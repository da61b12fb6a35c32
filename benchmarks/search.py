"""Search-index benchmark: query latency (p50/p99) and recall@10 against exact search.

    python benchmarks/search.py [--max-n 100000] [--dim 1024] [--queries 200] [--threads 1]

For N = 10^4, 10^5, 10^6 (up to --max-n) random unit vectors of the AstroCLIP embedding width
(1024), it builds the indexes `foundation search build` can make (exact Flat inner product, HNSW,
IVF-Flat with the default build parameters of pipelines/search.py), sweeps the query-time knob
(efSearch for HNSW, nprobe for IVF; `*` marks the default) and measures single-query latency
percentiles (one query per call, as `search query` does) and:
- `recall@10 random`: overlap with the exact top-10 for fresh random unit queries — the worst case
  for any approximate index (in 1024-d the true neighbours are barely closer than the rest);
- `partner@10 near`: how often a query made from a database vector plus noise (cosine --near-cos,
  default 0.25, to it; unrelated vectors have cosine 0 +- 0.03) finds that vector in its top 10 —
  like a cross-modal query that has a true partner.
Times are wall-clock on a possibly shared machine: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.search import VectorIndex, import_faiss  # noqa: E402


def unit_vectors(n: int, dim: int, rng: np.random.Generator, block: int = 100_000) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        x = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
        out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latencies_ms(index: VectorIndex, queries: np.ndarray, k: int) -> np.ndarray:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1e3)
    return np.asarray(times)


def recall(exact_rows: np.ndarray, rows: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact_rows, rows, strict=False)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--max-n", type=float, default=1e5, help="Largest database size (10^4 steps up to it)."
    )
    parser.add_argument("--dim", type=int, default=1024, help="Vector dimension (AstroCLIP: 1024).")
    parser.add_argument("--queries", type=int, default=200, help="Queries per measurement.")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads.")
    parser.add_argument("--kinds", default="flat,hnsw,ivf", help="Index kinds to measure.")
    parser.add_argument("--near-cos", type=float, default=0.25, help="Cosine of a near query to its source.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    faiss = import_faiss()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    sizes = [n for n in (10_000, 100_000, 1_000_000) if n <= args.max_n]
    kinds = [k.strip() for k in args.kinds.split(",")]
    print(
        f"# faiss {faiss.__version__}, dim {args.dim}, {args.queries} queries, k={args.k}, "
        f"threads={args.threads}"
    )
    header = (
        f"| {'N':>9} | {'index':<5} | {'build params':<24} | {'build s':>8} | {'query knob':<13} "
        f"| {'p50 ms':>7} "
        f"| {'p99 ms':>7} | {'recall@10 random':>16} | {'partner@10 near':>15} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for n in sizes:
        base = unit_vectors(n, args.dim, rng)
        random_q = unit_vectors(args.queries, args.dim, rng)
        sources = rng.choice(n, args.queries, replace=False)
        noise = np.sqrt(1.0 / args.near_cos**2 - 1.0) / np.sqrt(args.dim)  # |noise| for that cosine
        near_q = base[sources] + noise * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        exact = VectorIndex.build(base, kind="flat", normalize=False)
        truth = exact.search(random_q, args.k)[1]
        for kind in kinds:
            index = exact if kind == "flat" else VectorIndex.build(base, kind=kind, normalize=False)
            build = {k: v for k, v in index.meta.params.items() if k not in ("efSearch", "nprobe")}
            default = dict(index.meta.params)
            if kind == "hnsw":
                knobs = [("efSearch", v) for v in sorted({32, 64, 128, 256, 512})]
            elif kind == "ivf":
                nlist = index.meta.params["nlist"]
                knobs = [
                    ("nprobe", v)
                    for v in sorted({1, 4, 16, 64, nlist // 4, default["nprobe"]})
                    if 0 < v <= nlist
                ]
            else:
                knobs = [(None, None)]
            for knob, value in knobs:
                if knob:
                    index.set_search_params(**{knob: value})
                lat = latencies_ms(index, random_q, args.k)
                rec = recall(truth, index.search(random_q, args.k)[1])
                near_rows = index.search(near_q, args.k)[1]
                found = float(np.mean([s in row for s, row in zip(sources, near_rows, strict=True)]))
                mark = "*" if knob and default.get(knob) == value else ""
                print(
                    f"| {n:>9} | {kind:<5} | {','.join(f'{k}={v}' for k, v in build.items()) or 'exact':<24} "
                    f"| {index.meta.build_seconds:>8.2f} | {(f'{knob}={value}{mark}' if knob else '-'):<13} "
                    f"| {np.percentile(lat, 50):>7.2f} | {np.percentile(lat, 99):>7.2f} "
                    f"| {rec:>16.3f} | {found:>15.3f} |",
                    flush=True,
                )
            del index
        del base, exact


if __name__ == "__main__":
    main()
