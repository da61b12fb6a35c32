"""`foundation evaluate zero-shot`: regress physical properties from frozen embeddings.

The protocol (scaler + distance-weighted k-NN, k = 16 as the AstroCLIP paper, an MLP probe, the
cross-modal k-NN, raw-input baselines) is `encoders.astroclip.evaluate`; this command parses the
options, loads the raw inputs behind `--raw-data SHARDS` and writes the reports. Several
embeddings files (e.g. a random-initialised tower, a shuffled-pair control) can be scored side by
side with `--embeddings LABEL=FILE` repeated. The train/test split is the first file's recorded
split (train vs test/valid) or a hash of the object id; every input is aligned to it by object id.

Writes `report.json`, `report.md`, `predictions.npz` and one predicted-vs-true scatter PNG per target.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from encoders.astroclip.evaluate import (
    PAPER_K,
    RAW_PCA_COMPONENTS,
    SUPERVISED_PCA_COMPONENTS,
    Settings,
    evaluate,
    is_redshift,
    read_features,
    read_objects,
)
from foundation.atomic import write_figure, write_json, write_text
from foundation.cli import Command
from foundation.errors import DataError
from pipelines.evaluate_common import (
    add_embeddings_argument,
    json_default,
    markdown_table,
    parse_csv,
    parse_labelled,
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
    inputs = parse_labelled(args.embeddings, default_label="embeddings")
    raw = None
    if args.raw_data:
        from foundation.data.raw_inputs import load_raw_inputs, parse_field_map
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
    return 0


COMMANDS = [
    Command(
        ("evaluate", "zero-shot"),
        "Zero-shot k-NN regression (and an MLP probe) of targets from frozen embeddings, with baselines.",
        _add_arguments,
        _run,
    )
]
