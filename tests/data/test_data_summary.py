"""Per-field summaries and the degenerate-data refusal: a prepare is never silently wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from foundation.cli import main
from foundation.data import Manifest, ShardWriter
from foundation.data.summary import DegenerateDataError, RunningStats, merged_field_stats
from foundation.errors import DataError


def _image(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(10, 2, size=(2, 4, 4)).astype(np.float32)


def _write(path, samples, **kwargs):
    with ShardWriter(path, samples_per_shard=4, **kwargs) as writer:
        for sample, source in samples:
            writer.write(sample, source=source)
    return Manifest.load(path)


def test_counts_zeros_nonfinite_and_masks_by_naming_rule(tmp_path):
    samples = []
    for i in range(6):
        spectrum = np.arange(10, dtype=np.float32) + i
        spectrum[:3] = 0  # masked pixels are zeroed, as the families write them
        spectrum[9] = np.nan if i == 0 else spectrum[9]
        bad = np.zeros(10, bool)
        bad[:3] = True
        samples.append(({"__key__": f"s{i}", "spectrum": spectrum, "spectrum_mask": bad}, "a.h5"))
    stats = _write(tmp_path, samples).field_stats("train")
    flux = stats["spectrum"]
    assert flux["count"] == 59 and flux["nonfinite"] == 1 and flux["masked"] == 18
    assert flux["zeros"] == 18
    assert flux["mask"] == "spectrum_mask (True = bad)"
    assert "spectrum_mask" not in stats  # bool masks get no statistics of their own


@pytest.mark.parametrize(
    "meaning, companion, expected",
    [
        ("bad", np.array([True, False, False, False]), 1),
        ("good", np.array([True, False, False, False]), 3),
        ("weight", np.array([0.0, -1.0, np.nan, 2.0]), 3),
    ],
)
def test_declared_mask_meanings(tmp_path, meaning, companion, expected):
    sample = {"__key__": "a", "x": np.array([1.0, 2.0, 3.0, 4.0]), "w": companion}
    manifest = _write(tmp_path, [(sample, None)], masks={"x": ("w", meaning)}, allow_degenerate=True)
    assert manifest.field_stats("train")["x"]["masked"] == expected


def test_mask_of_another_shape_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"mask field 'x_mask' has shape \(3,\).*field 'x' of shape \(4,\)"):
        with ShardWriter(tmp_path) as writer:
            writer.write({"__key__": "a", "x": np.ones(4), "x_mask": np.zeros(3, bool)})


def test_all_zero_field_is_refused_naming_field_file_and_cause(tmp_path):
    samples = [
        ({"__key__": f"s{i}", "image": _image(i), "flux": np.arange(5.0) + i}, "good.h5") for i in range(4)
    ]
    blank = np.zeros((2, 4, 4), np.float32)
    samples += [({"__key__": f"z{i}", "image": blank, "flux": np.arange(5.0)}, "bad.h5") for i in range(400)]
    out = tmp_path / "set"
    with pytest.raises(DegenerateDataError) as info:
        _write(out, samples, hints={"image": "the image mask may mean the opposite"})
    message = str(info.value)
    assert "field 'image' is 99" in message and "% zeros" in message
    assert "bad.h5" in message and "good.h5" not in message
    assert "the image mask may mean the opposite" in message and "--allow-degenerate" in message
    assert "\n" not in message and "'flux'" not in message
    assert not out.exists()  # not even an empty folder


def test_allow_degenerate_writes_and_records_it(tmp_path, capsys):
    samples = [({"__key__": f"s{i}", "image": np.zeros((2, 4, 4), np.float32)}, "x.h5") for i in range(3)]
    manifest = _write(tmp_path, samples, allow_degenerate=True)
    assert manifest.provenance["degenerate_fields"] == {"image": "is all zeros"}
    assert main(["shards", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "warning: field 'image' is all zeros" in out


def test_inverted_mask_is_all_masked(tmp_path):
    """A survey mask with True = clean read as True = bad: every pixel masked (and zeroed)."""
    samples = []
    for i in range(5):
        clean = np.ones((2, 4, 4), bool)
        bad = clean  # the opposite meaning
        image = np.where(bad, 0, _image(i)).astype(np.float32)
        samples.append(({"__key__": f"s{i}", "image": image, "image_mask": bad}, f"healpix={i}.hdf5"))
    with pytest.raises(DegenerateDataError, match=r"'image' is all masked \(by image_mask \(True = bad\)\)"):
        _write(tmp_path / "set", samples)


def test_constant_and_nonfinite_fields_are_refused(tmp_path):
    constant = [({"__key__": f"s{i}", "x": np.full(3, 7.5)}, None) for i in range(3)]
    with pytest.raises(
        DegenerateDataError, match=r"'x' is constant \(7.5 everywhere\).*source: not recorded"
    ):
        _write(tmp_path / "c", constant)
    nan = [({"__key__": f"s{i}", "x": np.array([np.nan, np.inf, 1.0 + i])}, None) for i in range(3)]
    with pytest.raises(DegenerateDataError, match=r"'x' is 66.7% NaN/inf"):
        _write(tmp_path / "n", nan)


def test_legitimate_repeats_pass(tmp_path):
    """Integer codes, one-valued float parameters (scalars, shape () or (1,)) and bool masks may
    repeat one value."""
    samples = [
        (
            {
                "__key__": f"s{i}",
                "x": np.arange(4.0) * i + 1,
                "bcs": np.zeros(2, np.int64),
                "viscosity": 0.01,
                "label": 0.0,
                "reynolds": np.float32(1e4),  # shape ()
                "mach": np.array([0.1]),
                "x_mask": np.zeros(4, bool),
            },
            None,
        )
        for i in range(4)
    ]
    manifest = _write(tmp_path, samples)
    assert "degenerate_fields" not in manifest.provenance
    assert manifest.field_stats("train")["bcs"]["zeros"] == 8


def test_merged_stats_equal_one_pass():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=n) for n in (5, 17, 1)]
    whole = RunningStats()
    whole.update(np.concatenate(parts))
    split_dicts = []
    for part in parts:
        s = RunningStats()
        s.update(part)
        split_dicts.append({"x": s.to_dict()})
    merged = merged_field_stats(split_dicts)["x"]
    for key, value in whole.to_dict().items():
        assert merged[key] == pytest.approx(value, rel=1e-12)


def test_shards_info_shows_the_summary(tmp_path, capsys):
    masks = np.eye(4, dtype=bool)
    samples = [
        ({"__key__": f"s{i}", "spectrum": np.arange(4.0) + i, "spectrum_mask": masks[i % 4]}, None)
        for i in range(8)
    ]
    _write(tmp_path, samples)
    assert main(["shards", "info", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("field (all splits)"))
    assert header.split()[4:] == ["finite", "masked", "zero", "min", "mean", "max"]
    table = lines[lines.index(header) :]
    row = next(line for line in table if line.startswith("spectrum "))
    assert row.split()[1:5] == ["32", "100%", "25%", "3.12%"]


def test_prepare_xval_refuses_all_zero_numbers(tmp_path, capsys):
    corpus = tmp_path / "zeros.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": f"record {chr(97 + i % 26)} has x = 0"}) + "\n" for i in range(40))
    )
    args = ["prepare", "xval", str(corpus), "--out", str(tmp_path / "s"), "--vocab-size", "64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "field 'values' is all zeros" in err and "zeros.jsonl" in err
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert main([*args, "--allow-degenerate"]) == 0
    out = capsys.readouterr().out
    assert "field summary" in out and "written with --allow-degenerate: values is all zeros" in out
