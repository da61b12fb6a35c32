"""`foundation evaluate retrieval`: can one modality's embedding find the same object in another's?

For every object, its query-modality vector is compared (cosine) with the target-modality vectors of
all N candidate objects; the rank of its own partner gives top-k accuracy, median rank and mean
reciprocal rank, reported next to chance (k / N and (N + 1) / 2). Ties count against the model
(rank = 1 + number of other candidates scoring >= the partner), so a collapsed embedding that
maps everything to one point scores rank N, not rank 1. Candidates are the file's held-out rows
(its `test`/`valid` split) when it records splits, else all rows; `--rows all` uses every row.

Two collapse indicators per modality go with the ranks, because a rank alone cannot tell a model
that learned nothing from one whose vectors all point the same way: the norm of the mean unit
vector (0 = spread over the sphere, 1 = every vector identical) and the effective number of
dimensions (participation ratio (Σλ)²/Σλ² of the covariance eigenvalues; 1 = all on one line).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation.cli import Command
from foundation.errors import DataError
from pipelines.evaluate_common import (
    TEST_SPLITS,
    markdown_table,
    parse_csv,
    parse_labelled,
    write_json,
    write_text,
)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def partner_ranks(queries: np.ndarray, targets: np.ndarray, block: int = 1024) -> np.ndarray:
    """Rank (1 = best) of target row i among all target rows for query row i, by cosine similarity."""
    if queries.shape != targets.shape:
        raise DataError(f"query and target vectors differ in shape: {queries.shape} vs {targets.shape}")
    q = _unit(np.asarray(queries, dtype=np.float32))
    t = _unit(np.asarray(targets, dtype=np.float32))
    n = len(q)
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = q[start:stop] @ t.T  # (b, N)
        own = sims[np.arange(stop - start), np.arange(start, stop)][:, None]
        # Others at least as similar as the partner; the partner itself is always counted once.
        ranks[start:stop] = (sims >= own).sum(axis=1)
    return ranks


def spread(vectors: np.ndarray) -> dict[str, float]:
    """Collapse indicators of a set of vectors: norm of their mean unit vector, effective dims."""
    unit = _unit(np.asarray(vectors, dtype=np.float64))
    eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(unit, rowvar=False)), 0.0, None)
    total = eigenvalues.sum()
    return {
        "mean_norm": float(np.linalg.norm(unit.mean(axis=0))),
        "effective_dims": float(total**2 / np.square(eigenvalues).sum()) if total > 0 else 0.0,
    }


def retrieval_metrics(ranks: np.ndarray, ks: list[int]) -> dict[str, Any]:
    n = len(ranks)
    out: dict[str, Any] = {"n": int(n)}
    for k in ks:
        out[f"top{k}"] = float(np.mean(ranks <= k))
        out[f"chance_top{k}"] = min(1.0, k / n)
    out["median_rank"] = float(np.median(ranks))
    out["chance_median_rank"] = (n + 1) / 2
    out["mrr"] = float(np.mean(1.0 / ranks))
    out["chance_mrr"] = float(np.mean(1.0 / np.arange(1, n + 1)))
    out["top1_over_chance"] = out[f"top{ks[0]}"] / out[f"chance_top{ks[0]}"] if ks else None
    return out


def evaluate_file(
    path: str | Path,
    *,
    pairs: list[tuple[str, str]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    rows: str = "auto",
) -> tuple[list[dict[str, Any]], str]:
    """Retrieval metrics for each (query modality, target modality) pair of one embeddings file."""
    from foundation.embeddings import open_embeddings

    with open_embeddings(path) as emb:
        if len(emb.modalities) < 2 and not pairs:
            raise DataError(
                f"{path} holds one modality ({emb.modalities[0]}); cross-modal retrieval needs two"
            )
        pairs = pairs or list(itertools.permutations(emb.modalities, 2))
        selected, how = _select_rows(emb, rows)
        if len(selected) < 2:
            raise DataError(f"{path}: only {len(selected)} rows selected ({how}); retrieval needs at least 2")
        cache: dict[str, np.ndarray] = {}
        spreads: dict[str, dict[str, float]] = {}
        results = []
        for query_mod, target_mod in pairs:
            for mod in (query_mod, target_mod):
                if mod not in cache:
                    cache[mod] = emb.vectors(mod, selected)
                    spreads[mod] = spread(cache[mod])
            if cache[query_mod].shape[1] != cache[target_mod].shape[1]:
                raise DataError(
                    f"{path}: {query_mod} ({cache[query_mod].shape[1]}-d) and {target_mod} "
                    f"({cache[target_mod].shape[1]}-d) are not in one embedding space"
                )
            ranks = partner_ranks(cache[query_mod], cache[target_mod])
            results.append(
                {
                    "query": query_mod,
                    "target": target_mod,
                    **retrieval_metrics(ranks, list(ks)),
                    "query_spread": spreads[query_mod],
                    "target_spread": spreads[target_mod],
                }
            )
    return results, how


def _select_rows(emb: Any, rows: str) -> tuple[np.ndarray, str]:
    split = emb.split
    if rows == "all" or (rows == "auto" and split is None):
        return np.arange(emb.rows), f"all {emb.rows} rows"
    if split is None:
        raise DataError(f"{emb.path} records no splits; use --rows all")
    names = TEST_SPLITS if rows == "auto" else (rows,)
    for name in names:
        selected = np.flatnonzero(split == name)
        if len(selected):
            return selected, f"{len(selected)} rows of split {name!r}"
    if rows == "auto":
        return np.arange(emb.rows), f"all {emb.rows} rows (no held-out split recorded)"
    raise DataError(f"{emb.path} has no rows of split {rows!r}; it has {sorted(set(split.tolist()))}")


def render(results: list[dict[str, Any]], ks: list[int]) -> str:
    headers = (
        ["embeddings", "query → target", "N"]
        + [f"top-{k}" for k in ks]
        + [
            f"chance top-{ks[0]}",
            f"top-{ks[0]} / chance",
            "median rank",
            "chance median",
            "‖mean‖ query / target",
            "eff. dims query / target",
        ]
    )
    rows = [
        [r["label"], f"{r['query']} → {r['target']}", r["n"]]
        + [r[f"top{k}"] for k in ks]
        + [
            r[f"chance_top{ks[0]}"],
            f"{r['top1_over_chance']:.1f}×",
            f"{r['median_rank']:g}",
            f"{r['chance_median_rank']:g}",
            _pair(r, "mean_norm", "{:.2f}"),
            _pair(r, "effective_dims", "{:.1f}"),
        ]
        for r in results
    ]
    return markdown_table(headers, rows)


def _pair(result: dict[str, Any], key: str, fmt: str) -> str:
    """'query / target' of one spread indicator ('–' in reports written before it existed)."""
    values = [result.get(f"{side}_spread", {}).get(key) for side in ("query", "target")]
    return " / ".join("–" if v is None else fmt.format(v) for v in values)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embeddings",
        action="append",
        required=True,
        metavar="[LABEL=]FILE",
        help="Embeddings file; repeat (LABEL=FILE) to compare models, e.g. controls.",
    )
    parser.add_argument(
        "--query-modality", help="Query modality (default: every ordered pair of modalities)."
    )
    parser.add_argument("--target-modality", help="Target modality (with --query-modality).")
    parser.add_argument("--ks", default="1,5,10", help="Top-k accuracies to report (default 1,5,10).")
    parser.add_argument(
        "--rows",
        default="auto",
        help="Candidate rows: auto (held-out split if recorded, else all), all, or a split name.",
    )
    parser.add_argument("--out", help="Directory for report.json and report.md.")


def _run(args: argparse.Namespace) -> int:
    try:
        ks = sorted({int(k) for k in parse_csv(args.ks) or []})
    except ValueError:
        raise DataError(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    if not ks or ks[0] < 1:
        raise DataError("--ks needs positive integers")
    if bool(args.query_modality) != bool(args.target_modality):
        raise DataError("give both --query-modality and --target-modality, or neither")
    pairs = [(args.query_modality, args.target_modality)] if args.query_modality else None
    results = []
    inputs = {}
    for label, path in parse_labelled(args.embeddings):
        per_file, how = evaluate_file(path, pairs=pairs, ks=ks, rows=args.rows)
        inputs[label] = {"path": str(path), "rows": how}
        results += [{"label": label, **r} for r in per_file]
    table = render(results, ks)
    print(table)
    if args.out:
        out = Path(args.out)
        write_json(out / "report.json", {"inputs": inputs, "ks": ks, "results": results})
        lines = [f"- `{label}`: {info['path']} ({info['rows']})" for label, info in inputs.items()]
        write_text(
            out / "report.md", "# Cross-modal retrieval\n\n" + "\n".join(lines) + "\n\n" + table + "\n"
        )
        print(f"report -> {out / 'report.json'}, {out / 'report.md'}")
    return 0


COMMANDS = [
    Command(
        ("evaluate", "retrieval"),
        "Top-k accuracy and median rank of finding the same object across modalities, against chance.",
        _add_arguments,
        _run,
    )
]
