"""The evaluation library: metrics and splits against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics

from encoders.astroclip.evaluate import (
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
