"""Evaluation of AstroCLIP embeddings: zero-shot regression and cross-modal retrieval.

Zero-shot regression (AstroCLIP paper, Parker et al. 2024, §5): a StandardScaler fitted on the
training embeddings, then k-nearest-neighbour regression with distance weighting. The paper
reports k = 16 (its code uses 64); `Settings.k` defaults to 16, and the 5-fold cross-validated R²
on the training split goes next to the test score (`k="auto"` picks k from 4..64 by that
cross-validation). A small MLP probe (one hidden layer of 256, early stopping; our stand-in for
the paper's few-shot head, which `reference_few_shot` reproduces) is the second method. Raw-input
baselines run the same scaler + k-NN on a PCA of the standardised pixels / fluxes, and a supervised
MLP on a 128-component PCA of them. Scores are R² per target and modality; redshift also gets MAE,
the outlier fraction |Δz|/(1+z) > 0.15 and σ_NMAD. When two modalities of one input share an
embedding space, the cross-modal k-NN regresses each through the other's training embeddings (an
image finds its neighbours among spectra): it only works if the alignment is real.

Cross-modal retrieval: for every object, its query-modality vector is compared (cosine) with the
target-modality vectors of all N candidates; the rank of its own partner gives top-k accuracy,
median rank and mean reciprocal rank, next to chance (k / N and (N + 1) / 2). Ties count against
the model (rank = 1 + number of other candidates scoring >= the partner), so a collapsed
embedding that maps everything to one point scores rank N, not rank 1. Two collapse indicators
per modality go with the ranks (`spread`): the norm of the mean unit vector (0 = spread over the
sphere, 1 = every vector identical) and the effective number of dimensions (participation ratio
(Σλ)²/Σλ² of the covariance eigenvalues; 1 = all on one line).

The paper's tables: `reference_zero_shot` and `reference_few_shot` follow the paper's code
(StandardScaler, k = 64 distance-weighted k-NN; an MLP of two hidden layers of 64), `cv_zero_shot`
is ours (k by cross-validation); `embedding_property_rows` and `baseline_property_rows` (the
supervised models of `encoders.astroclip.baselines`) give R² per property on one split.
`retrieval_table_rows` scores cross-modal and in-modal search: the partner's rank where there is
one, and for every pair whether the neighbours are physically alike (the rank of the query's
nearest object in property space, the redshift scatter of the nearest neighbours).

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
    ss_res = np.sum((y_true - y_pred) ** 2)
    ss_tot = np.sum((y_true - y_true.mean()) ** 2)
    return float(_r2_from_sums(ss_res, ss_tot))


#: Resamples of the test objects behind an interval of a difference in R² (paired bootstrap).
BOOTSTRAP_DRAWS = 2000
#: Elements (draws x objects x columns) resampled at once: bounds the memory of a large test set.
_BOOTSTRAP_BLOCK = 1 << 23


def paired_bootstrap_r2(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """R²(a) - R²(b) per column of (n, P) arrays scored on the same n test objects, and the same
    difference on `draws` resamples of the objects, (draws, P). Each resample is drawn once for
    both models (paired), so what they share — the objects every model finds hard — cancels, and
    the spread is that of the difference, far narrower than either R²'s."""
    y_true, pred_a, pred_b = (np.asarray(a, dtype=np.float64) for a in (y_true, pred_a, pred_b))
    if y_true.ndim != 2 or pred_a.shape != y_true.shape or pred_b.shape != y_true.shape or len(y_true) < 2:
        raise ValueError("paired_bootstrap_r2 needs three (n, P) arrays of one shape, n >= 2")
    n = len(y_true)
    point = np.array(
        [
            r2_score(y_true[:, j], pred_a[:, j]) - r2_score(y_true[:, j], pred_b[:, j])
            for j in range(y_true.shape[1])
        ]
    )
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK // (n * y_true.shape[1]))
    parts = []
    for start in range(0, draws, block):
        rows = rng.integers(0, n, size=(min(block, draws - start), n))
        truth = y_true[rows]  # (d, n, P)
        ss_tot = ((truth - truth.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        r2 = [_r2_from_sums(((pred[rows] - truth) ** 2).sum(axis=1), ss_tot) for pred in (pred_a, pred_b)]
        parts.append(r2[0] - r2[1])
    return point, np.concatenate(parts)


def _r2_from_sums(ss_res: np.ndarray, ss_tot: np.ndarray) -> np.ndarray:
    """1 - SS_res / SS_tot elementwise; 0 for a constant truth (1 if it is also predicted exactly),
    as scikit-learn."""
    constant = ss_tot == 0.0
    r2 = 1.0 - ss_res / np.where(constant, 1.0, ss_tot)
    return np.where(constant, np.where(ss_res == 0.0, 1.0, 0.0), r2)


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


class FoldNeighbours:
    """The held-out rows of each of `folds` shuffled folds with their `k_max` nearest fitting rows,
    for a model `make(k)` that is a pipeline of transformers ending in a distance-weighted k-NN.

    The transformers (scaler, PCA) and the neighbour search depend on the features and the folds,
    not on the target or on k, so they are fitted once here and serve every target and every
    k <= k_max (refitting them per target and per k made cross-validation most of the zero-shot
    evaluation's time). `r2` scores what `make(k)` fitted on each fold predicts: the same
    transformers, the first k of the same search's neighbours, scikit-learn's weighting. Two
    caveats, both below what the scores show: a tie at the k-th distance could keep another of
    the tied rows, and with at most 15 features scikit-learn's `auto` search may be a k-d tree for
    a small k and brute force for k_max, whose float32 distances differ in the last bits.
    """

    def __init__(self, make: Any, x: np.ndarray, seed: int, folds: int, k_max: int) -> None:
        from sklearn.model_selection import KFold
        from sklearn.neighbors import KNeighborsRegressor

        self.n_rows, self.n_folds = len(x), folds
        self.folds: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        splits = list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(x))
        self.k_max = min([k_max] + [len(fit_rows) for fit_rows, _ in splits])
        for fit_rows, val_rows in splits:
            model = make(self.k_max)
            transform, knn = model[:-1], model[-1]
            if not (isinstance(knn, KNeighborsRegressor) and knn.weights == "distance"):
                raise TypeError(f"not a pipeline ending in a distance-weighted k-NN: {model}")
            knn.fit(transform.fit_transform(x[fit_rows]), np.zeros(len(fit_rows)))
            distances, neighbours = knn.kneighbors(transform.transform(x[val_rows]))
            self.folds.append((fit_rows, val_rows, distances, neighbours))

    def r2(self, y: np.ndarray, k: int) -> list[float]:
        """R² of each fold's held-out rows, predicted from their k nearest fitting rows."""
        if not 1 <= k <= self.k_max:
            raise ValueError(f"k={k} is outside 1..{self.k_max}, the neighbours found per fold")
        return [
            r2_score(y[val_rows], distance_weighted_mean(distances[:, :k], y[fit_rows][neighbours[:, :k]]))
            for fit_rows, val_rows, distances, neighbours in self.folds
        ]


def distance_weighted_mean(distances: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each row's mean of `values` weighted by 1 / distance, as scikit-learn's k-NN regressor
    weights them (`weights="distance"`): a row with neighbours at distance 0 averages those only."""
    with np.errstate(divide="ignore"):
        weights = 1.0 / distances
    at_zero = np.isinf(weights)
    rows = at_zero.any(axis=1)
    weights[rows] = at_zero[rows]
    return np.sum(values * weights, axis=1) / np.sum(weights, axis=1)


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
    k_max = K_GRID[-1] if settings.k == "auto" else int(settings.k)
    # One search per feature set and model, shared by the targets known on the same training rows
    # (and, for k by cross-validation, by the cross-modal k-NN fitted on the same features); kept
    # only while the rows stay the same, so that memory holds one row set's neighbours.
    shared: dict[tuple[int, str], FoldNeighbours] = {}
    shared_rows = np.zeros(0, dtype=np.int64)

    def fold_neighbours(fs: FeatureSet, make: Any, rows: np.ndarray) -> FoldNeighbours:
        key = (id(fs), repr(make(k_max)))
        if key not in shared:
            shared[key] = FoldNeighbours(make, fs.x[rows], settings.seed, settings.folds, k_max)
        return shared[key]

    for name, y_all in targets.items():
        known = np.isfinite(y_all)
        tr = train_rows[known[train_rows]]
        te = test_rows[known[test_rows]]
        if not np.array_equal(tr, shared_rows):
            shared.clear()
            shared_rows = tr
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
            k_used = cv = None
            if is_knn:
                if settings.k == "auto":
                    k_used = min(choose_k_by_cv(fold_neighbours(fit, make, tr), y_all[tr]), len(tr))
                else:
                    k_used = min(int(settings.k), len(tr))
                if fit is query:
                    neighbours = fold_neighbours(fit, make, tr)
                    cv = neighbours.r2(y_all[tr], min(k_used, neighbours.k_max))  # a fold fits on fewer rows
            model = make(k_used).fit(fit.x[tr], y_all[tr])
            pred = model.predict(query.x[te])
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
        selected, how = select_rows(emb, rows)
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


def select_rows(emb: Any, rows: str) -> tuple[np.ndarray, str]:
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


# ----------------------------------------------------------------------------- the paper's property table

#: The reference code's protocol (its `downstream_tasks/property_estimation`): embeddings
#: standardised with the training rows' StandardScaler, targets standardised jointly, then
#: KNeighborsRegressor(n_neighbors=64, weights="distance") (zero-shot) or an MLP with two hidden
#: layers of 64, ReLU, dropout 0.1, Adam 1e-3, batch 64, 10 epochs, MSE (few-shot).
REFERENCE_K = 64
REFERENCE_WEIGHTS = "distance"
FEW_SHOT_HIDDEN = (64, 64)
FEW_SHOT_DROPOUT = 0.1
FEW_SHOT_EPOCHS = 10
FEW_SHOT_BATCH = 64
FEW_SHOT_LR = 1e-3
#: The paper's property columns: our target name -> the column's title, in the paper's order.
PAPER_PROPERTIES = {
    "redshift": "redshift",
    "stellar_mass": "log M*",
    "metallicity": "Z_MW",
    "age": "t_age",
    "ssfr": "sSFR",
}
#: The four PROVABGS properties whose mean R² is the paper's second number.
PROVABGS_PROPERTIES = ("stellar_mass", "metallicity", "age", "ssfr")
MEAN_COLUMN = "mean of M*, Z_MW, t_age, sSFR"


def _standardised(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training targets per column (std 1 where a column is constant)."""
    std = y.std(axis=0)
    return y.mean(axis=0), np.where(std > 0, std, 1.0)


def reference_zero_shot(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int = REFERENCE_K
) -> np.ndarray:
    """The reference's zero-shot prediction of (N, targets) `y_train` for the test rows."""
    mean, std = _standardised(y_train)
    model = knn_model(min(k, len(x_train))).fit(x_train, (y_train - mean) / std)
    return model.predict(x_test).reshape(len(x_test), -1) * std + mean


def choose_k_by_cv(neighbours: FoldNeighbours, y: np.ndarray) -> int:
    """The k of K_GRID with the best mean cross-validated R² of the folds of `neighbours`."""
    best, best_score = PAPER_K, -np.inf
    for k in K_GRID:
        if k >= neighbours.n_rows * (neighbours.n_folds - 1) / neighbours.n_folds:
            break
        score = float(np.mean(neighbours.r2(y, k)))
        if score > best_score:
            best, best_score = k, score
    return best


def cv_zero_shot(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int
) -> tuple[np.ndarray, list[int]]:
    """Our zero-shot protocol: the same scaler + distance-weighted k-NN, k chosen per target by
    cross-validation on the training rows; returns predictions and the k of each target."""
    neighbours = FoldNeighbours(knn_model, x_train, seed, CV_FOLDS, K_GRID[-1])
    preds, ks = [], []
    for column in y_train.T:
        k = choose_k_by_cv(neighbours, column)
        preds.append(knn_model(k).fit(x_train, column).predict(x_test))
        ks.append(k)
    return np.stack(preds, axis=1), ks


def reference_few_shot(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
    """The reference's few-shot probe on standardised embeddings (constant learning rate)."""
    from sklearn.preprocessing import StandardScaler

    from encoders.astroclip.baselines import TrainSettings, mlp, train_regressor

    scaler = StandardScaler().fit(x_train)
    settings = TrainSettings(
        epochs=FEW_SHOT_EPOCHS, batch_size=FEW_SHOT_BATCH, lr=FEW_SHOT_LR, seed=seed, cosine=False
    )
    fitted = train_regressor(
        lambda n_out: mlp(x_train.shape[1], n_out, FEW_SHOT_HIDDEN, dropout=FEW_SHOT_DROPOUT),
        scaler.transform(x_train),
        y_train,
        scaler.transform(x_test),
        settings,
    )
    return fitted.predictions.reshape(len(x_test), -1)


def r2_per_column(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    return {name: r2_score(y_true[:, i], y_pred[:, i]) for i, name in enumerate(names)}


def paper_property_names(available: Sequence[str]) -> list[str]:
    """The paper's properties that a file carries, in the paper's order."""
    return [name for name in PAPER_PROPERTIES if name in available]


def labelled_rows(
    targets: dict[str, np.ndarray], train_rows: np.ndarray, test_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows, test rows, (N, targets) values) keeping the rows where every target is known,
    so that each property is scored on the same objects (the reference regresses them jointly)."""
    y = np.stack([np.asarray(v, dtype=np.float64) for v in targets.values()], axis=1)
    known = np.isfinite(y).all(axis=1)
    tr, te = train_rows[known[train_rows]], test_rows[known[test_rows]]
    if len(tr) < 2 * CV_FOLDS or len(te) < 2:
        raise DataError(
            f"only {len(tr)} train / {len(te)} test objects have every one of {', '.join(targets)}"
        )
    return tr, te, y


ZERO_SHOT_REFERENCE = "zero-shot k-NN, reference (k=64)"
ZERO_SHOT_OURS = "zero-shot k-NN, ours (k by 5-fold CV)"
FEW_SHOT_REFERENCE = "few-shot MLP (64, 64), reference"
IMAGE_SUPERVISED = "supervised ResNet-18-like CNN"
SPECTRUM_SUPERVISED = "supervised conv+attention"
PHOTOMETRY_SUPERVISED = "supervised photometry MLP (aperture g, r, z)"


def _run_protocol(
    method: str, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, seed: int
) -> tuple[np.ndarray, list[int] | None]:
    """(test predictions, k per target or None) of one embedding protocol."""
    if method == ZERO_SHOT_REFERENCE:
        return reference_zero_shot(xtr, ytr, xte), None
    if method == ZERO_SHOT_OURS:
        return cv_zero_shot(xtr, ytr, xte, seed)
    return reference_few_shot(xtr, ytr, xte, seed), None


def embedding_property_rows(
    features: dict[str, np.ndarray],
    y: np.ndarray,
    names: Sequence[str],
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    *,
    protocols: Sequence[str] = ("reference", "ours"),
    few_shot: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """R² per property of each modality's embeddings under each protocol ({modality: (N, D)})."""
    methods = [ZERO_SHOT_REFERENCE] if "reference" in protocols else []
    methods += [ZERO_SHOT_OURS] if "ours" in protocols else []
    methods += [FEW_SHOT_REFERENCE] if few_shot else []
    rows = []
    for modality, x in features.items():
        for method in methods:
            start = time.perf_counter()
            pred, ks = _run_protocol(method, x[train_rows], y[train_rows], x[test_rows], seed)
            rows.append(
                {
                    "modality": modality,
                    "method": method,
                    "r2": r2_per_column(y[test_rows], pred, names),
                    "k": dict(zip(names, ks, strict=True)) if ks else None,
                    "seconds": round(time.perf_counter() - start, 2),
                    "predictions": pred,
                }
            )
    return rows


#: The row of the reference k-NN on the photometry MLP's inputs.
PHOTOMETRY_KNN = "zero-shot k-NN on aperture g, r, z magnitudes (reference)"


def baseline_property_rows(
    raw: dict[str, np.ndarray],
    y: np.ndarray,
    names: Sequence[str],
    train_rows: np.ndarray,
    test_rows: np.ndarray,
    *,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """R² per property of the supervised baselines trained on the same split (and of the reference
    k-NN on the photometry MLP's magnitudes); `raw` holds (N, bands, H, W) images under "image" and
    (N, L) spectra under "spectrum" (either may be absent)."""
    from encoders.astroclip import baselines

    jobs = []
    if "image" in raw:
        jobs.append(("image", IMAGE_SUPERVISED, baselines.image_baseline, raw["image"]))
    if "spectrum" in raw:
        jobs.append(("spectrum", SPECTRUM_SUPERVISED, baselines.spectrum_baseline, raw["spectrum"]))
    if "image" in raw:
        jobs.append(("photometry", PHOTOMETRY_SUPERVISED, baselines.photometry_baseline, raw["image"]))
        jobs.append(("photometry", PHOTOMETRY_KNN, baselines.photometry_knn, raw["image"]))
    rows = []
    for modality, method, train, x in jobs:
        fitted = train(x[train_rows], y[train_rows], x[test_rows], seed=seed)
        pred = fitted.predictions.reshape(len(test_rows), -1)
        rows.append(
            {
                "modality": modality,
                "method": method,
                "r2": r2_per_column(y[test_rows], pred, names),
                "k": None,
                "seconds": round(fitted.seconds, 2),
                "parameters": fitted.parameters,
                "predictions": pred,
            }
        )
    return rows


#: `format` of the file `foundation evaluate baselines` writes (read back by `read_baselines`).
BASELINES_FORMAT = "astroclip-baselines/1"


def shard_objects(data: str | Path, names: Sequence[str], *, test_fraction: float, seed: int) -> Objects:
    """Ids, targets and train/test rows of a shard set in the order `foundation export` writes them
    (splits by name, then shard and sample order), so that baselines trained from the shards see the
    same rows, in the same order, as an evaluation of the shards' export."""
    from foundation.data.raw_inputs import iter_samples
    from foundation.export import target_value

    by_split: dict[str, list[tuple[str, list[float]]]] = {}
    for split, key, sample in iter_samples(data):
        by_split.setdefault(split, []).append((key, [target_value(sample, n) for n in names]))
    ordered = [(split, key, values) for split in sorted(by_split) for key, values in by_split[split]]
    ids = np.asarray([key for _, key, _ in ordered], dtype=object).astype(str)
    split = np.asarray([s for s, _, _ in ordered], dtype=object).astype(str)
    values = np.asarray([v for *_, v in ordered], dtype=np.float64).reshape(len(ordered), len(names))
    train, test, how = train_test_rows(ids, split, test_fraction=test_fraction, seed=seed)
    return Objects(ids, {n: values[:, i] for i, n in enumerate(names)}, train, test, how)


def baselines_document(
    names: Sequence[str],
    train_ids: Sequence[str],
    test_ids: Sequence[str],
    rows: list[dict[str, Any]],
    seed: int,
) -> dict[str, Any]:
    """The supervised baselines' rows as JSON: which objects they were trained and scored on (so that
    an evaluation can check it uses the same split) and their test predictions."""
    return {
        "format": BASELINES_FORMAT,
        "properties": list(names),
        "seed": seed,
        "train_ids": [str(i) for i in train_ids],
        "test_ids": [str(i) for i in test_ids],
        "rows": [{**r, "predictions": np.asarray(r["predictions"]).tolist()} for r in rows],
    }


def read_baselines(
    path: str | Path, names: Sequence[str], train_ids: Sequence[str], test_ids: Sequence[str]
) -> list[dict[str, Any]]:
    """Baseline rows written by `foundation evaluate baselines`, checked to be for these properties
    and this exact train/test split (DataError saying what differs otherwise)."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the baselines file {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != BASELINES_FORMAT:
        raise DataError(
            f"{path} is not a baselines file of `foundation evaluate baselines` ({BASELINES_FORMAT})"
        )
    if doc.get("properties") != list(names):
        raise DataError(f"{path} has baselines of {doc.get('properties')}, not of {list(names)}; rerun it")
    for part, ids in (("train", train_ids), ("test", test_ids)):
        if doc.get(f"{part}_ids") != [str(i) for i in ids]:
            raise DataError(
                f"{path}: the baselines' {part} objects differ from the embeddings' {part} split; "
                "train them on the shard set these embeddings were exported from"
            )
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise DataError(f"{path}: 'rows' must be a list")
    return [_baseline_row(path, r, len(test_ids), len(names)) for r in rows]


def _baseline_row(path: str | Path, row: Any, n_test: int, n_names: int) -> dict[str, Any]:
    fields = {"modality": str, "method": str, "r2": dict, "seconds": (int, float), "parameters": int}
    if not isinstance(row, dict) or any(not isinstance(row.get(k), t) for k, t in fields.items()):
        raise DataError(f"{path}: a baseline row lacks one of {', '.join(fields)} (or has the wrong type)")
    try:
        predictions = np.asarray(row.get("predictions"), dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: the predictions of {row['method']!r} are not numbers") from None
    if predictions.shape != (n_test, n_names):
        raise DataError(
            f"{path}: the predictions of {row['method']!r} have shape {predictions.shape}, "
            f"expected ({n_test}, {n_names})"
        )
    return {**row, "k": None, "predictions": predictions}


def mean_provabgs_r2(r2: dict[str, float]) -> float | None:
    """The paper's second number: the mean R² of the four PROVABGS properties (None if one is missing)."""
    if not all(name in r2 for name in PROVABGS_PROPERTIES):
        return None
    return float(np.mean([r2[name] for name in PROVABGS_PROPERTIES]))


# ----------------------------------------------------------------------------- the paper's retrieval table

#: Neighbours whose redshifts are compared with the query's (the paper's figure shows a handful).
NEIGHBOURS_FOR_REDSHIFT = 5


def _similarities(queries: np.ndarray, candidates: np.ndarray, own: np.ndarray | None) -> np.ndarray:
    """Cosine similarities of each query with every candidate; each query's own candidate row
    (`own`) set to -inf: in-modal it is the query itself, cross-modal its partner (scored apart)."""
    sims = _unit(queries) @ _unit(candidates).T
    if own is not None:
        sims[np.arange(len(own)), own] = -np.inf
    return sims


def nearest_others(
    queries: np.ndarray,
    candidates: np.ndarray,
    k: int,
    own: np.ndarray | None = None,
    exclude_own: bool = True,
    block: int = 1024,
) -> np.ndarray:
    """(N, k) candidate rows most similar to each query, best first; each query's own candidate
    (row `own[i]`, by default row i) is left out unless `exclude_own` is False."""
    q = np.asarray(queries, dtype=np.float32)
    c = np.asarray(candidates, dtype=np.float32)
    own = np.arange(len(q)) if own is None else np.asarray(own)
    k = min(k, len(c) - 1 if exclude_own else len(c))
    out = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), block):
        stop = min(len(q), start + block)
        sims = _similarities(q[start:stop], c, own[start:stop] if exclude_own else None)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[start:stop] = np.take_along_axis(top, order, axis=1)
    return out


def property_twins(properties: np.ndarray) -> np.ndarray:
    """Each object's physical twin: the other object nearest in standardised property space."""
    p = np.asarray(properties, dtype=np.float64)
    p = (p - p.mean(axis=0)) / np.where(p.std(axis=0) > 0, p.std(axis=0), 1.0)
    d = np.sum(p**2, axis=1)[:, None] + np.sum(p**2, axis=1)[None, :] - 2 * p @ p.T
    np.fill_diagonal(d, np.inf)
    return np.argmin(d, axis=1)


def twin_ranks(
    queries: np.ndarray, candidates: np.ndarray, twins: np.ndarray, block: int = 1024
) -> np.ndarray:
    """Rank (1 = best) of each query's twin among the candidates other than its own row (ties
    count against the model, as `partner_ranks`)."""
    q = np.asarray(queries, dtype=np.float32)
    c = np.asarray(candidates, dtype=np.float32)
    ranks = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), block):
        stop = min(len(q), start + block)
        sims = _similarities(q[start:stop], c, np.arange(start, stop))
        twin = sims[np.arange(stop - start), twins[start:stop]][:, None]
        ranks[start:stop] = (sims >= twin).sum(axis=1)
    return ranks


def redshift_scatter(redshift: np.ndarray, neighbours: np.ndarray) -> float:
    """Median over queries of the median |Δz|/(1+z) between a query and its retrieved neighbours."""
    z = np.asarray(redshift, dtype=np.float64)
    dz = np.abs(z[neighbours] - z[:, None]) / (1.0 + z[:, None])
    return float(np.median(np.median(dz, axis=1)))


def chance_redshift_scatter(redshift: np.ndarray, k: int, seed: int = 0) -> float:
    """The same statistic for neighbours drawn at random (other objects)."""
    rng = np.random.default_rng(seed)
    n = len(redshift)
    picks = (np.arange(n)[:, None] + rng.integers(1, n, size=(n, min(k, n - 1)))) % n
    return redshift_scatter(redshift, picks)


def retrieval_table_rows(
    vectors: dict[str, np.ndarray],
    ks: Sequence[int],
    *,
    properties: np.ndarray | None = None,
    redshift: np.ndarray | None = None,
    twin_k: int = 10,
) -> list[dict[str, Any]]:
    """Cross-modal and in-modal retrieval of one model, for every ordered pair of modalities.

    Cross-modal pairs score the rank of the object's own partner (top-k, median rank); in-modal
    pairs have no partner to find (the query is its own best match), so both kinds are also scored
    on what the paper's figure shows: whether the neighbours are physically alike — the rank of
    the query's physical twin (nearest other object in standardised property space) and the
    redshift scatter of the nearest neighbours.
    """
    twins = property_twins(properties) if properties is not None else None
    rows = []
    for query, target in itertools.product(vectors, vectors):
        q, t = vectors[query], vectors[target]
        if q.shape != t.shape:
            raise DataError(f"{query} ({q.shape[1]}-d) and {target} ({t.shape[1]}-d) are not in one space")
        row: dict[str, Any] = {"query": query, "target": target, "n": len(q), "cross_modal": query != target}
        if query != target:
            row.update(retrieval_metrics(partner_ranks(q, t), list(ks)))
        if twins is not None:
            ranks = twin_ranks(q, t, twins)
            row[f"twin_top{twin_k}"] = float(np.mean(ranks <= twin_k))
            row["twin_median_rank"] = float(np.median(ranks))
        if redshift is not None:
            row["neighbour_dz"] = redshift_scatter(redshift, nearest_others(q, t, NEIGHBOURS_FOR_REDSHIFT))
        rows.append(row)
    return rows
