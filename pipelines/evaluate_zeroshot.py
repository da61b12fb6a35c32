"""`foundation evaluate zero-shot`: regress physical properties from frozen embeddings.

Protocol (AstroCLIP paper, Parker et al. 2024, §5): a StandardScaler fitted on the training
embeddings, then k-nearest-neighbour regression with distance weighting. The paper reports
k = 16 (its code uses 64); we default to 16 and report the 5-fold cross-validated R² on the
training split next to the test score (`--k auto` picks k from 4..64 by that cross-validation).
A small MLP probe (one hidden layer of 256, early stopping; the paper's "few-shot" head) is the
second method. Scores are R² per target and modality; redshift also gets MAE, the outlier
fraction |Δz|/(1+z) > 0.15 and σ_NMAD. When two modalities of one input share an embedding
space, the cross-modal k-NN regresses each through the other's training embeddings (an image
finds its neighbours among spectra): it only works if the alignment is real.

Baselines from the raw inputs (`--raw-data SHARDS`): the same scaler + k-NN on a PCA of the
standardised pixels / fluxes (fitted on the training rows only), and a supervised MLP trained
directly on the targets from the same inputs (PCA-reduced to 128 components to stay trainable on
a CPU). Several embeddings files (e.g. a random-initialised tower, a shuffled-pair control) can
be scored side by side with `--embeddings LABEL=FILE` repeated. The train/test split is the
first file's recorded split (train vs test/valid) or a hash of the object id; every input is
aligned to it by object id.

Writes `report.json`, `report.md` and one predicted-vs-true scatter PNG per target.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foundation.cli import Command
from foundation.errors import DataError
from pipelines.evaluate_common import (
    is_redshift,
    markdown_table,
    parse_csv,
    parse_labelled,
    regression_metrics,
    train_test_rows,
    write_json,
    write_text,
)

PAPER_K = 16
K_GRID = (4, 8, 16, 32, 64)
CV_FOLDS = 5
RAW_PCA_COMPONENTS = 32
SUPERVISED_PCA_COMPONENTS = 128


# ----------------------------------------------------------------------------- models


def knn_model(k: int) -> Any:
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=k, weights="distance"))


def pca_knn_model(k: int, components: int, seed: int) -> Any:
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        PCA(n_components=components, random_state=seed),
        StandardScaler(),
        KNeighborsRegressor(n_neighbors=k, weights="distance"),
    )


def mlp_model(seed: int, pca_components: int | None = None) -> Any:
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.decomposition import PCA
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps: list[Any] = [StandardScaler()]
    if pca_components:
        steps += [PCA(n_components=pca_components, random_state=seed), StandardScaler()]
    steps.append(
        MLPRegressor(
            hidden_layer_sizes=(256,),
            alpha=1e-3,
            learning_rate_init=1e-3,
            early_stopping=True,
            validation_fraction=0.1,
            n_iter_no_change=20,
            max_iter=500,
            random_state=seed,
        )
    )
    return TransformedTargetRegressor(regressor=make_pipeline(*steps), transformer=StandardScaler())


def cross_validated_r2(
    make: Any, x: np.ndarray, y: np.ndarray, seed: int, folds: int = CV_FOLDS
) -> list[float]:
    """R² of each of `folds` shuffled folds of the training rows."""
    from sklearn.model_selection import KFold

    from pipelines.evaluate_common import r2_score

    scores = []
    for fit_rows, val_rows in KFold(n_splits=folds, shuffle=True, random_state=seed).split(x):
        model = make().fit(x[fit_rows], y[fit_rows])
        scores.append(r2_score(y[val_rows], model.predict(x[val_rows])))
    return scores


# ----------------------------------------------------------------------------- protocol


@dataclass
class FeatureSet:
    """One representation of every object: (N, F) rows aligned with the evaluation's ids."""

    source: str  # embeddings label, or "raw input"
    modality: str
    x: np.ndarray
    raw: bool = False


@dataclass
class Settings:
    k: int | str = PAPER_K
    mlp: bool = True
    supervised: bool = True
    raw_pca: int = RAW_PCA_COMPONENTS
    seed: int = 0
    folds: int = CV_FOLDS
    cross_modal: bool = True
    mlp_sources: tuple[str, ...] | None = None
    """Sources that get the MLP probe (None = all): probes of controls cost CPU and say little."""


def _methods(fs: FeatureSet, settings: Settings, n_train: int) -> list[tuple[str, Any]]:
    """(method name, model factory taking k) for one feature set."""
    limit = max(1, min(n_train - 1, fs.x.shape[1]))
    if fs.raw:
        pcs = min(settings.raw_pca, limit)
        methods = [(f"PCA-{pcs} + k-NN", lambda k, pcs=pcs: pca_knn_model(k, pcs, settings.seed))]
        if settings.supervised:
            pcs_sup = min(SUPERVISED_PCA_COMPONENTS, limit)
            methods.append(
                (f"supervised MLP (PCA-{pcs_sup})", lambda k, p=pcs_sup: mlp_model(settings.seed, p))
            )
        return methods
    methods = [("k-NN", knn_model)]
    if settings.mlp and (settings.mlp_sources is None or fs.source in settings.mlp_sources):
        methods.append(("MLP probe", lambda k: mlp_model(settings.seed)))
    return methods


def _cross_modal(features: list[FeatureSet]) -> list[tuple[FeatureSet, FeatureSet]]:
    """(fit on, predict from) pairs of one source's modalities that share an embedding space."""
    pairs = []
    for a in features:
        for b in features:
            if (
                a is not b
                and not a.raw
                and not b.raw
                and a.source == b.source
                and a.x.shape[1] == b.x.shape[1]
            ):
                pairs.append((a, b))
    return pairs


def evaluate(
    features: list[FeatureSet],
    targets: dict[str, np.ndarray],
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    settings: Settings,
    progress: Any = print,
) -> tuple[list[dict[str, Any]], dict[tuple[str, ...], dict[str, np.ndarray]]]:
    """Score every (feature set, method, target); returns results and test predictions.

    Besides each modality on its own, a source whose modalities share one space gets the
    cross-modal k-NN: neighbours found among the *other* modality's training embeddings (e.g. an
    image embedding regressed through the spectra it lands next to). It only works when the
    alignment is real, which is what the shuffled-pair control checks.
    """
    results: list[dict[str, Any]] = []
    predictions: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for name, y_all in targets.items():
        known = np.isfinite(y_all)
        tr = train_rows[known[train_rows]]
        te = test_rows[known[test_rows]]
        if len(tr) < 2 * settings.folds or len(te) < 2:
            progress(f"  skipping target {name}: only {len(tr)} train / {len(te)} test rows have a value")
            continue
        jobs = []  # (source, modality, method, fit features, query features, model factory, is k-NN)
        for fs in features:
            for method, make in _methods(fs, settings, len(tr)):
                jobs.append((fs.source, fs.modality, method, fs, fs, make, method.endswith("k-NN")))
        if settings.cross_modal:
            for fit, query in _cross_modal(features):
                jobs.append(
                    (query.source, query.modality, f"k-NN via {fit.modality}", fit, query, knn_model, True)
                )
        for source, modality, method, fit, query, make, is_knn in jobs:
            start = time.process_time()
            k = _choose_k(settings, fit, tr, y_all, make) if is_knn else None
            k_used = min(k, len(tr)) if k is not None else None
            model = make(k_used).fit(fit.x[tr], y_all[tr])
            pred = model.predict(query.x[te])
            cv = None
            if is_knn and fit is query:
                k_cv = min(k_used, len(tr) - -(-len(tr) // settings.folds))  # a fold fits on fewer rows
                cv = cross_validated_r2(
                    lambda make=make, k_cv=k_cv: make(k_cv),
                    fit.x[tr],
                    y_all[tr],
                    settings.seed,
                    settings.folds,
                )
            entry = {
                "source": source,
                "modality": modality,
                "method": method,
                "target": name,
                "k": k_used,
                "n_train": int(len(tr)),
                **regression_metrics(name, y_all[te], pred),
                "cv_r2_mean": float(np.mean(cv)) if cv else None,
                "cv_r2_std": float(np.std(cv)) if cv else None,
                "cpu_seconds": round(time.process_time() - start, 2),
            }
            results.append(entry)
            predictions[(source, modality, method, name)] = {"true": y_all[te], "pred": pred}
            progress(
                f"  {name:<14} {source:<14} {modality:<10} {method:<26} R²={entry['r2']:.3f}"
                + (f" (CV {entry['cv_r2_mean']:.3f}±{entry['cv_r2_std']:.3f}, k={k_used})" if cv else "")
            )
    return results, predictions


def _choose_k(settings: Settings, fs: FeatureSet, tr: np.ndarray, y: np.ndarray, make: Any) -> int:
    if settings.k != "auto":
        return int(settings.k)
    best, best_score = PAPER_K, -np.inf
    for k in K_GRID:
        if k >= len(tr) * (settings.folds - 1) / settings.folds:
            break
        score = float(
            np.mean(cross_validated_r2(lambda k=k: make(k), fs.x[tr], y[tr], settings.seed, settings.folds))
        )
        if score > best_score:
            best, best_score = k, score
    return best


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
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
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
    from foundation.embeddings import open_embeddings

    settings = settings or Settings()
    primary_label, primary_path = inputs[0]
    with open_embeddings(primary_path) as emb:
        ids = emb.ids
        available = emb.target_names
        names = targets or available
        missing = [t for t in names if t not in available]
        if missing:
            raise DataError(
                f"{primary_path} has no targets {missing}; it has: {', '.join(available) or 'none'}"
            )
        if not names:
            raise DataError(
                f"{primary_path} holds no targets to regress (export with targets, or pass --targets)"
            )
        target_values = {t: emb.target(t) for t in names}
        train_rows, test_rows, how = train_test_rows(
            ids, emb.split, test_fraction=test_fraction, seed=settings.seed
        )
    features: list[FeatureSet] = []
    for label, path in inputs:
        with open_embeddings(path) as emb:
            if label != primary_label:
                rows = emb.rows_of(ids)
            else:
                rows = np.arange(len(ids))
            mods = modalities or emb.modalities
            for mod in mods:
                features.append(FeatureSet(label, mod, emb.vectors(mod, rows)))
    for mod, x in (raw or {}).items():
        if len(x) != len(ids):
            raise DataError(f"raw {mod} inputs have {len(x)} rows for {len(ids)} objects")
        features.append(FeatureSet("raw input", mod, np.asarray(x, dtype=np.float32), raw=True))
    progress(f"zero-shot regression: {len(ids)} objects; split by {how}; targets {', '.join(names)}")
    results, predictions = evaluate(features, target_values, train_rows, test_rows, settings, progress)
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
    write_json(out / "report.json", report)
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
    parser.add_argument(
        "--embeddings",
        action="append",
        required=True,
        metavar="[LABEL=]FILE",
        help="Embeddings file; repeat as LABEL=FILE to compare (first file defines the split and targets).",
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
        from foundation.embeddings import open_embeddings
        from pipelines.raw_inputs import load_raw_inputs, parse_field_map

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
