"""Evaluation of AstroCLIP embeddings: zero-shot regression and cross-modal retrieval.

Zero-shot regression (AstroCLIP paper, Parker et al. 2024, §5): a StandardScaler fitted on the
training embeddings, then k-nearest-neighbour regression with distance weighting. The paper
reports k = 16 (its code uses 64); `Settings.k` defaults to 16, and the 5-fold cross-validated R²
on the training split goes next to the test score (`k="auto"` picks k from 4..64 by that
cross-validation). A small MLP probe (one hidden layer of 256, early stopping; the paper's
"few-shot" head) is the second method. Raw-input baselines run the same scaler + k-NN on a PCA of
the standardised pixels / fluxes, and a supervised MLP on a 128-component PCA of them. Scores are
R² per target and modality; redshift also gets MAE, the outlier fraction |Δz|/(1+z) > 0.15 and
σ_NMAD. When two modalities of one input share an embedding space, the cross-modal k-NN regresses
each through the other's training embeddings (an image finds its neighbours among spectra): it
only works if the alignment is real.

Cross-modal retrieval: for every object, its query-modality vector is compared (cosine) with the
target-modality vectors of all N candidates; the rank of its own partner gives top-k accuracy,
median rank and mean reciprocal rank, next to chance (k / N and (N + 1) / 2). Ties count against
the model (rank = 1 + number of other candidates scoring >= the partner), so a collapsed
embedding that maps everything to one point scores rank N, not rank 1. Two collapse indicators
per modality go with the ranks (`spread`): the norm of the mean unit vector (0 = spread over the
sphere, 1 = every vector identical) and the effective number of dimensions (participation ratio
(Σλ)²/Σλ² of the covariance eigenvalues; 1 = all on one line).

Train/test rows are a file's recorded splits (train vs test/valid) or a hash of the object id.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError

TRAIN_SPLITS = ("train",)
TEST_SPLITS = ("test", "valid", "val", "validation")
#: Photometric-redshift convention: an outlier has |Δz| / (1 + z) above this.
OUTLIER_THRESHOLD = 0.15
PAPER_K = 16
K_GRID = (4, 8, 16, 32, 64)
CV_FOLDS = 5
RAW_PCA_COMPONENTS = 32
SUPERVISED_PCA_COMPONENTS = 128

_REDSHIFT_NAMES = re.compile(r"^(z|redshift|z_hp|zspec|z_spec|photoz|photo_z)$", re.IGNORECASE)


def is_redshift(name: str) -> bool:
    """Targets that get redshift metrics (MAE, outlier fraction, NMAD) besides R²."""
    return bool(_REDSHIFT_NAMES.match(name))


# ----------------------------------------------------------------------------- splits


def _id_fraction(oid: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{oid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def train_test_rows(
    ids: np.ndarray, split: np.ndarray | None, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, test rows, how): the file's own splits when it records train and test rows,
    otherwise a deterministic hash of each object id (stable under reordering and appending)."""
    if split is not None:
        train = np.flatnonzero(np.isin(split, TRAIN_SPLITS))
        for name in TEST_SPLITS:
            test = np.flatnonzero(split == name)
            if len(train) and len(test):
                return (
                    train,
                    test,
                    f"recorded splits: train={len(train)} ({TRAIN_SPLITS[0]}), test={len(test)} ({name})",
                )
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    frac = np.asarray([_id_fraction(str(oid), seed) for oid in ids.tolist()])
    test = np.flatnonzero(frac < test_fraction)
    train = np.flatnonzero(frac >= test_fraction)
    return train, test, f"hash of object id (seed {seed}): train={len(train)}, test={len(test)}"


# ----------------------------------------------------------------------------- metrics


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (as sklearn; 0 for a constant truth)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) < 2:
        raise ValueError("r2_score needs two 1-D arrays of the same length >= 2")
    ss_res = float(np.sum((y_true - y_pred) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def regression_metrics(name: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """R² always; for redshift also MAE, outlier fraction (|Δz|/(1+z) > 0.15) and σ_NMAD."""
    out = {"r2": r2_score(y_true, y_pred), "n_test": int(len(y_true))}
    if is_redshift(name):
        dz = (np.asarray(y_pred) - np.asarray(y_true)) / (1.0 + np.asarray(y_true))
        out["mae"] = float(np.mean(np.abs(np.asarray(y_pred) - np.asarray(y_true))))
        out["outlier_fraction"] = float(np.mean(np.abs(dz) > OUTLIER_THRESHOLD))
        out["nmad"] = float(1.4826 * np.median(np.abs(dz - np.median(dz))))
    return out


# ----------------------------------------------------------------------------- zero-shot models


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

    scores = []
    for fit_rows, val_rows in KFold(n_splits=folds, shuffle=True, random_state=seed).split(x):
        model = make().fit(x[fit_rows], y[fit_rows])
        scores.append(r2_score(y[val_rows], model.predict(x[val_rows])))
    return scores


# ----------------------------------------------------------------------------- zero-shot protocol


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


@dataclass
class Objects:
    """The objects a zero-shot evaluation scores: ids, target values, and its train/test rows."""

    ids: np.ndarray
    targets: dict[str, np.ndarray]
    train_rows: np.ndarray
    test_rows: np.ndarray
    how: str  # how the rows were split, for the report


def read_objects(path: str | Path, targets: list[str] | None, *, test_fraction: float, seed: int) -> Objects:
    """Ids, targets (default: all the file holds) and train/test rows of the file that defines them."""
    from foundation.embeddings import open_embeddings

    with open_embeddings(path) as emb:
        ids = emb.ids
        available = emb.target_names
        names = targets or available
        missing = [t for t in names if t not in available]
        if missing:
            raise DataError(f"{path} has no targets {missing}; it has: {', '.join(available) or 'none'}")
        if not names:
            raise DataError(f"{path} holds no targets to regress (export with targets, or pass --targets)")
        values = {t: emb.target(t) for t in names}
        train_rows, test_rows, how = train_test_rows(ids, emb.split, test_fraction=test_fraction, seed=seed)
    return Objects(ids, values, train_rows, test_rows, how)


def read_features(
    inputs: list[tuple[str, Path]],
    ids: np.ndarray,
    modalities: list[str] | None = None,
    raw: dict[str, np.ndarray] | None = None,
) -> list[FeatureSet]:
    """One feature set per (input, modality) and per raw modality, every one aligned to `ids`
    (the first input's rows, found in the others by object id)."""
    from foundation.embeddings import open_embeddings

    primary_label = inputs[0][0]
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
    return features


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


# ----------------------------------------------------------------------------- retrieval


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
