"""`foundation evaluate baselines`: the property table's supervised baselines trained from the shards
alone, and read back by `evaluate zero-shot --baselines-from` only for the same split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from encoders.astroclip.evaluate import baselines_document, read_baselines, shard_objects
from foundation.cli import main
from foundation.errors import DataError
from tests.testkit.embeddings import latent_embeddings

NAMES = ["redshift", "stellar_mass"]


def _exported_like(tiny_shards) -> dict:
    """Embeddings with the ids, splits and targets an export of `tiny_shards` has, in its order."""
    objects = shard_objects(tiny_shards, NAMES, test_fraction=0.2, seed=0)
    split = np.full(len(objects.ids), "valid", dtype=object)
    split[objects.train_rows], split[objects.test_rows] = "train", "test"
    data = latent_embeddings(n=len(objects.ids), noise=0.05)
    return dict(data, ids=objects.ids.tolist(), split=split.tolist(), targets=objects.targets)


def test_shard_objects_follow_the_exports_order_and_recorded_splits(tiny_shards):
    objects = shard_objects(tiny_shards, NAMES, test_fraction=0.2, seed=0)
    assert objects.how.startswith("recorded splits")
    ids = objects.ids.tolist()
    # Splits by name (test, train, valid), as `foundation export` writes them.
    assert ids[: len(objects.test_rows)] == sorted(ids[: len(objects.test_rows)])
    assert objects.test_rows.tolist() == list(range(len(objects.test_rows)))
    assert np.isfinite(objects.targets["stellar_mass"]).all()  # read from the JSON meta field


@pytest.mark.slow
def test_baselines_from_a_file_equal_baselines_trained_in_the_evaluation(
    tmp_path, tiny_shards, embeddings_writer
):
    from foundation.results import read_table

    baselines = tmp_path / "baselines.json"
    assert main(["evaluate", "baselines", "--raw-data", str(tiny_shards), "--out", str(baselines)]) == 0
    path = embeddings_writer(tmp_path / "e.h5", _exported_like(tiny_shards))
    common = ["evaluate", "zero-shot", "--embeddings", f"astroclip={path}", "--raw-data", str(tiny_shards)]
    light = ["--no-mlp", "--no-supervised", "--no-cross-modal", "--paper-table", "--no-few-shot"]
    assert main([*common, "--out", str(tmp_path / "trained"), *light, "--baselines"]) == 0
    assert main([*common, "--out", str(tmp_path / "read"), *light, "--baselines-from", str(baselines)]) == 0

    def supervised(folder: str) -> dict:
        table = read_table(tmp_path / folder / "astroclip-properties.table.json")
        return {
            row.label: row.values for row in table.rows if row.source == "ours" and "supervised" in row.label
        }

    assert len(supervised("read")) == 3 and supervised("read") == supervised("trained")
    # Both ways of asking for the baselines at once are refused.
    both = [*common, "--out", str(tmp_path / "x"), *light, "--baselines", "--baselines-from", str(baselines)]
    assert main(both) == 2


def _document(tiny_shards, **change) -> dict:
    objects = shard_objects(tiny_shards, NAMES, test_fraction=0.2, seed=0)
    row = {
        "modality": "image",
        "method": "supervised ResNet-18-like CNN",
        "r2": {"redshift": 0.5, "stellar_mass": 0.4},
        "seconds": 1.0,
        "parameters": 10,
        "predictions": np.zeros((len(objects.test_rows), 2)),
    }
    train, test = objects.ids[objects.train_rows], objects.ids[objects.test_rows]
    return {**baselines_document(NAMES, train, test, [row], seed=0), **change}, train, test


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "other/1"}, "not a baselines file"),
        ({"properties": ["redshift"]}, "not of"),
        ({"test_ids": ["obj-9999"]}, "test objects differ"),
        ({"rows": [{"modality": "image"}]}, "lacks one of"),
        (
            {
                "rows": [
                    {
                        "modality": "i",
                        "method": "m",
                        "r2": {},
                        "seconds": 1,
                        "parameters": 1,
                        "predictions": [[1]],
                    }
                ]
            },
            "shape",
        ),
    ],
)
def test_a_baselines_file_of_another_split_or_shape_is_refused(tmp_path, tiny_shards, change, message):
    document, train, test = _document(tiny_shards, **change)
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=message):
        read_baselines(path, NAMES, train, test)


def test_a_baselines_file_round_trips(tmp_path, tiny_shards):
    document, train, test = _document(tiny_shards)
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(document))
    (row,) = read_baselines(path, NAMES, train, test)
    assert row["r2"] == {"redshift": 0.5, "stellar_mass": 0.4} and row["predictions"].shape == (len(test), 2)
