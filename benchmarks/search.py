"""Search-index benchmark on realistic and on random embeddings: build, size, recall, latency, batching.

    python benchmarks/search.py [--data realistic,random] [--dims 512,1024] [--sizes 1e5,1e6]
        [--kinds flat,ivf,ivf-sq8,ivf-pq,opq-ivf-pq] [--queries 200] [--batch 1000] [--threads 2]
        [--model benchmarks/search_embeddings.json] [--max-nlist 1024] [--workdir /tmp]
        [--target-recall 0.95] [--param NAME=VALUE ...] [--rerank-from memory|embeddings]
    python benchmarks/search.py fit --embeddings EMB.h5 --modality spectrum \\
        --out benchmarks/search_embeddings.json

Data: `realistic` vectors are drawn from an embedding model fitted to an exported embeddings file
(foundation/search/synthetic.py: a Gaussian mixture in the leading principal components plus
isotropic residual noise, matching the source's spectrum and effective dimension, placed on
random directions of the requested width); the fitted parameters ship in --model, and `fit`
refits them to any `foundation export` output. `random` unit vectors are the documented worst case
(every point's neighbours are barely closer than the rest). Vectors are generated in chunks into
a float32 memmap under --workdir (deleted after each N), so only the index lives in memory.

Indexes are built as `foundation search build` does: flat and HNSW kinds in memory (up to
--inmemory-max-n rows), IVF and PQ kinds streamed from the memmap (foundation/search/stream.py:
trained on a sample, added in chunks); every approximate kind tunes its nprobe/efSearch on 300
held-out rows to --target-recall, PQ kinds re-rank rerank x k candidates from the stored vectors.
Columns, at the tuned knob:
- `B/vec`: index bytes per vector from its layout (codes or floats + 8-byte id), without the
  centroids; `GB`: the whole index at N; `GB @1e8 ex`: the same layout at 10^8 rows
  with nlist = 65536 — an extrapolation, not a measurement;
- `tuned recall`: what the build measured on its held-out rows; `recall@10`: fresh queries from
  the same distribution against exact search (blockwise, over the memmap);
- p50/p99 of single queries (one per call, one thread, as `search query` does) and the
  throughput of --batch further fresh queries (all distinct) in one call on --threads threads, as a
  multiple of the single-query throughput (`batch x`), after one warm-up batch. IVF-Flat and
  scalar-code kinds answer the batch list-major (foundation/search/batched.py), PQ kinds with
  faiss's search.
PQ kinds re-rank from the vectors in memory (the memmap) by default; `--rerank-from embeddings`
writes the rows to an embeddings file with `foundation export`'s writer and re-ranks from it, as
`foundation search query` does (the index column then reads `<kind> (h5)`).
Times are wall-clock on a possibly shared machine: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from foundation.embeddings import Embeddings, EmbeddingsWriter, open_embeddings
from foundation.search.files import stored_reader
from foundation.search.index import VectorIndex
from foundation.search.kinds import PQ_KINDS, import_faiss, is_ivf, query_knob
from foundation.search.stream import ArraySource, build_streamed
from foundation.search.synthetic import (
    EmbeddingModel,
    effective_dimension,
    fit_embedding_model,
    generate,
    with_effective_dimension,
)
from foundation.search.tuning import exact_knn, recall_at_k

DEFAULT_MODEL = Path(__file__).with_name("search_embeddings.json")
CHUNK = 50_000


def unit_vectors(n: int, dim: int, seed: int, stream: int) -> Iterator[np.ndarray]:
    """Random unit vectors in chunks (the worst case)."""
    for number, start in enumerate(range(0, n, CHUNK)):
        rng = np.random.default_rng([seed, stream, number])
        x = rng.standard_normal((min(CHUNK, n - start), dim), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def chunks(
    data: str, model: EmbeddingModel | None, n: int, dim: int, seed: int, stream: int, effdim: float
) -> Iterator[np.ndarray]:
    if data == "realistic":
        if effdim:
            model = with_effective_dimension(model, effdim, dim)
        return generate(model, n, dim, seed=seed, stream=stream, chunk=CHUNK)
    return unit_vectors(n, dim, seed, stream)


def write_memmap(path: Path, parts: Iterator[np.ndarray], n: int, dim: int) -> np.memmap:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    start = 0
    for part in parts:
        out[start : start + len(part)] = part
        start += len(part)
    out.flush()
    return np.load(path, mmap_mode="r")


def bytes_per_vector(kind: str, dim: int, params: dict) -> float:
    """Index bytes a vector from the layout: stored codes or floats plus its 8-byte id."""
    if kind in PQ_KINDS:
        code = params["pq_m"] * params["pq_bits"] / 8
    elif kind.endswith("-sq8"):
        code = dim
    elif kind.endswith("-fp16"):
        code = 2 * dim
    else:
        code = 4 * dim
    links = 2 * params.get("M", 0) * 4 if kind.startswith("hnsw") else 0
    return code + (8 if is_ivf(kind) or kind.startswith("hnsw") else 0) + links


def index_gb(kind: str, n: int, dim: int, params: dict, nlist: int | None = None) -> float:
    nlist = params.get("nlist", 0) if nlist is None else nlist
    fixed = nlist * dim * 4 + (dim * dim * 4 if kind.startswith("opq") else 0)
    if kind in PQ_KINDS:
        fixed += params["pq_m"] * 2 ** params["pq_bits"] * (dim // params["pq_m"]) * 4
    return (n * bytes_per_vector(kind, dim, params) + fixed) / 1e9


def latencies_ms(index: VectorIndex, queries: np.ndarray, k: int) -> np.ndarray:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1e3)
    return np.asarray(times)


def build(kind: str, base: np.ndarray, args: argparse.Namespace, work: Path) -> VectorIndex:
    n = len(base)
    params: dict = {}
    if is_ivf(kind):
        nlist = min(args.max_nlist, 2 ** round(math.log2(4 * math.sqrt(n))), n // 39)
        params = {"nlist": nlist, "train_points": min(n, max(64 * nlist, 1 << 16 if kind in PQ_KINDS else 0))}
        params.update(dict(args.param))
        shutil.rmtree(work, ignore_errors=True)
        index = build_streamed(
            ArraySource(base), work, kind=kind, params=params, normalize=False,
            target_recall=args.target_recall, progress=False,
        )  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
        return index
    return VectorIndex.build(np.asarray(base), kind=kind, normalize=False, target_recall=args.target_recall)


def write_embeddings(path: Path, base: np.ndarray) -> Path:
    """`base` as an embeddings file (modality `v`), written as an export writes it."""
    with EmbeddingsWriter(path, overwrite=True) as writer:
        for start in range(0, len(base), CHUNK):
            stop = min(start + CHUNK, len(base))
            writer.append([str(i) for i in range(start, stop)], {"v": np.asarray(base[start:stop])})
        writer.finish()
    return path


def measure_row(
    kind: str,
    base: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    batch: np.ndarray,
    args: argparse.Namespace,
    label: str,
    emb: Embeddings | None = None,
) -> str:
    faiss = import_faiss()
    n, dim = base.shape
    index = build(kind, base, args, Path(args.workdir) / "search-bench-build")
    shown_kind = kind
    if emb is not None and kind in PQ_KINDS:
        index.attach_vectors(stored_reader(emb, "v", normalize=False))
        shown_kind = f"{kind} (h5)"
    m = index.meta
    knob = query_knob(kind)
    tuning = m.tuning or {}
    faiss.omp_set_num_threads(1)  # one query per call: no OpenMP team waiting on a busy core
    lat = latencies_ms(index, queries[: args.latency_queries], args.k)
    faiss.omp_set_num_threads(args.threads)
    rec = recall_at_k(truth, index.search(queries, args.k)[1])
    index.search(batch, args.k)  # warm-up: lazy imports (torch for fp16 codes), first-touch of memory
    start = time.perf_counter()
    index.search(batch, args.k)
    batch_qps = args.batch / (time.perf_counter() - start)
    single_qps = 1e3 / lat.mean()
    shown = {k: v for k, v in m.params.items() if k not in (knob, "train_points")}
    build_params = ",".join(f"{k}={v}" for k, v in shown.items()) or "exact"
    tuned = f"{knob}={m.params[knob]}" if knob else "-"
    if tuning and not tuning["reached"]:
        tuned += " !"
    gb_1e8 = index_gb(kind, 10**8, dim, m.params, nlist=65536) if is_ivf(kind) else float("nan")
    return (
        f"| {label:<9} | {n:>8} | {dim:>4} | {shown_kind:<10} | {build_params:<32} | {m.build_seconds:>7.1f} "
        f"| {bytes_per_vector(kind, dim, m.params):>5.0f} | {index_gb(kind, n, dim, m.params):>5.2f} "
        f"| {gb_1e8:>11.1f} | {tuned:<11} | {tuning.get('recall', 1.0):>6.3f} | {rec:>9.3f} "
        f"| {np.percentile(lat, 50):>6.2f} | {np.percentile(lat, 99):>6.2f} | {single_qps:>7.0f} "
        f"| {batch_qps:>9.0f} | {batch_qps / single_qps:>7.1f} |"
    )


HEADER = (
    f"| {'data':<9} | {'N':>8} | {'dim':>4} | {'index':<10} | {'build params':<32} | {'build s':>7} "
    f"| {'B/vec':>5} | {'GB':>5} | {'GB @1e8 ex':>11} | {'tuned knob':<11} | {'tuned':>6} "
    f"| {'recall@10':>9} | {'p50 ms':>6} | {'p99 ms':>6} | {'1-q QPS':>7} | {'batch QPS':>9} "
    f"| {'batch x':>7} |"
)


def run(args: argparse.Namespace) -> None:
    faiss = import_faiss()
    faiss.omp_set_num_threads(args.threads)
    model = EmbeddingModel.load(args.model) if "realistic" in args.data else None
    if model is not None:
        print(
            f"# realistic: model {args.model} fitted to {model.source} ({model.source_rows} x "
            f"{model.source_dim}, effective dimension {model.participation_ratio:.1f}, rank {model.rank}, "
            f"{len(model.weights)} mixture components), residual noise scaled to effective dimension "
            f"{args.effective_dimension or model.participation_ratio:.1f}"
        )
    print(
        f"# faiss {faiss.__version__}, {args.queries} recall queries, {args.latency_queries} timed single, "
        f"batch {args.batch}, k={args.k}, threads={args.threads}, target recall {args.target_recall}, "
        f"IVF nlist <= {args.max_nlist}; load average at start {load_average()}"
    )
    print(HEADER)
    print("|" + "|".join("-" * len(c) for c in HEADER.split("|")[1:-1]) + "|", flush=True)
    kinds = [k.strip() for k in args.kinds.split(",")]
    for data in args.data.split(","):
        for dim in [int(d) for d in args.dims.split(",")]:
            for n in [int(float(s)) for s in args.sizes.split(",")]:
                path = Path(args.workdir) / f"search-bench-{data}-{n}-{dim}.npy"
                base = write_memmap(
                    path, chunks(data, model, n, dim, args.seed, 0, args.effective_dimension), n, dim
                )
                queries = np.concatenate(
                    list(chunks(data, model, args.queries, dim, args.seed, 1, args.effective_dimension))
                )
                truth = exact_knn(base, queries, args.k)
                batch = np.concatenate(
                    list(chunks(data, model, args.batch, dim, args.seed, 2, args.effective_dimension))
                )
                label = f"{data[:4]} {effective_dimension(base[: min(n, 20_000)]):.1f}"
                emb = None
                if args.rerank_from == "embeddings" and any(k in PQ_KINDS for k in kinds):
                    emb = open_embeddings(write_embeddings(path.with_suffix(".h5"), base))
                for kind in kinds:
                    if not is_ivf(kind) and n > args.inmemory_max_n:
                        continue
                    print(measure_row(kind, base, queries, truth, batch, args, label, emb), flush=True)
                if emb is not None:
                    emb.close()
                    emb.path.unlink()
                del base
                path.unlink()
                print(f"# after {data} N={n} dim={dim}: load average {load_average()}", flush=True)


def name_value(text: str) -> tuple[str, int]:
    """`--param NAME=VALUE` with an integer value (every IVF/PQ build parameter is one)."""
    name, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=INTEGER (e.g. rerank=256)")
    return name, int(value)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def fit(args: argparse.Namespace) -> None:
    from foundation.embeddings import open_embeddings

    with open_embeddings(args.embeddings) as emb:
        vectors = emb.vectors(args.modality)
    model = fit_embedding_model(
        vectors, source=f"{Path(args.embeddings).name}:{args.modality}", components=args.components
    )
    model.save(args.out)
    print(
        f"fitted {args.out}: {len(vectors)} x {vectors.shape[1]}, effective dimension "
        f"{model.participation_ratio:.2f}, rank {model.rank}, tail variance {model.tail_variance:.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    f = sub.add_parser("fit", help="Fit the realistic-embedding model to an embeddings file.")
    f.add_argument("--embeddings", required=True)
    f.add_argument("--modality", default="spectrum")
    f.add_argument("--components", type=int, default=8)
    f.add_argument("--out", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default="realistic,random", help="realistic, random or both, in order.")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Fitted embedding model (JSON).")
    parser.add_argument(
        "--effective-dimension",
        type=float,
        default=6.0,
        help="Scale the model's residual noise to this effective dimension (default 6, the demo's "
        "trained AstroCLIP embeddings after a 900-step alignment; 3 after the shipped 2700); 0 keeps "
        "the fitted one.",
    )
    parser.add_argument("--sizes", default="1e5,1e6", help="Database sizes, comma-separated.")
    parser.add_argument("--dims", default="512,1024", help="Vector dimensions, comma-separated.")
    parser.add_argument("--kinds", default="flat,ivf,ivf-sq8,ivf-pq,opq-ivf-pq", help="Index kinds.")
    parser.add_argument("--queries", type=int, default=200, help="Queries for the recall column.")
    parser.add_argument("--latency-queries", type=int, default=200, help="Single queries timed.")
    parser.add_argument("--batch", type=int, default=1000, help="Queries in the one batched call.")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads (batched search).")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--max-nlist", type=int, default=1024, help="Cap on IVF's nlist.")
    parser.add_argument("--inmemory-max-n", type=float, default=1e5, help="Largest N for flat/HNSW kinds.")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="Where the vector memmaps go.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        type=name_value,
        metavar="NAME=VALUE",
        help="A build parameter of the IVF/PQ kinds, as `search build --param` (e.g. rerank=256).",
    )
    parser.add_argument(
        "--rerank-from",
        choices=("memory", "embeddings"),
        default="memory",
        help="Where PQ kinds read the vectors they re-rank: the memmap, or an embeddings file.",
    )
    args = parser.parse_args(argv)
    if args.command == "fit":
        fit(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
