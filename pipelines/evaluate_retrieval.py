"""`foundation evaluate retrieval`: can one modality's embedding find the same object in another's?

The metrics (partner ranks with ties counted against the model, top-k accuracy, median rank and
mean reciprocal rank next to chance, and the collapse indicators of each modality) are
`encoders.astroclip.evaluate`; this command parses the options and renders the report.
Candidates are the file's held-out rows (its `test`/`valid` split) when it records splits, else
all rows; `--rows all` uses every row. `--paper-table` also writes `astroclip-retrieval.table.json`
(cross-modal and in-modal search, docs/astroclip.md "The paper's tables") and, with `--raw-data`,
the paper's figure of a query galaxy's nearest neighbours in both modalities.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from encoders.astroclip.evaluate import (
    NEIGHBOURS_FOR_REDSHIFT,
    chance_redshift_scatter,
    evaluate_file,
    nearest_others,
    paper_property_names,
    retrieval_table_rows,
    select_rows,
)
from foundation.atomic import write_figure, write_json, write_text
from foundation.cli import Command
from foundation.errors import DataError
from foundation.results import ResultRow, ResultTable, write_table
from pipelines.evaluate_common import (
    add_embeddings_argument,
    command_line,
    json_default,
    markdown_table,
    parse_csv,
    parse_labelled,
    raw_arrays,
    table_provenance,
    wavelength_grid,
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
    parser.add_argument(
        "--paper-table",
        action="store_true",
        help="Also write astroclip-retrieval.table.json in --out: cross-modal and in-modal retrieval.",
    )
    parser.add_argument(
        "--raw-data",
        help="Shard set with the raw images and spectra, for the table's figure of a query's neighbours.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the figure's query galaxies.")


def _run(args: argparse.Namespace) -> int:
    try:
        ks = sorted({int(k) for k in parse_csv(args.ks) or []})
    except ValueError:
        raise DataError(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    if not ks or ks[0] < 1:
        raise DataError("--ks needs positive integers")
    if args.paper_table and not args.out:
        raise DataError("--paper-table writes into --out; give --out DIR")
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
        if args.paper_table:
            path = retrieval_table(
                parse_labelled(args.embeddings),
                out,
                ks,
                rows=args.rows,
                raw_data=args.raw_data,
                seed=args.seed,
                command=command_line("evaluate retrieval", args),
            )
            print(f"table -> {path}")
    return 0


COMMANDS = [
    Command(
        ("evaluate", "retrieval"),
        "Top-k accuracy and median rank of finding the same object across modalities, against chance.",
        _add_arguments,
        _run,
    )
]


# ----------------------------------------------------------------------------- the paper's retrieval table

RETRIEVAL_TABLE = "astroclip-retrieval"
FIGURE_QUERIES = 2
FIGURE_NEIGHBOURS = 4
TWIN_K = 10


def retrieval_table(
    inputs: list[tuple[str, Path]],
    out: Path,
    ks: list[int],
    *,
    rows: str = "auto",
    raw_data: str | None = None,
    seed: int = 0,
    command: str = "",
) -> Path:
    """Cross-modal and in-modal retrieval of every input (`retrieval_table_rows`) as a result
    table, with the paper's qualitative figure from the first input when `raw_data` is given."""
    results, primary = [], None
    for label, path in inputs:
        vectors, ids, z, properties, how = _held_out(path, rows)
        primary = primary or (vectors, ids, z)
        for r in retrieval_table_rows(vectors, ks, properties=properties, redshift=z, twin_k=TWIN_K):
            results.append({"label": label, "rows": how, **r})
    figures = []
    if raw_data and primary is not None:
        figures.append(_neighbour_figure(*primary, raw_data, out, seed))
    chance_dz = (
        chance_redshift_scatter(primary[2], NEIGHBOURS_FOR_REDSHIFT, seed) if primary[2] is not None else None
    )
    return write_table(
        out, _retrieval_result_table(inputs, results, ks, figures, raw_data, chance_dz, command)
    )


def _held_out(
    path: Path, rows: str
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None, np.ndarray | None, str]:
    """(vectors by modality, ids, redshift, (N, P) properties, how the rows were chosen)."""
    from foundation.embeddings import open_embeddings

    with open_embeddings(path) as emb:
        selected, how = select_rows(emb, rows)
        vectors = {m: emb.vectors(m, selected) for m in emb.modalities}
        names = paper_property_names(emb.target_names)
        values = {n: emb.target(n)[selected] for n in names}
        ids = emb.ids[selected]
    z = values.get("redshift")
    properties = np.stack(list(values.values()), axis=1) if values else None
    if properties is not None:
        keep = np.isfinite(properties).all(axis=1)
        vectors = {m: v[keep] for m, v in vectors.items()}
        ids, properties = ids[keep], properties[keep]
        z = z[keep] if z is not None else None
        how += f", {int(keep.sum())} with every property known"
    return vectors, ids, z, properties, how


def _retrieval_result_table(
    inputs: list[tuple[str, Path]],
    results: list[dict[str, Any]],
    ks: list[int],
    figures: list[str],
    raw_data: str | None,
    chance_dz: float | None,
    command: str,
) -> ResultTable:
    columns = [f"top-{k}" for k in ks] + [
        "median rank",
        f"twin top-{TWIN_K}",
        "twin median rank",
        f"neighbour |Δz|/(1+z) (k={NEIGHBOURS_FOR_REDSHIFT})",
    ]
    rows = []
    for r in results:
        partner = [r.get(f"top{k}") for k in ks] + [r.get("median_rank")]
        values = partner + [r.get(f"twin_top{TWIN_K}"), r.get("twin_median_rank"), r.get("neighbour_dz")]
        kind = "cross-modal" if r["cross_modal"] else "in-modal"
        rows.append(ResultRow(f"{r['label']} {r['query']} → {r['target']} ({kind})", values))
    n = results[0]["n"] if results else 0
    chance = [min(1.0, k / n) for k in ks] + [(n + 1) / 2, min(1.0, TWIN_K / max(n - 1, 1)), n / 2, chance_dz]
    rows.append(ResultRow("chance (random ranking)", chance))
    notes = [
        f"Held-out objects of each file ({results[0]['rows'] if results else 'none'}); cosine similarity; "
        "ties count against the model.",
        "top-k and median rank: where the query's own partner in the other modality ranks among all "
        "candidates (cross-modal only: in-modal, the query is its own best match).",
        "twin: the other object nearest to the query in standardised property space "
        "(redshift, log M*, Z_MW, t_age, sSFR as the file carries them); its rank among the candidates "
        "other than the query's own, for every pair — are the neighbours physically alike?",
        f"neighbour |Δz|/(1+z): median over queries of the median redshift offset of the "
        f"{NEIGHBOURS_FOR_REDSHIFT} nearest other objects (lower is better, unlike the other columns).",
        "The paper publishes no retrieval numbers, only the figure of a query's nearest neighbours "
        "in both modalities; there are no paper rows.",
    ]
    return ResultTable(
        family="astroclip",
        name=RETRIEVAL_TABLE,
        title="Cross-modal and in-modal similarity search",
        columns=columns,
        rows=rows,
        metric="top-k accuracy / rank",
        higher_is_better=None,
        notes=notes,
        figures=figures,
        provenance=table_provenance(command, inputs, raw_data),
    )


def _neighbour_figure(
    vectors: dict[str, np.ndarray], ids: np.ndarray, z: np.ndarray | None, raw_data: str, out: Path, seed: int
) -> str:
    """The paper's qualitative figure: for each query galaxy, one row per (query → target)
    modality pair with the query's input and its nearest neighbours' inputs (images as g,r,z
    colour composites, spectra as smoothed flux), titled with redshifts when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.search_plot import _rgb, _smooth

    queries = np.random.default_rng(seed).choice(len(ids), size=min(FIGURE_QUERIES, len(ids)), replace=False)
    pairs = list(itertools.product(vectors, vectors))
    neighbours = {
        (q, t): nearest_others(
            vectors[q][queries], vectors[t], FIGURE_NEIGHBOURS, queries, exclude_own=q == t
        )
        for q, t in pairs
    }
    wanted = sorted({int(i) for i in queries} | {int(i) for n in neighbours.values() for i in n.ravel()})
    raw = raw_arrays(raw_data, [str(ids[i]) for i in wanted], {m: m for m in vectors})
    at = {row: i for i, row in enumerate(wanted)}
    spectra = raw.get("spectrum")
    wave = wavelength_grid(raw_data, spectra.shape[1]) if spectra is not None else None

    def draw(ax: Any, modality: str, row: int, title: str) -> None:
        if modality == "image" and "image" in raw:
            ax.imshow(_rgb(raw["image"][at[row]]), origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        elif modality == "spectrum" and spectra is not None:
            ax.plot(wave, _smooth(spectra[at[row]]), lw=0.5, color="k")
            ax.set_yticks([])
            ax.tick_params(labelsize=5)
        ax.set_title(title + (f"\nz={z[row]:.3f}" if z is not None else ""), fontsize=6)

    cols = 1 + FIGURE_NEIGHBOURS
    fig, axes = plt.subplots(
        len(queries) * len(pairs), cols, figsize=(1.7 * cols, 1.5 * len(queries) * len(pairs)), squeeze=False
    )
    for qi, query in enumerate(queries):
        for pi, (q, t) in enumerate(pairs):
            line = axes[qi * len(pairs) + pi]
            draw(line[0], q, int(query), f"query {ids[query]} ({q})")
            for j, neighbour in enumerate(neighbours[(q, t)][qi]):
                draw(line[1 + j], t, int(neighbour), f"{q}→{t} #{j + 1}")
    fig.tight_layout()
    return write_figure(out / f"{RETRIEVAL_TABLE}.png", fig, dpi=110).name
