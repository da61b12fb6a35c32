"""`foundation evaluate retrieval`: can one modality's embedding find the same object in another's?

The metrics (partner ranks with ties counted against the model, top-k accuracy, median rank and
mean reciprocal rank next to chance, and the collapse indicators of each modality) are
`encoders.astroclip.evaluate`; this command parses the options and renders the report.
Candidates are the file's held-out rows (its `test`/`valid` split) when it records splits, else
all rows; `--rows all` uses every row.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from encoders.astroclip.evaluate import evaluate_file
from foundation.atomic import write_json, write_text
from foundation.cli import Command
from foundation.errors import DataError
from pipelines.evaluate_common import (
    add_embeddings_argument,
    json_default,
    markdown_table,
    parse_csv,
    parse_labelled,
)


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
    add_embeddings_argument(
        parser,
        "Embeddings file; repeat (LABEL=FILE) to compare models, e.g. controls.",
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
        write_json(
            out / "report.json",
            {"inputs": inputs, "ks": ks, "results": results},
            indent=2,
            default=json_default,
        )
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
