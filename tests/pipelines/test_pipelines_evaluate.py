"""`foundation evaluate retrieval|zero-shot`: metrics against independent computations, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sklearn.metrics

from foundation.cli import main
from foundation.errors import DataError
from pipelines.evaluate_common import parse_labelled, r2_score, regression_metrics, train_test_rows
from pipelines.evaluate_retrieval import partner_ranks, retrieval_metrics, spread
from pipelines.evaluate_zeroshot import Settings, run_zero_shot


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


def test_retrieval_cli(tmp_path, make_embeddings, capsys):
    aligned, _ = make_embeddings("aligned.h5", n=300, noise=0.02)
    shuffled, data = make_embeddings("shuffled.h5", n=300, noise=0.02)
    # A control whose image vectors belong to other objects: retrieval must fall to chance.
    import h5py

    with h5py.File(shuffled, "a") as f:
        f["image"][:] = data["vectors"]["image"][np.random.default_rng(1).permutation(300)]
    out = tmp_path / "ret"
    assert (
        main(
            [
                "evaluate",
                "retrieval",
                "--embeddings",
                f"aligned={aligned}",
                "--embeddings",
                f"shuffled={shuffled}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    by = {(r["label"], r["query"]): r for r in report["results"]}
    good, control = by[("aligned", "image")], by[("shuffled", "image")]
    assert good["n"] == len([s for s in data["split"] if s == "test"])  # held-out rows only
    assert good["top1"] > 20 * good["chance_top1"] and good["median_rank"] <= 3
    assert control["top10"] < 0.3 and control["median_rank"] > 0.25 * control["n"]
    assert "| aligned | image → spectrum |" in (out / "report.md").read_text()
    assert good["query_spread"]["mean_norm"] < 0.5 and good["target_spread"]["effective_dims"] > 2
    assert main(["evaluate", "retrieval", "--embeddings", str(aligned), "--query-modality", "image"]) == 2
    assert "give both" in capsys.readouterr().err


@pytest.mark.slow
def test_zero_shot_report_and_controls(tmp_path, make_embeddings, embeddings_writer):
    informative, data = make_embeddings("good.h5", n=500, noise=0.05)
    rng = np.random.default_rng(3)
    noise_data = dict(
        data, vectors={m: rng.normal(size=v.shape).astype(np.float32) for m, v in data["vectors"].items()}
    )
    noise = embeddings_writer(tmp_path / "noise.h5", noise_data)
    # Unaligned: each modality informative on its own, but in a rotated space (a shuffled-pair
    # control looks like this): only the cross-modal k-NN can tell it from the aligned model.
    rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    vectors = {"image": data["vectors"]["image"] @ rotation, "spectrum": data["vectors"]["spectrum"]}
    rotated = embeddings_writer(tmp_path / "rotated.h5", dict(data, vectors=vectors))
    out = tmp_path / "zs"
    raw = {"spectrum": np.concatenate([data["vectors"]["spectrum"], rng.normal(size=(500, 40))], axis=1)}
    report = run_zero_shot(
        [("model", informative), ("noise", noise), ("rotated", rotated)],
        out,
        raw=raw,
        raw_source="synthetic",
        settings=Settings(k=16, mlp=True, mlp_sources=("model",)),
        progress=lambda *_: None,
    )
    res = {(r["source"], r["modality"], r["method"], r["target"]): r for r in report["results"]}
    assert res[("model", "image", "k-NN via spectrum", "redshift")]["r2"] > 0.8
    assert res[("rotated", "image", "k-NN", "redshift")]["r2"] > 0.8
    assert res[("rotated", "image", "k-NN via spectrum", "redshift")]["r2"] < 0.3
    assert ("noise", "image", "MLP probe", "redshift") not in res  # the probe only for "model"
    assert res[("model", "spectrum", "k-NN", "redshift")]["r2"] > 0.9
    assert res[("model", "image", "MLP probe", "stellar_mass")]["r2"] > 0.8
    assert res[("noise", "spectrum", "k-NN", "redshift")]["r2"] < 0.2
    assert res[("model", "spectrum", "k-NN", "redshift")]["k"] == 16
    assert {"mae", "outlier_fraction", "nmad"} <= set(res[("model", "spectrum", "k-NN", "redshift")])
    raw_methods = {k[2] for k in res if k[0] == "raw input"}
    assert raw_methods == {"PCA-32 + k-NN", "supervised MLP (PCA-56)"}  # capped at the 56 raw features
    # The k-NN test score is the scikit-learn protocol, recomputed independently here.
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    train = np.array([s == "train" for s in data["split"]])
    x = data["vectors"]["spectrum"]
    scaler = StandardScaler().fit(x[train])
    knn = KNeighborsRegressor(16, weights="distance").fit(
        scaler.transform(x[train]), data["targets"]["redshift"][train]
    )
    pred = knn.predict(scaler.transform(x[~train]))
    expected = sklearn.metrics.r2_score(data["targets"]["redshift"][~train], pred)
    assert res[("model", "spectrum", "k-NN", "redshift")]["r2"] == pytest.approx(expected, abs=1e-9)
    saved = json.loads((out / "report.json").read_text())
    assert saved["plots"] == ["scatter_redshift.png", "scatter_stellar_mass.png"]
    assert (out / "scatter_redshift.png").stat().st_size > 10_000
    assert "| model | spectrum | k-NN |" in (out / "report.md").read_text()


def test_zero_shot_cli_and_errors(tmp_path, make_embeddings, capsys):
    path, _ = make_embeddings(n=200)
    out = tmp_path / "zs"
    assert (
        main(
            [
                "evaluate",
                "zero-shot",
                "--embeddings",
                str(path),
                "--targets",
                "redshift",
                "--out",
                str(out),
                "--no-mlp",
                "--k",
                "auto",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "R² redshift" in text and "stellar_mass" not in text
    assert json.loads((out / "report.json").read_text())["results"][0]["k"] in (4, 8, 16, 32, 64)
    assert (
        main(["evaluate", "zero-shot", "--embeddings", str(path), "--targets", "mass", "--out", str(out)])
        == 2
    )
    assert "no targets ['mass']" in capsys.readouterr().err
    with pytest.raises(DataError, match="unique"):
        parse_labelled(["a=x.h5", "a=y.h5"])
