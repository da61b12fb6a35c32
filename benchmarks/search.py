"""Search-index benchmark: build time, memory, query latency (p50/p99) and recall@10 vs exact.

    python benchmarks/search.py [--sizes 1e4,1e5,1e6] [--kinds flat,hnsw,ivf,ivf-sq8]
        [--dim 1024] [--queries 200] [--threads 2] [--target-recall 0.95]
        [--hnsw-max-n 1e5] [--max-nlist 2048]

For each N, random unit vectors of the AstroCLIP embedding width (1024) are indexed the way
`foundation search build` does (foundation/search/index.py `VectorIndex.build`, default parameters):
approximate kinds tune their query knob (efSearch / nprobe) on held-out database vectors to reach
--target-recall. Each row then reports, at the tuned knob:
- `tuned recall`: recall@10 the build measured on its held-out sample (what index.json records);
- `recall@10 random`: overlap with the exact top-10 for fresh random unit queries (ground truth by
  blockwise exact search) — independent of the build's sample, so it checks the tuning. Random
  1024-d data is the worst case for approximate search: the true neighbours are barely closer
  than the rest (real embeddings are clustered, where much smaller knobs reach the target);
- `partner@10 near`: how often a query made from a database vector plus noise (cosine --near-cos,
  default 0.25, to it; unrelated vectors have cosine 0 +- 0.03) finds that vector in its top 10 —
  like a cross-modal query that has a true partner;
- p50/p99 latency of single queries (one per call, as `search query` does, on one thread),
  over --latency-queries;
- build s (training + adding + tuning; tuning s separately) and `GB est.`, the index's size from
  its layout (float32 or 8-bit codes, HNSW links, IVF ids and centroids).

Limits that keep it feasible on a small machine (stated in the table header): HNSW is built only
up to --hnsw-max-n; above, its build time is extrapolated from the measured rate as N log N and
printed as such, not run. IVF's nlist is capped at --max-nlist (the tool's default is 4 sqrt(N),
4096 at 1e6) and k-means trains on 64 points per list (faiss's own cap is 256).
Times are wall-clock on a possibly shared machine: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from foundation.search.index import VectorIndex
from foundation.search.kinds import import_faiss, query_knob
from foundation.search.tuning import exact_knn, recall_at_k


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


def size_gb_estimate(kind: str, n: int, d: int, m: int = 32, nlist: int = 0) -> float:
    """Index memory from its layout (vectors or codes, HNSW level-0 links, IVF ids + centroids)."""
    per_vector = d if kind.endswith("-sq8") else 4 * d
    extra = 0.0
    if kind.startswith("hnsw"):
        extra = n * (2 * m * 4 + 8)  # level-0 neighbour ids + id map
    elif kind.startswith("ivf"):
        extra = n * 8 + nlist * d * 4
    return (n * per_vector + extra) / 1e9


def size_gb(index: VectorIndex) -> float:
    m = index.meta
    return size_gb_estimate(m.kind, m.n, m.dim, m.params.get("M", 32), m.params.get("nlist", 0))


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="Database sizes, comma-separated.")
    parser.add_argument("--dim", type=int, default=1024, help="Vector dimension (AstroCLIP: 1024).")
    parser.add_argument("--queries", type=int, default=200, help="Queries for the recall columns.")
    parser.add_argument("--latency-queries", type=int, default=100, help="Single queries timed.")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads.")
    parser.add_argument("--kinds", default="flat,hnsw,ivf,ivf-sq8", help="Index kinds to measure.")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--hnsw-max-n", type=float, default=1e5, help="Largest N HNSW is built at.")
    parser.add_argument(
        "--hnsw-rate",
        default="",
        metavar="KIND=N:SECONDS,...",
        help="HNSW build times measured by an earlier run, to extrapolate from (e.g. hnsw=1e5:120).",
    )
    parser.add_argument("--max-nlist", type=int, default=2048, help="Cap on IVF's nlist.")
    parser.add_argument("--near-cos", type=float, default=0.25, help="Cosine of a near query to its source.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    faiss = import_faiss()
    faiss.omp_set_num_threads(args.threads)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    kinds = [k.strip() for k in args.kinds.split(",")]
    print(
        f"# faiss {faiss.__version__} ({faiss.get_compile_options().strip()}), dim {args.dim}, "
        f"{args.queries} recall queries, {args.latency_queries} timed, k={args.k}, "
        f"threads={args.threads}, target recall {args.target_recall}, IVF nlist <= {args.max_nlist}, "
        f"HNSW built up to N={int(args.hnsw_max_n)}; load average at start {load_average()}"
    )
    header = (
        f"| {'N':>9} | {'index':<8} | {'build params':<34} | {'build s':>8} | {'tuning s':>8} "
        f"| {'GB est.':>7} | {'tuned knob':<13} | {'tuned recall':>12} | {'p50 ms':>7} | {'p99 ms':>7} "
        f"| {'recall@10 random':>16} | {'partner@10 near':>15} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|", flush=True)
    hnsw_rate: dict[str, tuple[int, float]] = {}
    for item in filter(None, args.hnsw_rate.split(",")):
        kind, _, rate = item.partition("=")
        n0, _, seconds = rate.partition(":")
        hnsw_rate[kind] = (int(float(n0)), float(seconds))
    for n in sizes:
        rng = np.random.default_rng([args.seed, n])
        base = unit_vectors(n, args.dim, rng)
        random_q = unit_vectors(args.queries, args.dim, rng)
        sources = rng.choice(n, args.queries, replace=False)
        noise = np.sqrt(1.0 / args.near_cos**2 - 1.0) / np.sqrt(args.dim)  # |noise| for that cosine
        near_q = base[sources] + noise * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        near_q /= np.linalg.norm(near_q, axis=1, keepdims=True)
        truth = exact_knn(base, random_q, args.k)
        for kind in kinds:
            if kind.startswith("hnsw") and n > args.hnsw_max_n:
                if kind in hnsw_rate:
                    n0, seconds = hnsw_rate[kind]
                    est = seconds * (n / n0) * math.log(n) / math.log(n0)
                    print(
                        f"| {n:>9} | {kind:<8} | {f'NOT RUN: N log N from N={n0}':<34} "
                        f"| {f'~{est:.0f}':>8} | {'-':>8} | {size_gb_estimate(kind, n, args.dim):>7.2f} "
                        f"| {'-':<13} | {'-':>12} | {'-':>7} "
                        f"| {'-':>7} | {'-':>16} | {'-':>15} |",
                        flush=True,
                    )
                continue
            params = {}
            if kind.startswith("ivf"):
                params["nlist"] = min(args.max_nlist, 2 ** round(math.log2(4 * math.sqrt(n))), n // 39)
                params["train_points"] = min(n, 64 * params["nlist"])
            index = VectorIndex.build(
                base, kind=kind, normalize=False, params=params, target_recall=args.target_recall
            )
            m = index.meta
            knob = query_knob(kind)
            build = ",".join(f"{k}={v}" for k, v in m.params.items() if k != knob) or "exact"
            tuning = m.tuning or {}
            if kind.startswith("hnsw"):
                hnsw_rate[kind] = (n, m.build_seconds - tuning.get("seconds", 0.0))
                print(f"# {kind} build rate: --hnsw-rate {kind}={n}:{hnsw_rate[kind][1]:.1f}", flush=True)
            faiss.omp_set_num_threads(1)  # one query per call: no OpenMP team waiting on a busy core
            lat = latencies_ms(index, random_q[: args.latency_queries], args.k)
            faiss.omp_set_num_threads(args.threads)
            rec = recall_at_k(truth, index.search(random_q, args.k)[1])
            near_rows = index.search(near_q, args.k)[1]
            found = float(np.mean([s in row for s, row in zip(sources, near_rows, strict=True)]))
            tuned = f"{knob}={m.params[knob]}" if knob else "-"
            if tuning and not tuning["reached"]:
                tuned += " !"
            print(
                f"| {n:>9} | {kind:<8} | {build:<34} | {m.build_seconds:>8.1f} "
                f"| {tuning.get('seconds', 0.0):>8.1f} | {size_gb(index):>7.2f} | {tuned:<13} "
                f"| {tuning.get('recall', 1.0):>12.3f} | {np.percentile(lat, 50):>7.2f} "
                f"| {np.percentile(lat, 99):>7.2f} | {rec:>16.3f} | {found:>15.3f} |",
                flush=True,
            )
            del index
        del base
        print(f"# after N={n}: load average {load_average()}", flush=True)


if __name__ == "__main__":
    main()
