"""`foundation evaluate zero-shot`: regress physical properties from frozen embeddings.

The protocol (scaler + distance-weighted k-NN, k = 16 as the AstroCLIP paper, an MLP probe, the
cross-modal k-NN, raw-input baselines) is `encoders.astroclip.evaluate`; this command parses the
options, loads the raw inputs behind `--raw-data SHARDS` and writes the reports. Several
embeddings files (e.g. a random-initialised tower, a shuffled-pair control) can be scored side by
side with `--embeddings LABEL=FILE` repeated. The train/test split is the first file's recorded
split (train vs test/valid) or a hash of the object id; every input is aligned to it by object id.

Writes `report.json`, `report.md`, `predictions.npz` and one predicted-vs-true scatter PNG per target.
With `--paper-table` it also writes the paper's property table, `astroclip-properties.table.json`
(R² of redshift, log M*, Z_MW, t_age, sSFR and the mean of the last four; the paper code's k-NN and
few-shot MLP, our k by CV, `--baselines` trained on the raw inputs, the paper's own rows), with a
predicted-vs-true PNG beside it (docs/astroclip.md, "The paper's tables").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encoders.astroclip.evaluate import (
    BOOTSTRAP_DRAWS,
    FEW_SHOT_BATCH,
    FEW_SHOT_DROPOUT,
    FEW_SHOT_EPOCHS,
    FEW_SHOT_HIDDEN,
    FEW_SHOT_LR,
    FEW_SHOT_REFERENCE,
    IMAGE_SUPERVISED,
    MEAN_COLUMN,
    PAPER_K,
    PAPER_PROPERTIES,
    PHOTOMETRY_KNN,
    PHOTOMETRY_SUPERVISED,
    PROVABGS_PROPERTIES,
    RAW_PCA_COMPONENTS,
    REFERENCE_K,
    REFERENCE_WEIGHTS,
    SPECTRUM_SUPERVISED,
    SUPERVISED_PCA_COMPONENTS,
    ZERO_SHOT_REFERENCE,
    Settings,
    baseline_property_rows,
    embedding_property_rows,
    evaluate,
    is_redshift,
    labelled_rows,
    mean_provabgs_r2,
    paired_bootstrap_r2,
    paper_property_names,
    read_baselines,
    read_features,
    read_objects,
)
from foundation.atomic import write_figure, write_json, write_text
from foundation.cli import Command
from foundation.data.raw_inputs import parse_field_map
from foundation.errors import DataError
from foundation.results import TABLE_SUFFIX, ResultRow, ResultTable, write_table
from pipelines.evaluate_common import (
    add_embeddings_argument,
    command_line,
    json_default,
    markdown_table,
    parse_csv,
    parse_labelled,
    raw_arrays,
    table_provenance,
)

# ----------------------------------------------------------------------------- reports


def render_table(results: list[dict[str, Any]]) -> str:
    """One row per (source, modality, method); R² per target, plus redshift MAE and outliers."""
    target_names = list(dict.fromkeys(r["target"] for r in results))
    z_names = [t for t in target_names if is_redshift(t)]
    headers = ["input", "modality", "method"] + [f"R² {t}" for t in target_names]
    for t in z_names:
        headers += [f"MAE {t}", f"outliers {t}"]
    keyed: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        keyed.setdefault((r["source"], r["modality"], r["method"]), {})[r["target"]] = r
    rows = []
    for (source, modality, method), per_target in keyed.items():
        row: list[Any] = [source, modality, method]
        row += [per_target[t]["r2"] if t in per_target else "-" for t in target_names]
        for t in z_names:
            row += (
                [per_target[t]["mae"], per_target[t]["outlier_fraction"]] if t in per_target else ["-", "-"]
            )
        rows.append(row)
    return markdown_table(headers, rows)


def scatter_plots(
    predictions: dict[tuple[str, ...], dict[str, np.ndarray]], results: list[dict[str, Any]], out: Path
) -> list[Path]:
    """One predicted-vs-true PNG per target, one panel per (input, modality, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r2 = {(r["source"], r["modality"], r["method"], r["target"]): r["r2"] for r in results}
    paths = []
    for target in dict.fromkeys(key[3] for key in predictions):
        keys = [key for key in predictions if key[3] == target]
        cols = min(4, len(keys))
        rows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            p = predictions[key]
            # Each panel covers truth and predictions, so wild predictions stay visible.
            lo = float(min(np.min(p["true"]), np.min(p["pred"])))
            hi = float(max(np.max(p["true"]), np.max(p["pred"])))
            pad = 0.03 * (hi - lo or 1.0)
            lo, hi = lo - pad, hi + pad
            ax.scatter(p["true"], p["pred"], s=4, alpha=0.5, edgecolors="none")
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_title(f"{key[0]} · {key[1]}\n{key[2]}  R²={r2[key]:.3f}", fontsize=8)
            ax.set_xlabel(f"true {target}", fontsize=8)
            ax.set_ylabel(f"predicted {target}", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"scatter_{_safe(target)}.png"
        paths.append(write_figure(path, fig, dpi=110))
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ----------------------------------------------------------------------------- command


def run_zero_shot(
    inputs: list[tuple[str, Path]],
    out: Path,
    *,
    targets: list[str] | None = None,
    modalities: list[str] | None = None,
    raw: dict[str, np.ndarray] | None = None,
    raw_source: str | None = None,
    settings: Settings | None = None,
    test_fraction: float = 0.2,
    progress: Any = print,
) -> dict[str, Any]:
    """The whole evaluation; `raw` maps modality -> (N, F) raw inputs aligned with the first file's ids."""
    settings = settings or Settings()
    objects = read_objects(inputs[0][1], targets, test_fraction=test_fraction, seed=settings.seed)
    features = read_features(inputs, objects.ids, modalities, raw)
    ids, how = objects.ids, objects.how
    progress(
        f"zero-shot regression: {len(ids)} objects; split by {how}; targets {', '.join(objects.targets)}"
    )
    results, predictions = evaluate(
        features, objects.targets, objects.train_rows, objects.test_rows, settings, progress
    )
    if not results:
        raise DataError("no target had enough known values to evaluate")
    out.mkdir(parents=True, exist_ok=True)
    table = render_table(results)
    plots = scatter_plots(predictions, results, out)
    np.savez_compressed(
        out / "predictions.npz",
        **{
            "|".join(key) + "|" + part: value
            for key, pair in predictions.items()
            for part, value in pair.items()
        },
    )
    report = {
        "protocol": {
            "knn": "StandardScaler on train embeddings; KNeighborsRegressor(weights='distance')",
            "k": settings.k,
            "paper_k": PAPER_K,
            "cv_folds": settings.folds,
            "mlp_probe": "MLPRegressor(256,), early stopping, standardised target" if settings.mlp else None,
            "raw_baseline": f"StandardScaler + PCA-{settings.raw_pca} + same k-NN" if raw else None,
            "supervised_baseline": f"MLP on PCA-{SUPERVISED_PCA_COMPONENTS} of raw inputs"
            if raw and settings.supervised
            else None,
            "outlier_definition": "|dz|/(1+z) > 0.15",
            "split": how,
            "seed": settings.seed,
        },
        "inputs": {label: str(path) for label, path in inputs} | ({"raw input": raw_source} if raw else {}),
        "n_objects": int(len(ids)),
        "results": results,
        "plots": [p.name for p in plots],
    }
    write_json(out / "report.json", report, indent=2, default=json_default)
    lines = [f"- `{label}`: {path}" for label, path in report["inputs"].items()]
    write_text(
        out / "report.md",
        "# Zero-shot regression\n\n"
        + "\n".join(lines)
        + f"\n\nSplit: {how}. k-NN: scaler + distance-weighted k-NN (k={settings.k}; paper 16).\n\n"
        + table
        + "\n\n"
        + "\n".join(f"![{p.stem}]({p.name})" for p in plots)
        + "\n",
    )
    return report


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_embeddings_argument(
        parser,
        "Embeddings file; repeat as LABEL=FILE to compare (first file defines the split and targets).",
    )
    parser.add_argument("--targets", help="Comma-separated target names (default: every target in the file).")
    parser.add_argument("--modalities", help="Comma-separated modalities (default: all in each file).")
    parser.add_argument(
        "--out", required=True, help="Report directory (report.json, report.md, scatter PNGs)."
    )
    parser.add_argument(
        "--k",
        default=str(PAPER_K),
        help=f"Neighbours for k-NN (default {PAPER_K}, as the paper; 'auto' = CV).",
    )
    parser.add_argument("--no-mlp", action="store_true", help="Skip the MLP probe.")
    parser.add_argument(
        "--mlp-for", help="Comma-separated input labels that get the MLP probe (default: all)."
    )
    parser.add_argument("--no-cross-modal", action="store_true", help="Skip the cross-modal k-NN.")
    parser.add_argument(
        "--raw-data", help="Shard set with the raw inputs, for the PCA + k-NN and supervised baselines."
    )
    parser.add_argument(
        "--raw-fields",
        help="modality=field pairs naming each modality's raw input (default: the field named like it).",
    )
    parser.add_argument(
        "--raw-pca", type=int, default=RAW_PCA_COMPONENTS, help="PCA components for the raw baseline."
    )
    parser.add_argument(
        "--no-supervised", action="store_true", help="Skip the supervised raw-input baseline."
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="Held-out fraction when no split is recorded."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for splits, folds and the MLPs.")
    table = parser.add_argument_group("the paper's property table (astroclip-properties.table.json in --out)")
    table.add_argument(
        "--paper-table",
        action="store_true",
        help="Also write the paper's table: R² of redshift, log M*, Z_MW, t_age, sSFR and their mean.",
    )
    table.add_argument(
        "--protocol",
        choices=("reference", "ours", "all"),
        default="all",
        help="Zero-shot rows: the paper code's k-NN (k=64), ours (k by CV), or both (default).",
    )
    table.add_argument("--no-few-shot", action="store_true", help="Leave out the few-shot MLP rows.")
    table.add_argument(
        "--baselines",
        action="store_true",
        help="Train the supervised image CNN, spectrum conv+attention and photometry MLP (needs --raw-data).",
    )
    table.add_argument(
        "--baselines-from",
        metavar="FILE",
        help="Take the baselines from `foundation evaluate baselines` output instead of training them.",
    )


def _run(args: argparse.Namespace) -> int:
    k: int | str = args.k
    if k != "auto":
        try:
            k = int(k)
        except ValueError:
            raise DataError(f"--k must be an integer or 'auto', got {args.k!r}") from None
        if k < 1:
            raise DataError("--k must be >= 1")
    if not 0.0 < args.test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.baselines and not (args.paper_table and args.raw_data):
        raise DataError("--baselines belongs to --paper-table and trains on --raw-data SHARDS; give both")
    if args.baselines_from and (args.baselines or not args.paper_table):
        raise DataError(
            "--baselines-from belongs to --paper-table and replaces --baselines; give one of them"
        )
    inputs = parse_labelled(args.embeddings, default_label="embeddings")
    raw = None
    if args.raw_data:
        from foundation.data.raw_inputs import load_raw_inputs
        from foundation.embeddings import open_embeddings

        with open_embeddings(inputs[0][1]) as emb:
            ids, mods = emb.ids.tolist(), parse_csv(args.modalities) or emb.modalities
        raw = load_raw_inputs(args.raw_data, ids, parse_field_map(args.raw_fields, mods))
    report = run_zero_shot(
        inputs,
        Path(args.out),
        targets=parse_csv(args.targets),
        modalities=parse_csv(args.modalities),
        raw=raw,
        raw_source=args.raw_data,
        settings=Settings(
            k=k,
            mlp=not args.no_mlp,
            supervised=not args.no_supervised,
            raw_pca=args.raw_pca,
            seed=args.seed,
            cross_modal=not args.no_cross_modal,
            mlp_sources=tuple(parse_csv(args.mlp_for)) if args.mlp_for else None,
        ),
        test_fraction=args.test_fraction,
    )
    print(render_table(report["results"]))
    print(f"report -> {Path(args.out) / 'report.json'}, {Path(args.out) / 'report.md'}")
    if args.paper_table:
        options = TableOptions(
            protocols=("reference", "ours") if args.protocol == "all" else (args.protocol,),
            few_shot=not args.no_few_shot,
            baselines=args.baselines,
            raw_data=args.raw_data,
            raw_fields=parse_field_map(args.raw_fields, ["image", "spectrum"]),
            baselines_from=args.baselines_from,
            seed=args.seed,
            command=command_line("evaluate zero-shot", args),
        )
        print(f"table -> {property_table(inputs, Path(args.out), options)}")
    return 0


COMMANDS = [
    Command(
        ("evaluate", "zero-shot"),
        "Zero-shot k-NN regression (and an MLP probe) of targets from frozen embeddings, with baselines.",
        _add_arguments,
        _run,
    )
]


# ----------------------------------------------------------------------------- the paper's property table

PROPERTY_TABLE = "astroclip-properties"
#: The paper's numbers (R² of redshift / mean of the four PROVABGS properties, on DESI × Legacy
#: Survey with PROVABGS labels): label -> (redshift, mean).
PAPER_ROWS = {
    "AstroCLIP image · zero-shot k-NN": (0.79, 0.47),
    "AstroDINO image tower · zero-shot k-NN": (0.63, 0.37),
    "Stein et al. MoCo image · zero-shot k-NN": (0.36, 0.26),
    "image · supervised ResNet-18": (0.77, 0.43),
    "AstroCLIP spectrum · zero-shot k-NN": (0.99, 0.63),
    "SpecFormer spectrum tower · zero-shot k-NN": (0.99, 0.64),
    "spectrum · supervised conv+attention": (0.99, 0.60),
    "photometry · supervised MLP": (0.68, 0.42),
}
#: Rows drawn in the table's predicted-vs-true figure (modality, method).
SCATTER_ROWS = (
    ("spectrum", ZERO_SHOT_REFERENCE),
    ("spectrum", SPECTRUM_SUPERVISED),
    ("image", ZERO_SHOT_REFERENCE),
    ("image", IMAGE_SUPERVISED),
    ("photometry", PHOTOMETRY_SUPERVISED),
)
DIFFERENCE_TABLE = "astroclip-property-differences"
#: The paper's comparisons, a - b, ((modality, method) of each): the embeddings' protocols against
#: the supervised models of the same input, and the image's against the photometry it contains.
COMPARISONS = (
    (("spectrum", ZERO_SHOT_REFERENCE), ("spectrum", SPECTRUM_SUPERVISED)),
    (("spectrum", FEW_SHOT_REFERENCE), ("spectrum", SPECTRUM_SUPERVISED)),
    (("image", ZERO_SHOT_REFERENCE), ("image", IMAGE_SUPERVISED)),
    (("image", FEW_SHOT_REFERENCE), ("image", IMAGE_SUPERVISED)),
    (("image", ZERO_SHOT_REFERENCE), ("photometry", PHOTOMETRY_SUPERVISED)),
    (("image", FEW_SHOT_REFERENCE), ("photometry", PHOTOMETRY_SUPERVISED)),
)
#: Coverage of a difference's interval.
INTERVAL_LEVEL = 0.95


@dataclass
class TableOptions:
    protocols: tuple[str, ...] = ("reference", "ours")
    few_shot: bool = True
    baselines: bool = False
    raw_data: str | None = None
    raw_fields: dict[str, str] | None = None
    baselines_from: str | None = None
    """A file of `foundation evaluate baselines` to take the baseline rows from instead of training."""
    seed: int = 0
    command: str = ""
    """The command line that asked for the table (its provenance)."""


def property_table(
    inputs: list[tuple[str, Path]], out: Path, options: TableOptions, progress: Any = print
) -> Path:
    """The paper's property table on our data: R² per property for every protocol on the first
    file's embeddings (the controls in later files get the reference k-NN), the supervised
    baselines when asked, and the paper's own rows; written as `<out>/astroclip-properties.table.json`."""
    from foundation.embeddings import open_embeddings

    with open_embeddings(inputs[0][1]) as emb:
        names = paper_property_names(emb.target_names)
    if not names:
        raise DataError(
            f"{inputs[0][1]} carries none of the paper's properties ({', '.join(PAPER_PROPERTIES)})"
        )
    objects = read_objects(inputs[0][1], names, test_fraction=0.2, seed=options.seed)
    train_rows, test_rows, y = labelled_rows(objects.targets, objects.train_rows, objects.test_rows)
    progress(f"property table: {', '.join(names)}; {len(train_rows)} train / {len(test_rows)} test objects")
    all_features = read_features(inputs, objects.ids)
    results = []
    for i, (label, _) in enumerate(inputs):
        features = {fs.modality: fs.x for fs in all_features if fs.source == label}
        rows = embedding_property_rows(
            features,
            y,
            names,
            train_rows,
            test_rows,
            protocols=options.protocols if i == 0 else ("reference",),
            few_shot=options.few_shot and i == 0,
            seed=options.seed,
        )
        results += [{"label": label, **r} for r in rows]
    if options.baselines_from:
        train_ids, test_ids = objects.ids[train_rows], objects.ids[test_rows]
        rows = read_baselines(options.baselines_from, names, train_ids, test_ids)
        results += [{"label": None, **r} for r in rows]
    elif options.baselines:
        if not options.raw_data:
            raise DataError("--baselines trains on the raw inputs: give --raw-data SHARDS")
        raw = raw_arrays(options.raw_data, objects.ids.tolist(), options.raw_fields or {})
        results += [
            {"label": None, **r}
            for r in baseline_property_rows(raw, y, names, train_rows, test_rows, seed=options.seed)
        ]
    for r in results:
        progress(
            f"  {r['label'] or '':<12} {r['modality']:<10} {r['method']:<44} "
            + " ".join(f"{n}={v:.3f}" for n, v in r["r2"].items())
            + f"  ({r['seconds']:.1f} s)"
        )
    figure = _property_scatter(results, y[test_rows], names, out, inputs[0][0])
    table = _property_result_table(inputs, results, names, options, len(train_rows), len(test_rows), figure)
    differences = _difference_table(inputs, results, y[test_rows], names, options)
    if differences is not None:
        write_table(out, differences)
    else:  # an earlier run's comparisons must not be reported beside this table
        (out / f"{DIFFERENCE_TABLE}{TABLE_SUFFIX}").unlink(missing_ok=True)
    return write_table(out, table)


def _difference_table(
    inputs: list[tuple[str, Path]],
    results: list[dict[str, Any]],
    y_test: np.ndarray,
    names: list[str],
    options: TableOptions,
) -> ResultTable | None:
    """The paper's comparisons as differences in R² with paired-bootstrap intervals: whether a
    test set of this size can tell the two rows apart. None when no compared pair was scored."""
    primary = inputs[0][0]
    found = {(r["modality"], r["method"]): r for r in results if r["label"] in (primary, None)}
    columns, with_mean = _property_columns(names)
    provabgs = [i for i, n in enumerate(names) if n in PROVABGS_PROPERTIES]
    tail = (1.0 - INTERVAL_LEVEL) / 2 * 100
    rows = []
    for a, b in COMPARISONS:
        if a not in found or b not in found:
            continue
        point, draws = paired_bootstrap_r2(
            y_test, found[a]["predictions"], found[b]["predictions"], seed=options.seed
        )
        if with_mean:
            point = np.append(point, point[provabgs].mean())
            draws = np.column_stack([draws, draws[:, provabgs].mean(axis=1)])
        low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
        cells: list[Any] = [
            f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(point, low, high, strict=True)
        ]
        rows.append(ResultRow(f"{a[0]} {a[1]} − {b[0]} {b[1]}", cells))
    if not rows:
        return None
    return ResultTable(
        family="astroclip",
        name=DIFFERENCE_TABLE,
        title=f"The paper's comparisons on our data: difference in R², with {INTERVAL_LEVEL:.0%} intervals",
        columns=columns,
        rows=rows,
        metric="ΔR²",
        higher_is_better=None,
        notes=[
            f"Each cell: R² of the first row minus R² of the second on the same {len(y_test)} test "
            f"objects (as in {PROPERTY_TABLE}), then a {INTERVAL_LEVEL:.0%} percentile interval from "
            f"{BOOTSTRAP_DRAWS} paired bootstrap resamples of those objects (one resample scores both "
            "rows, so the objects both find hard cancel out).",
            "An interval that contains 0 means this test set cannot tell the two rows apart: a sign "
            "alone is not a result. The intervals cover the test objects' sampling only, not the "
            "training's randomness (seeds), which adds to it.",
        ],
        provenance=table_provenance(options.command, inputs, options.raw_data),
    )


def _property_columns(names: list[str]) -> tuple[list[str], bool]:
    """The property tables' columns: the paper's name of each property, then the mean of the four
    PROVABGS ones where all four are there (and whether it is)."""
    with_mean = all(n in names for n in PROVABGS_PROPERTIES)
    return [PAPER_PROPERTIES[n] for n in names] + ([MEAN_COLUMN] if with_mean else []), with_mean


def _row_label(result: dict[str, Any]) -> str:
    prefix = f"{result['label']} " if result["label"] else ""
    return f"{prefix}{result['modality']} · {result['method']}"


def _property_result_table(
    inputs: list[tuple[str, Path]],
    results: list[dict[str, Any]],
    names: list[str],
    options: TableOptions,
    n_train: int,
    n_test: int,
    figure: str | None,
) -> ResultTable:
    columns, with_mean = _property_columns(names)
    rows = []
    for r in results:
        values: list[Any] = [r["r2"][n] for n in names] + ([mean_provabgs_r2(r["r2"])] if with_mean else [])
        rows.append(ResultRow(_row_label(r), values))
    for label, (z, mean) in PAPER_ROWS.items():
        values = [z if n == "redshift" else None for n in names] + ([mean] if with_mean else [])
        rows.append(ResultRow(f"{label} (paper, DESI)", values, source="paper"))
    costs = [f"{_row_label(r)} {r['seconds']:.0f} s" for r in results if r["label"] is None]
    ks = [f"{_row_label(r)}: {r['k']}" for r in results if r.get("k")]
    notes = [
        f"Held-out R² on {n_test} test objects; every model fitted on the same {n_train} training objects "
        "(the embeddings file's train/test split; objects with every property known).",
        "Reference protocol (the paper's code): StandardScaler on the training embeddings, targets "
        f"standardised jointly, KNeighborsRegressor(k={REFERENCE_K}, weights='{REFERENCE_WEIGHTS}'); "
        f"few-shot: MLP {FEW_SHOT_HIDDEN} ReLU, dropout {FEW_SHOT_DROPOUT}, Adam {FEW_SHOT_LR}, "
        f"batch {FEW_SHOT_BATCH}, {FEW_SHOT_EPOCHS} epochs, MSE.",
        "Ours: the same scaler and distance-weighted k-NN with k chosen per property by 5-fold "
        "cross-validation on the training objects" + (f" ({'; '.join(ks)})." if ks else "."),
        "Supervised baselines are CPU-sized versions of the paper's (ResNet-18 topology at an eighth "
        "of its width; conv+attention spectrum encoder; photometry MLP 64-64 on magnitudes of aperture "
        "fluxes measured on the images), trained on the same split"
        + (f"; training cost on this CPU: {', '.join(costs)}." if costs else ".")
        + (
            " The photometry k-NN row reads the MLP's magnitudes with the reference k-NN: what that "
            "protocol makes of the photometric information alone."
            if any(r["method"] == PHOTOMETRY_KNN for r in results)
            else ""
        ),
        "Rows marked paper are the published numbers (R² of redshift and the mean of the four "
        "PROVABGS properties) on DESI spectra × Legacy Survey images with PROVABGS labels, not on "
        "our data; their per-property cells are left empty.",
    ]
    return ResultTable(
        family="astroclip",
        name=PROPERTY_TABLE,
        title="Physical property estimation from embeddings vs supervised baselines (R²)",
        columns=columns,
        rows=rows,
        metric="R²",
        higher_is_better=True,
        notes=notes,
        figures=[figure] if figure else [],
        provenance=table_provenance(options.command, inputs, options.raw_data),
    )


def _property_scatter(
    results: list[dict[str, Any]], y_test: np.ndarray, names: list[str], out: Path, primary: str
) -> str | None:
    """Predicted vs true per property (columns) for the table's key rows (rows of panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [
        r
        for modality, method in SCATTER_ROWS
        for r in results
        if r["modality"] == modality and r["method"] == method and r["label"] in (primary, None)
    ]
    if not chosen:
        return None
    fig, axes = plt.subplots(
        len(chosen), len(names), figsize=(2.4 * len(names), 2.4 * len(chosen)), squeeze=False
    )
    for row, r in zip(axes, chosen, strict=True):
        for j, (ax, name) in enumerate(zip(row, names, strict=True)):
            true, pred = y_test[:, j], r["predictions"][:, j]
            lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
            ax.scatter(true, pred, s=3, alpha=0.5, edgecolors="none")
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.7)
            ax.set_title(f"{PAPER_PROPERTIES[name]}  R²={r['r2'][name]:.2f}", fontsize=7)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel(f"{r['modality']}\n{r['method'][:28]}", fontsize=6)
    fig.tight_layout()
    path = write_figure(out / f"{PROPERTY_TABLE}.png", fig, dpi=100)
    return path.name
