"""`foundation evaluate retrieval|zero-shot`: metrics against independent computations, reports."""

from __future__ import annotations

import json
import re

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


# ----------------------------------------------------------------------------- the paper's tables


def _with_paper_properties(data: dict, ids: list[str] | None = None) -> dict:
    """The latent embeddings' data with the paper's other properties (functions of the two it has)."""
    z, mass = data["targets"]["redshift"], data["targets"]["stellar_mass"]
    rng = np.random.default_rng(7)
    extra = {
        "metallicity": 0.02 * (mass - 9.0) + 0.002 * rng.normal(size=len(z)),
        "age": 10.0 - 5.0 * z + 0.3 * rng.normal(size=len(z)),
        "ssfr": -10.0 - 0.5 * (mass - 10.0) + 0.1 * rng.normal(size=len(z)),
    }
    return dict(data, targets={**data["targets"], **extra}, ids=ids or data["ids"])


def test_zero_shot_paper_table(tmp_path, embeddings_writer):
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    from foundation.results import read_table
    from tests.testkit.embeddings import latent_embeddings

    data = _with_paper_properties(latent_embeddings(n=300, noise=0.05))
    path = embeddings_writer(tmp_path / "e.h5", data)
    out = tmp_path / "zs"
    argv = ["evaluate", "zero-shot", "--embeddings", f"astroclip={path}", "--out", str(out), "--no-mlp"]
    assert (
        main([*argv, "--no-cross-modal", "--targets", "redshift", "--paper-table", "--protocol", "reference"])
        == 0
    )
    table = read_table(out / "astroclip-properties.table.json")
    assert table.columns == ["redshift", "log M*", "Z_MW", "t_age", "sSFR", "mean of M*, Z_MW, t_age, sSFR"]
    ours = {row.label: row.values for row in table.rows if row.source == "ours"}
    assert set(ours) == {
        f"astroclip {m} · {p}"
        for m in ("image", "spectrum")
        for p in ("zero-shot k-NN, reference (k=64)", "few-shot MLP (64, 64), reference")
    }
    # The reference cell recomputed independently with scikit-learn.
    split = np.asarray(data["split"])
    train, test = split == "train", split == "test"
    x = data["vectors"]["spectrum"]
    scaler = StandardScaler().fit(x[train])
    knn = KNeighborsRegressor(n_neighbors=64, weights="distance").fit(
        scaler.transform(x[train]), data["targets"]["age"][train]
    )
    expected = sklearn.metrics.r2_score(data["targets"]["age"][test], knn.predict(scaler.transform(x[test])))
    assert ours["astroclip spectrum · zero-shot k-NN, reference (k=64)"][3] == pytest.approx(
        expected, abs=1e-9
    )
    row = ours["astroclip spectrum · zero-shot k-NN, reference (k=64)"]
    assert row[5] == pytest.approx(np.mean(row[1:5]))
    paper = {row.label: row.values for row in table.rows if row.source == "paper"}
    assert paper["AstroCLIP spectrum · zero-shot k-NN (paper, DESI)"] == [0.99, None, None, None, None, 0.63]
    assert table.figures == ["astroclip-properties.png"] and (out / table.figures[0]).stat().st_size > 5_000
    assert table.provenance["command"].startswith("foundation evaluate zero-shot")
    differences = out / "astroclip-property-differences.table.json"
    assert not differences.exists()  # no supervised rows to compare
    # --baselines without raw inputs is refused before any work.
    assert main([*argv, "--paper-table", "--baselines"]) == 2


@pytest.mark.slow
def test_paper_tables_with_baselines_and_figure(tmp_path, tiny_shards, embeddings_writer):
    from foundation.results import read_table
    from tests.testkit.embeddings import latent_embeddings

    n = 120  # the tiny shard set's objects: obj-0000 ...
    data = _with_paper_properties(latent_embeddings(n=n, noise=0.05), ids=[f"obj-{i:04d}" for i in range(n)])
    data["split"] = ["test" if i % 4 == 0 else "train" for i in range(n)]
    path = embeddings_writer(tmp_path / "e.h5", data)
    out = tmp_path / "tables"
    common = ["--embeddings", f"astroclip={path}", "--out", str(out), "--raw-data", str(tiny_shards)]
    zero_shot = ["evaluate", "zero-shot", *common, "--no-mlp", "--no-supervised", "--no-cross-modal"]
    assert main([*zero_shot, "--paper-table", "--no-few-shot", "--baselines"]) == 0
    table = read_table(out / "astroclip-properties.table.json")
    labels = [row.label for row in table.rows if row.source == "ours"]
    assert (
        "image · supervised ResNet-18-like CNN" in labels and "spectrum · supervised conv+attention" in labels
    )
    assert "photometry · supervised photometry MLP (aperture g, r, z)" in labels
    assert "astroclip image · zero-shot k-NN, ours (k by 5-fold CV)" in labels
    assert not any("few-shot" in label for label in labels)
    assert any("training cost" in note for note in table.notes)
    # The paper's comparisons: each cell the two rows' difference in R², then its interval.
    r2 = {row.label: row.values for row in table.rows if row.source == "ours"}
    differences = read_table(out / "astroclip-property-differences.table.json")
    assert differences.columns == table.columns and differences.higher_is_better is None
    cells = {row.label: row.values for row in differences.rows}
    assert list(cells) == [
        "spectrum zero-shot k-NN, reference (k=64) − spectrum supervised conv+attention",
        "image zero-shot k-NN, reference (k=64) − image supervised ResNet-18-like CNN",
        "image zero-shot k-NN, reference (k=64) − photometry supervised photometry MLP (aperture g, r, z)",
    ]
    image = r2["astroclip image · zero-shot k-NN, reference (k=64)"]
    photometry = r2["photometry · supervised photometry MLP (aperture g, r, z)"]
    for j, cell in enumerate(cells[list(cells)[2]]):
        point, low, high = (float(v) for v in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell).groups())
        assert point == pytest.approx(image[j] - photometry[j], abs=6e-4) and low <= high
    # Rerun into the same folder without the baselines: their comparisons go with them.
    assert main([*zero_shot, "--paper-table", "--no-few-shot"]) == 0
    assert not (out / "astroclip-property-differences.table.json").exists()
    assert main(["evaluate", "retrieval", *common, "--paper-table"]) == 0
    table = read_table(out / "astroclip-retrieval.table.json")
    rows = {row.label: row.values for row in table.rows}
    cross, inner = (
        rows["astroclip image → spectrum (cross-modal)"],
        rows["astroclip image → image (in-modal)"],
    )
    assert cross[0] is not None and inner[0] is None and inner[4] is not None  # in-modal: twin only
    assert rows["chance (random ranking)"][0] == pytest.approx(1 / 30)
    assert (
        table.figures == ["astroclip-retrieval.png"]
        and (out / "astroclip-retrieval.png").stat().st_size > 10_000
    )


def test_a_tables_command_is_the_command_as_typed():
    """The provenance command leaves out the CLI's sub-command choices (they are its verb words)."""
    import argparse

    from pipelines.evaluate_common import command_line

    args = argparse.Namespace(
        verb="evaluate",
        evaluate="retrieval",
        verbose=False,
        embeddings=["a=x.h5", "b=y.h5"],
        ks="1,5",
        paper_table=True,
        raw_data=None,
    )
    assert command_line("evaluate retrieval", args) == (
        "foundation evaluate retrieval --embeddings a=x.h5 --embeddings b=y.h5 --ks 1,5 --paper-table"
    )
