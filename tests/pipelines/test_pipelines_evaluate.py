"""`foundation evaluate retrieval|zero-shot`: metrics against independent computations, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sklearn.metrics

from encoders.astroclip.evaluate import Settings
from foundation.cli import main
from foundation.errors import DataError
from pipelines.evaluate_common import parse_labelled
from pipelines.evaluate_zeroshot import run_zero_shot


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


@pytest.mark.slow
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
