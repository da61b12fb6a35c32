"""Rollout scores per system and window, and the papers' tables built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.mpp import tables
from encoders.mpp.collate import MPPCollate
from encoders.mpp.evaluate import KnownFieldsCollate, evaluate, parse_runs, parse_windows
from encoders.mpp.metrics import METRIC_NAMES
from foundation.errors import DataError
from foundation.results import find_tables, read_table

HISTORY, STEPS = 2, 30


class Offset(torch.nn.Module):
    """Predicts the last input frame plus a constant: errors that can be worked out by hand."""

    def __init__(self, fields: list[str], offset: float) -> None:
        super().__init__()
        self.fields, self.offset = fields, offset

    def forward(self, x, field_ids, field_mask, bcs):
        return x[:, -1] + self.offset


def _sample(key: str, dataset: str, names: list[str], seed: int, steps: int = HISTORY + STEPS) -> dict:
    rng = np.random.default_rng(seed)
    drift = np.linspace(0, 1, steps, dtype=np.float32)[:, None, None, None]
    fields = rng.standard_normal((1, len(names), 8, 8)).astype(np.float32) + drift
    fields = fields + 0.1 * rng.standard_normal((steps, len(names), 8, 8)).astype(np.float32)
    return {
        "__key__": key,
        "fields": fields,
        "bcs": np.array([2, 2]),
        "meta": {"field_names": names, "dataset": dataset},
    }


def _batch(steps: int = STEPS):
    collate = MPPCollate(["a", "b", "c"], history=HISTORY, horizon=steps, train=False, patch_size=4)
    samples = [
        _sample("s1", "shallow_water", ["a", "b"], 0, HISTORY + steps),
        _sample("s2", "shallow_water", ["a", "b"], 1, HISTORY + steps),
        _sample("g1", "gray_scott", ["c"], 2, HISTORY + steps),
    ]
    return collate(samples), samples


def _report(offset: float, steps: int = STEPS) -> dict:
    batch, _ = _batch(steps)
    report, _ = evaluate(Offset(["a", "b", "c"], offset), [batch], steps, parse_windows(None, steps))
    return {"data": "shards", "split": "test", "steps": steps, "config_hash": f"h{offset}", **report}


def test_one_step_nrmse_per_system_equals_the_hand_computation():
    report = _report(0.1)
    _, samples = _batch()
    for dataset, keys in (("shallow_water", ("s1", "s2")), ("gray_scott", ("g1",))):
        values = []
        for s in samples:
            if s["__key__"] not in keys:
                continue
            f = s["fields"].astype(np.float64)
            for k in range(STEPS):
                truth, pred = f[HISTORY + k], f[HISTORY + k - 1] + 0.1
                err = ((pred - truth) ** 2).mean(axis=(-2, -1))
                values += list(np.sqrt(err / ((truth**2).mean(axis=(-2, -1)) + 1e-7)))
        got = report["one_step"]["nrmse"]["per_dataset"][dataset]["mean"]
        assert got == pytest.approx(np.mean(values), rel=1e-5)


def test_well_windows_average_steps_6_to_12_and_13_to_30():
    report = _report(0.1)
    for mode in ("rollout", "persistence"):
        summary = report[mode]["vrmse"]["per_dataset"]["shallow_water"]
        per_step = summary["per_step"]
        assert summary["well_windows"]["6:12"] == pytest.approx(np.mean(per_step[5:12]), rel=1e-6)
        assert summary["well_windows"]["13:30"] == pytest.approx(np.mean(per_step[12:30]), rel=1e-6)
    assert set(report["rollout"]) == set(METRIC_NAMES)
    assert len(report["rollout"]["pearson_r"]["per_step"]) == STEPS  # every metric, every step
    short = _report(0.1, steps=12)["rollout"]["vrmse"]["per_dataset"]["gray_scott"]["well_windows"]
    assert short["6:12"] is not None and short["13:30"] is None


@pytest.fixture(scope="module")
def two_runs():
    return {"pretrained": _report(0.05), "scratch": _report(0.2)}


@pytest.mark.slow
def test_write_tables_writes_three_tables_and_the_figure(tmp_path, two_runs):
    written = tables.write_tables(tmp_path, two_runs, command="foundation evaluate rollout ...")
    assert sorted(p.name for p in find_tables(tmp_path)) == sorted(
        ["mpp_one_step_nrmse.table.json", "well_one_step_vrmse.table.json", "well_rollout_vrmse.table.json"]
    )
    assert sorted(p.name for p in written) == sorted(p.name for p in find_tables(tmp_path))
    assert (tmp_path / tables.FIGURE).stat().st_size > 0
    back = read_table(tmp_path / "well_rollout_vrmse.table.json")
    assert back.to_json() == tables.build_tables(two_runs, "foundation evaluate rollout ...")[2].to_json()


def test_tables_put_ours_and_the_papers_rows_in_the_systems_columns(two_runs):
    reports = two_runs
    mpp, _, rollout = tables.build_tables(reports, command="foundation evaluate rollout ...")
    assert mpp.columns[:4] == [
        "SWE (shallow_water)",
        "DiffRe2D (diffusion_reaction)",
        "CNS M1.0 (compressible_ns_m1)",
        "CNS M0.1 (compressible_ns_m01)",
    ]
    rows = {row.label: row for row in mpp.rows}
    assert [r.label for r in mpp.rows][:3] == ["pretrained", "scratch", tables.PERSISTENCE]
    swe = mpp.columns.index("SWE (shallow_water)")
    gray = mpp.columns.index("gray_scott")
    assert rows["pretrained"].values[swe] == pytest.approx(
        reports["pretrained"]["one_step"]["nrmse"]["per_dataset"]["shallow_water"]["mean"]
    )
    assert rows["pretrained"].values[swe] < rows["scratch"].values[swe]
    assert (
        rows["pretrained"].values[mpp.columns.index("DiffRe2D (diffusion_reaction)")] is None
    )  # not evaluated
    assert rows["MPP-AViT-B (paper)"].source == "paper" and rows["MPP-AViT-B (paper)"].values[swe] == 0.0024
    assert rows["pretrained"].source == "ours" and rows["MPP-AViT-B (paper)"].values[gray] is None
    assert mpp.provenance["config_hash"] == {"pretrained": "h0.05", "scratch": "h0.2"}
    assert any("not on ours" in n for n in mpp.notes)

    assert "gray_scott 6:12" in rollout.columns and "gray_scott 13:30" in rollout.columns
    fno = next(r for r in rollout.rows if r.label.startswith("FNO"))
    assert fno.values[rollout.columns.index("gray_scott 6:12")] == 0.89
    assert fno.values[rollout.columns.index("gray_scott 13:30")] == ">10"
    assert rollout.figures == [tables.FIGURE]
    ours = next(r for r in rollout.rows if r.label == "scratch").values
    assert ours[rollout.columns.index("gray_scott 13:30")] == pytest.approx(
        reports["scratch"]["rollout"]["vrmse"]["per_dataset"]["gray_scott"]["well_windows"]["13:30"]
    )


def test_short_rollouts_say_which_windows_they_miss():
    table = tables.build_tables({"run": _report(0.1, steps=8)})[2]
    assert any("13:30" in n and "empty" in n for n in table.notes)
    cells = next(r for r in table.rows if r.label == "run").values
    assert cells[table.columns.index("gray_scott 13:30")] is None


def test_run_labels():
    assert parse_runs(["pretrained=runs/a", "runs/b/"]) == [("pretrained", "runs/a"), ("b", "runs/b/")]
    with pytest.raises(DataError, match="repeat"):
        parse_runs(["x=runs/a", "x=runs/b"])
    with pytest.raises(DataError, match="label"):
        parse_runs(["a b=runs/a"])


def test_windows_with_fields_a_model_does_not_know_are_left_out_and_counted():
    _, samples = _batch(steps=4)
    collate = KnownFieldsCollate(
        MPPCollate(["a", "b"], history=HISTORY, horizon=4, train=False, patch_size=4)
    )
    batch = collate(samples)
    assert batch["__key__"] == ["s1", "s2"] and collate.skipped == {"gray_scott": 1}
    assert collate([samples[2]]) is None and collate.skipped == {"gray_scott": 2}
    report, _ = evaluate(Offset(["a", "b"], 0.1), [None, batch], 4, parse_windows(None, 4))
    assert report["samples"] == 2 and set(report["rollout"]["vrmse"]["per_dataset"]) == {"shallow_water"}
    table = tables.build_tables({"run": {**_report(0.1, 4), "skipped_unknown_fields": {"gray_scott": 2}}})[0]
    assert any("run: left out gray_scott (2 windows)" in n for n in table.notes)


def test_persistence_row_takes_each_system_from_a_run_that_read_it():
    batch, _ = _batch(steps=4)
    partial, _ = evaluate(Offset(["a", "b", "c"], 0.1), [batch], 4, parse_windows(None, 4))
    only_swe = KnownFieldsCollate(
        MPPCollate(["a", "b"], history=HISTORY, horizon=4, train=False, patch_size=4)
    )
    first, _ = evaluate(Offset(["a", "b"], 0.1), [only_swe(_batch(steps=4)[1])], 4, parse_windows(None, 4))
    meta = {"data": "shards", "split": "test", "steps": 4}
    mpp = tables.build_tables({"first": {**meta, **first}, "full": {**meta, **partial}})[0]
    floor = next(r for r in mpp.rows if r.label == tables.PERSISTENCE).values
    gray = partial["persistence"]["nrmse"]["per_dataset"]["gray_scott"]["mean"]
    assert floor[mpp.columns.index("gray_scott")] == pytest.approx(gray)
    assert next(r for r in mpp.rows if r.label == "first").values[mpp.columns.index("gray_scott")] is None
