"""The evaluation library: metrics and splits against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics

from encoders.astroclip import evaluate
from encoders.astroclip.evaluate import (
    paired_bootstrap_r2,
    partner_ranks,
    r2_score,
    regression_metrics,
    retrieval_metrics,
    spread,
    train_test_rows,
)


@pytest.mark.parametrize("seed", range(5))
def test_r2_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=50) * rng.uniform(0.1, 10)
    for pred in (y + rng.normal(size=50), rng.normal(size=50) * 5, y, np.full(50, y.mean()), -y):
        assert r2_score(y, pred) == pytest.approx(sklearn.metrics.r2_score(y, pred), abs=1e-12)
    const = np.full(10, 3.0)
    for pred in (const, const + 1):
        assert r2_score(const, pred) == sklearn.metrics.r2_score(const, pred)


def test_paired_bootstrap_differences_are_scikit_learns_on_each_resample():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(40, 2))
    a, b = y + 0.3 * rng.normal(size=y.shape), y + 0.6 * rng.normal(size=y.shape)
    point, draws = paired_bootstrap_r2(y, a, b, draws=25, seed=4)
    assert draws.shape == (25, 2)
    for j in range(2):
        assert point[j] == pytest.approx(
            sklearn.metrics.r2_score(y[:, j], a[:, j]) - sklearn.metrics.r2_score(y[:, j], b[:, j]), abs=1e-12
        )
    # Each draw: one resample of the objects (the same generator calls), scored for both models.
    rows = np.random.default_rng(4).integers(0, 40, size=(25, 40))
    for d in range(25):
        r = rows[d]
        for j in range(2):
            expected = sklearn.metrics.r2_score(y[r, j], a[r, j]) - sklearn.metrics.r2_score(y[r, j], b[r, j])
            assert draws[d, j] == pytest.approx(expected, abs=1e-12)


def test_paired_bootstrap_intervals_separate_only_what_differs(monkeypatch):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(400, 1))
    good, bad = y + 0.2 * rng.normal(size=y.shape), y + 0.8 * rng.normal(size=y.shape)
    _, draws = paired_bootstrap_r2(y, good, bad)
    assert np.percentile(draws, 2.5) > 0.2  # R² ~0.96 against ~0.6
    _, same = paired_bootstrap_r2(y, good, good)
    assert not same.any()
    twin = good + 1e-3 * rng.normal(size=y.shape)  # indistinguishable: the interval straddles 0
    lo, hi = np.percentile(paired_bootstrap_r2(y, good, twin)[1], [2.5, 97.5])
    assert lo < 0 < hi
    # Resampled in blocks when the test set is large: the same number of draws, every one finite.
    monkeypatch.setattr(evaluate, "_BOOTSTRAP_BLOCK", 1000)
    _, blocked = paired_bootstrap_r2(y, good, bad, draws=30)
    assert blocked.shape == (30, 1) and np.isfinite(blocked).all() and (blocked > 0).all()
    # A resample whose truth is constant scores as r2_score does (1 if exact, else 0).
    const = np.zeros((5, 1))
    point, draws = paired_bootstrap_r2(const, const, const + 1, draws=10)
    assert point[0] == 1.0 and (draws == 1.0).all()
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap_r2(y, good[:-1], bad)


def test_redshift_metrics():
    z = np.array([0.1, 0.5, 1.0, 2.0])
    pred = np.array([0.1, 0.5, 1.0, 3.0])  # one catastrophic outlier: |dz|/(1+z) = 1/3
    m = regression_metrics("redshift", z, pred)
    assert m["outlier_fraction"] == 0.25 and m["mae"] == pytest.approx(0.25)
    assert "mae" not in regression_metrics("stellar_mass", z, pred)


def test_partner_ranks_match_brute_force():
    rng = np.random.default_rng(0)
    q, t = rng.normal(size=(70, 6)), rng.normal(size=(70, 6))
    ranks = partner_ranks(q, t, block=16)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    sims = qn @ tn.T
    expected = [1 + int(np.sum(np.delete(sims[i], i) >= sims[i, i])) for i in range(70)]
    assert ranks.tolist() == expected
    assert partner_ranks(t, t).tolist() == [1] * 70  # identical modalities: always found first
    collapsed = np.ones((20, 4))  # everything at one point must not look perfect
    assert partner_ranks(collapsed, collapsed).tolist() == [20] * 20
    m = retrieval_metrics(np.array([1, 2, 3, 10]), [1, 5])
    assert m["top1"] == 0.25 and m["top5"] == 0.75 and m["median_rank"] == 2.5
    assert m["chance_top1"] == 0.25 and m["chance_median_rank"] == 2.5


def test_spread_flags_collapsed_embeddings():
    rng = np.random.default_rng(0)
    spread_out = spread(rng.normal(size=(2000, 16)))
    assert spread_out["mean_norm"] < 0.05 and spread_out["effective_dims"] > 14
    direction = rng.normal(size=16)
    # Every vector one direction (up to tiny noise) or on one line through the origin.
    one_point = spread(direction + 1e-3 * rng.normal(size=(500, 16)))
    assert one_point["mean_norm"] > 0.99
    signs = rng.choice([-1.0, 1.0], size=(500, 1))
    one_line = spread(signs * direction + 1e-3 * rng.normal(size=(500, 16)))
    assert one_line["mean_norm"] < 0.15 and one_line["effective_dims"] < 1.01
    assert spread(np.ones((5, 3)))["effective_dims"] == 0.0  # no variance at all


def test_split_rows_from_file_or_id_hash():
    ids = np.array([f"o{i}" for i in range(1000)], dtype=object)
    split = np.array(["train"] * 800 + ["valid"] * 200, dtype=object)
    train, test, how = train_test_rows(ids, split)
    assert len(train) == 800 and len(test) == 200 and "valid" in how
    train, test, how = train_test_rows(ids, None, test_fraction=0.2, seed=1)
    assert 150 < len(test) < 250 and len(set(train) | set(test)) == 1000 and not set(train) & set(test)
    # The hash split of an object does not depend on which other objects are there.
    _, test_sub, _ = train_test_rows(ids[::2], None, test_fraction=0.2, seed=1)
    assert set(ids[::2][test_sub]) == set(ids[test]) & set(ids[::2])


# ----------------------------------------------------------------------------- the paper's property table


def _embedded_properties(n: int = 300, dim: int = 12, seed: int = 0):
    """Embeddings that encode three properties (plus noise dimensions), and the properties."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, 3)) * [0.3, 1.0, 5.0] + [0.5, 10.0, 2.0]
    x = np.concatenate([np.tanh(y @ rng.normal(size=(3, dim - 4))), rng.normal(size=(n, 4))], axis=1)
    return x * rng.uniform(0.1, 10.0, size=dim), y  # unequal feature scales: standardisation matters


def test_reference_zero_shot_is_scikit_learns_knn_on_standardised_embeddings():
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    from encoders.astroclip.evaluate import REFERENCE_K, REFERENCE_WEIGHTS, reference_zero_shot

    assert (REFERENCE_K, REFERENCE_WEIGHTS) == (64, "distance")
    x, y = _embedded_properties()
    scaler = StandardScaler().fit(x[:200])
    expected = (
        KNeighborsRegressor(n_neighbors=64, weights="distance")
        .fit(scaler.transform(x[:200]), y[:200])
        .predict(scaler.transform(x[200:]))
    )
    assert np.allclose(reference_zero_shot(x[:200], y[:200], x[200:]), expected, atol=1e-9)
    # Without the scaler the neighbours differ: the test can tell the two apart.
    raw = KNeighborsRegressor(n_neighbors=64, weights="distance").fit(x[:200], y[:200]).predict(x[200:])
    assert not np.allclose(raw, expected, atol=1e-3)


def test_knn_model_settings():
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    from encoders.astroclip.evaluate import knn_model

    scaler, knn = (step for _, step in knn_model(64).steps)
    assert isinstance(scaler, StandardScaler) and isinstance(knn, KNeighborsRegressor)
    assert knn.n_neighbors == 64 and knn.weights == "distance"


@pytest.mark.parametrize("model", ["knn", "pca-knn"])
def test_fold_neighbours_score_what_refitting_the_pipeline_per_fold_and_k_scores(model):
    """One neighbour search per fold serves every k and target: the R² must be the one of the
    whole scikit-learn pipeline refitted on each fold for that k (duplicated rows included, whose
    zero distances scikit-learn weights specially)."""
    from sklearn.model_selection import KFold

    from encoders.astroclip.evaluate import K_GRID, FoldNeighbours, knn_model, pca_knn_model

    x, y = _embedded_properties(n=160)
    # Exact duplicates (same values too, so that a tie between two copies is no choice): some
    # held-out rows sit at distance 0 from fitting rows.
    x[100:110], y[100:110] = x[:10], y[:10]
    make = knn_model if model == "knn" else (lambda k: pca_knn_model(k, 5, seed=2))
    neighbours = FoldNeighbours(make, x, seed=4, folds=5, k_max=K_GRID[-1])
    assert neighbours.k_max == K_GRID[-1]
    for k in K_GRID:
        for column in y.T:
            expected = [
                sklearn.metrics.r2_score(column[val], make(k).fit(x[fit], column[fit]).predict(x[val]))
                for fit, val in KFold(5, shuffle=True, random_state=4).split(x)
            ]
            assert np.allclose(neighbours.r2(column, k), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="outside"):
        neighbours.r2(y[:, 0], K_GRID[-1] + 1)


def test_targets_known_on_other_rows_get_their_own_neighbours():
    """The evaluation shares one neighbour search between the targets known on the same training
    rows; a target with missing values must be scored on its own rows, as if evaluated alone."""
    from encoders.astroclip.evaluate import FeatureSet, Settings, evaluate

    x, y = _embedded_properties(n=200)
    features = [FeatureSet("emb", "image", x.astype(np.float32))]
    gappy = y[:, 1].copy()
    gappy[::7] = np.nan
    targets = {"a": y[:, 0], "b": gappy, "c": y[:, 2]}
    settings = Settings(k="auto", mlp=False, supervised=False, cross_modal=False)
    train, test = np.arange(150), np.arange(150, 200)
    together, _ = evaluate(features, targets, train, test, settings, progress=lambda _: None)
    for result in together:
        name = result["target"]
        alone, _ = evaluate(features, {name: targets[name]}, train, test, settings, progress=lambda _: None)
        assert {k: v for k, v in result.items() if k != "cpu_seconds"} == {
            k: v for k, v in alone[0].items() if k != "cpu_seconds"
        }
    assert [r["n_train"] for r in together] == [150, 128, 150]


def test_distance_weighted_mean_averages_only_the_neighbours_at_distance_zero():
    from encoders.astroclip.evaluate import distance_weighted_mean

    distances = np.array([[0.0, 0.0, 2.0], [1.0, 2.0, 4.0]])
    values = np.array([[1.0, 3.0, 100.0], [4.0, 2.0, 8.0]])
    assert np.allclose(distance_weighted_mean(distances, values), [2.0, (4 + 1 + 2) / (1 + 0.5 + 0.25)])


@pytest.mark.slow
def test_cv_zero_shot_picks_scikit_learns_grid_search_k():
    from sklearn.model_selection import GridSearchCV, KFold

    from encoders.astroclip.evaluate import K_GRID, cv_zero_shot, knn_model

    x, y = _embedded_properties(n=240)
    pred, ks = cv_zero_shot(x[:200], y[:200], x[200:], seed=3)
    for j in range(3):
        search = GridSearchCV(
            knn_model(4),
            {"kneighborsregressor__n_neighbors": list(K_GRID)},
            cv=KFold(5, shuffle=True, random_state=3),
            scoring="r2",
        ).fit(x[:200], y[:200, j])
        assert ks[j] == search.best_params_["kneighborsregressor__n_neighbors"]
        assert np.allclose(pred[:, j], search.predict(x[200:]))


def test_few_shot_probe_has_the_reference_shape(monkeypatch):
    from torch import nn

    from encoders.astroclip import baselines
    from encoders.astroclip.evaluate import reference_few_shot

    seen = {}
    real = baselines.train_regressor

    def spy(make_model, x_train, y_train, x_test, settings):
        seen["model"], seen["settings"], seen["x"] = make_model(y_train.shape[1]), settings, x_train
        return real(make_model, x_train, y_train, x_test, settings)

    monkeypatch.setattr(baselines, "train_regressor", spy)
    x, y = _embedded_properties(n=150)
    pred = reference_few_shot(x[:100], y[:100], x[100:], seed=0)
    assert pred.shape == (50, 3)
    linears = [m for m in seen["model"] if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 64), (64, 64), (64, 3)]
    assert [m.p for m in seen["model"] if isinstance(m, nn.Dropout)] == [0.1, 0.1]
    assert sum(isinstance(m, nn.ReLU) for m in seen["model"]) == 2
    s = seen["settings"]
    assert (s.epochs, s.batch_size, s.lr, s.cosine) == (10, 64, 1e-3, False)
    assert np.allclose(seen["x"].mean(axis=0), 0, atol=1e-3) and np.allclose(
        seen["x"].std(axis=0), 1, atol=1e-3
    )


def test_r2_per_column_and_the_papers_mean():
    from encoders.astroclip.evaluate import PROVABGS_PROPERTIES, mean_provabgs_r2, r2_per_column

    x, y = _embedded_properties(n=50)
    pred = y + np.random.default_rng(1).normal(size=y.shape)
    got = r2_per_column(y, pred, ["a", "b", "c"])
    assert list(got.values()) == pytest.approx(sklearn.metrics.r2_score(y, pred, multioutput="raw_values"))
    scores = dict(zip(PROVABGS_PROPERTIES, [0.1, 0.2, 0.3, 0.6], strict=True))
    assert mean_provabgs_r2({"redshift": 0.9, **scores}) == pytest.approx(0.3)
    assert mean_provabgs_r2({"redshift": 0.9, "stellar_mass": 0.5}) is None


def test_labelled_rows_keep_objects_with_every_property():
    from encoders.astroclip.evaluate import labelled_rows

    a, b = np.arange(30.0), np.arange(30.0)
    a[3], b[25] = np.nan, np.nan
    train, test, y = labelled_rows({"a": a, "b": b}, np.arange(20), np.arange(20, 30))
    assert 3 not in train and 25 not in test and len(train) == 19 and len(test) == 9 and y.shape == (30, 2)


# ----------------------------------------------------------------------------- the paper's retrieval table


def test_retrieval_table_rows_hand_computed():
    from encoders.astroclip.evaluate import retrieval_table_rows

    # Four objects; image i's nearest spectrum is the partner for 0 and 1, while image 2 and 3
    # land nearer each other's spectra. Angles (degrees) make the cosine order obvious.
    def at(degrees):
        return np.stack([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], axis=1)

    image, spectrum = at(np.array([0, 90, 180, 200])), at(np.array([5, 95, 198, 182]))
    properties = np.array([[0.0], [10.0], [20.0], [21.0]])  # twins: 0↔1, 1↔0, 2↔3, 3↔2
    z = np.array([0.1, 0.2, 0.3, 0.4])
    rows = {
        (r["query"], r["target"]): r
        for r in retrieval_table_rows(
            {"image": image, "spectrum": spectrum}, [1, 2], properties=properties, redshift=z
        )
    }
    i2s = rows[("image", "spectrum")]
    # Partner ranks: object 0 → 1, 1 → 1, 2 → 2 (spectrum 3 at 182° is nearer 180°), 3 → 2.
    assert (i2s["top1"], i2s["top2"], i2s["median_rank"]) == (0.5, 1.0, 1.5)
    assert "top1" not in rows[("image", "image")]  # in-modal: no partner to find
    # In-modal twins, self left out: image 0's candidates 90°, 180°, 200° → twin (1) is rank 1;
    # image 1 (90°): 0° and 180° tie at cos 0, 200° below → twin 0 ranks 2 (ties count against).
    i2i = rows[("image", "image")]
    assert i2i["twin_median_rank"] == 1.0 and i2i["twin_top10"] == 1.0
    from encoders.astroclip.evaluate import nearest_others, twin_ranks

    assert twin_ranks(image, image, np.array([1, 0, 3, 2])).tolist() == [1, 2, 1, 1]
    assert nearest_others(image, image, 1).ravel().tolist() == [1, 0, 3, 2]
    assert nearest_others(image, spectrum, 1, exclude_own=False).ravel().tolist() == [0, 1, 3, 2]
    # Redshift scatter of the single nearest other (k=5 capped at 3 others here).
    assert i2i["neighbour_dz"] > 0


def test_redshift_scatter_hand_computed():
    from encoders.astroclip.evaluate import chance_redshift_scatter, property_twins, redshift_scatter

    z = np.array([0.0, 1.0, 0.5])
    neighbours = np.array([[1], [2], [0]])
    # |Δz|/(1+z): 1/1, 0.5/2, 0.5/1.5 → median 1/3.
    assert redshift_scatter(z, neighbours) == pytest.approx(1 / 3)
    # A constant column (std 0) must not turn into NaN distances.
    assert property_twins(np.array([[0.0, 7.0], [1.0, 7.0], [10.0, 7.0], [12.0, 7.0]])).tolist() == [
        1,
        0,
        3,
        2,
    ]
    # Standardised: a spread-out column counts less per unit than a narrow one.
    assert property_twins(np.array([[0.0, 0.0], [100.0, 0.1], [0.0, 0.3], [300.0, 0.2]])).tolist()[0] == 1
    z = np.random.default_rng(0).uniform(0, 1, 500)
    assert chance_redshift_scatter(z, 5) > 0.1
