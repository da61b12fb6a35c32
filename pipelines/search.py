"""`foundation search build|query`: faiss indexes over exported embeddings, and cross-modal queries.

The library is `foundation.search` (index kinds, recall tuning, index files, queries); this module
parses the options, runs it and prints what it did. `build` measures the recall of an approximate
index at its query knob (efSearch / nprobe) on held-out rows and records the smallest knob that
reaches `--target-recall`; `query` uses it. Large indexes (PQ kinds, several export parts,
`--shards`/`--step` for a SLURM array) are built streamed: foundation/search/stream.py. The
measured latency/recall of each kind is in benchmarks/search.py and docs/search.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from foundation.atomic import write_json
from foundation.cli import Command, bounded_int
from foundation.errors import DataError
from foundation.search.files import STEPS, build_from_file, build_streamed_from_files, query
from foundation.search.gpu import DEVICES
from foundation.search.index import META_FILE, VectorIndex
from foundation.search.kinds import KINDS, PQ_KINDS, query_knob
from foundation.search.tuning import (
    DEFAULT_TARGET_RECALL,
    DEFAULT_TUNE_K,
    DEFAULT_TUNE_SAMPLE,
    RecallTargetWarning,
    describe_tuning,
)


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
        "--embeddings",
        required=True,
        action="append",
        help="Embeddings HDF5 file (from `foundation export`); repeat for an export's part files "
        "(rows are numbered across them in the order given; this streams the build).",
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
        help="Set an index parameter (M, efConstruction, nlist, train_points; pq_m, pq_bits, rerank "
        "for PQ kinds; efSearch/nprobe fix the query knob instead of tuning it).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing index directory.")
    big = parser.add_argument_group("large indexes (inverted-list kinds: ivf, ivf-sq8, ivf-pq, opq-ivf-pq)")
    big.add_argument(
        "--stream",
        action="store_true",
        help="Train on a sample and add the vectors in chunks, never all in memory (automatic for "
        "PQ kinds, several files, --shards and --step).",
    )
    big.add_argument(
        "--shards", type=int, default=1, help="Contiguous row ranges added separately, then merged."
    )
    big.add_argument(
        "--step",
        choices=STEPS,
        default="all",
        help="Run one stage of a streamed build in OUT/build/ (plan, add, merge), e.g. from a "
        "SLURM array (slurm/search-index.sbatch); finished shards are skipped (default: all).",
    )
    big.add_argument(
        "--shard", type=bounded_int(0, 1 << 20), help="With --step add: only this shard (an array task id)."
    )
    big.add_argument(
        "--chunk-rows", type=int, default=20_000, help="Vectors read and added at a time (default 20000)."
    )
    big.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="Where k-means training runs: auto = a GPU where faiss has one (pip install "
        "'foundation[gpu]'), else the CPU.",
    )


def _streamed(args: argparse.Namespace) -> bool:
    return (
        args.stream
        or args.kind in PQ_KINDS
        or len(args.embeddings) > 1
        or args.shards != 1
        or args.step != "all"
    )


def _run_build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / META_FILE).exists() and not args.overwrite:
        raise DataError(f"{out} already holds an index; pass --overwrite to rebuild it")
    if args.shards < 1 or args.chunk_rows < 1:
        raise DataError("--shards and --chunk-rows must be at least 1")
    common = dict(
        params=_parse_params(args.param),
        target_recall=args.target_recall,
        tune_k=args.tune_k,
        tune_sample=args.tune_sample,
        tune_modalities=args.tune_modalities.split(",") if args.tune_modalities else None,
        seed=args.seed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecallTargetWarning)
        if _streamed(args):
            if args.overwrite and args.step == "all":
                shutil.rmtree(out / "build", ignore_errors=True)
            if args.kind in ("auto", "flat") or args.kind.startswith("hnsw"):
                raise DataError(
                    f"--kind {args.kind} cannot be built streamed or sharded; choose one of "
                    "ivf, ivf-sq8, ivf-pq, opq-ivf-pq"
                )
            index = build_streamed_from_files(
                args.embeddings, args.modality, out, kind=args.kind, shards=args.shards, step=args.step,
                shard=args.shard, device=args.device, chunk_rows=args.chunk_rows, **common,
            )  # fmt: skip
            if index is None:
                print(f"step {args.step} done in {out / 'build'}")
                return 0
        else:
            index = build_from_file(
                args.embeddings[0], args.modality, out, kind=args.kind, exact_max=args.exact_max, **common
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
    from foundation.data.raw_inputs import parse_field_map

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
        write_json(args.save, results, indent=2)
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
