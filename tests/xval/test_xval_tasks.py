"""The paper's tasks: generators (determinism, physics, held-out splits), metrics, result tables."""

import json
import math
import re

import numpy as np
import pytest
from sklearn.metrics import mean_squared_error, r2_score

from encoders.xval import extract_numbers, synth
from encoders.xval.tasks import (
    TASKS,
    Prediction,
    build_table,
    mse,
    r2,
    score_arithmetic,
    score_planets,
    unparseable_fraction,
)
from foundation.cli import main
from foundation.results import read_table, write_table


@pytest.mark.parametrize("task", ["arithmetic", "orbits", "planets", "temperature", "interpolation"])
def test_generators_are_deterministic_by_seed(task):
    first = list(synth.generate(task, 60, seed=3))
    assert first == list(synth.generate(task, 60, seed=3))
    assert [r["text"] for r in first] != [r["text"] for r in synth.generate(task, 60, seed=4)]


def _two_body(e: float, anomaly: float = 0.0):
    return synth.initial_state(
        np.ones(1), np.full((1, 1), 3e-5), np.ones((1, 1)), np.full((1, 1), e),
        np.full((1, 1), anomaly), np.zeros((1, 1)),
    )  # fmt: skip


def test_leapfrog_conserves_energy_of_a_three_body_system():
    pos, vel, masses = synth.initial_state(
        np.ones(2), np.array([[4e-5, 2e-5]] * 2), np.array([[1.0, 2.4]] * 2),
        np.array([[0.09, 0.05]] * 2), np.array([[0.0, 2.0]] * 2), np.zeros((2, 2)),
    )  # fmt: skip
    track, speed = synth.leapfrog(pos, vel, masses, np.array([0.85, 0.3]), outputs=40, substeps=48)
    energies = np.stack([synth.energy(track[:, k], speed[:, k], masses) for k in range(40)], axis=1)
    drift = np.abs(energies / energies[:, :1] - 1).max()
    assert drift < 1e-4
    momentum = np.sum(masses[:, None, :, None] * speed, axis=2)
    assert np.abs(momentum).max() < 1e-12  # barycentric frame stays at rest


def test_leapfrog_returns_a_planet_after_one_kepler_period():
    pos, vel, masses = _two_body(e=0.1, anomaly=0.7)
    period = 2 * math.pi / math.sqrt(masses.sum())  # a = 1
    track, _ = synth.leapfrog(pos, vel, masses, np.array([period / 4]), outputs=5, substeps=200)
    relative = track[0, :, 1] - track[0, :, 0]
    assert np.allclose(relative[-1], relative[0], atol=1e-3)
    assert not np.allclose(relative[2], relative[0], atol=0.1)  # half a period away: elsewhere


def test_orbits_positions_follow_the_integrated_orbit():
    record = next(synth.orbits(1, seed=0))
    values = json.loads(record["text"])
    radius = np.hypot(values["x"], values["y"])
    a, e = values["a"], values["e"]
    assert np.all(radius >= a * (1 - e) - 2e-3) and np.all(radius <= a * (1 + e) + 2e-3)


def _planet_params(record):
    desc = json.loads(record["text"])["description"]
    return max(desc["planet0"]["a"], desc["planet1"]["a"]), desc["stepsize"]


def test_planets_test_split_lies_in_the_held_out_bands_and_training_never_does():
    records = list(synth.planets(200, seed=1, test=40))
    lo_a, hi_a = synth.HELD_OUT_A_OUTER
    lo_s, hi_s = synth.HELD_OUT_STEP
    assert sum(r["split"] == "test" for r in records) == 40
    half = 5e-4  # the text rounds to three decimals
    for r in records:
        a_outer, step = _planet_params(r)
        if r["split"] == "test":
            assert lo_a - half <= a_outer <= hi_a + half and lo_s - half <= step <= hi_s + half
        else:
            assert not lo_a + half < a_outer < hi_a - half, r["text"]
            assert not lo_s + half < step < hi_s - half, r["text"]
    assert len(extract_numbers(records[0]["text"]).values) == 7 + 6 * 2 * 2


def test_temperature_test_windows_lie_after_every_training_window():
    records = list(synth.temperature(600, seed=2))
    cut = int(8 * synth.TEMPERATURE_DAYS * (1 - 1 / 6))
    test = [r for r in records if r["split"] == "test"]
    train = [r for r in records if r["split"] != "test"]
    assert test and train
    assert min(r["start"] for r in test) >= cut
    assert max(r["start"] + synth.TEMPERATURE_HISTORY for r in train) < cut


def test_temperature_series_has_seasons_and_days():
    lat, lon, series = synth.temperature_series(seed=0, stations=4, days=365)
    north = int(np.argmax(lat))
    daily = series[north].reshape(365, 8).mean(axis=1)
    if lat[north] > 30:  # northern summer warmer than winter
        assert daily[150:240].mean() > daily[:60].mean() + 5
    assert series.std(axis=1).min() > 2


def test_arithmetic_records_carry_their_operand_count():
    for record in synth.arithmetic(50, seed=0):
        expr = record["text"].split(", ans=")[0]
        assert len(extract_numbers(expr).values) == record["n_operands"]


def _evaluate_tree(text: str, at: int, seen: list[float]) -> tuple[float, int]:
    """(value, next index) of the fully parenthesised expression at `at`, recording every operand
    and intermediate result in `seen` (an independent reader of the generator's text)."""
    if text[at] == "(":
        left, at = _evaluate_tree(text, at + 1, seen)
        op = text[at]
        right, at = _evaluate_tree(text, at + 1, seen)
        assert text[at] == ")"
        value = {"+": left + right, "-": left - right, "*": left * right}[op]
        seen.append(value)
        return value, at + 1
    number = re.match(r"-?\d+\.\d\d", text[at:])
    assert number, text[at:]
    seen.append(float(number.group()))
    return float(number.group()), at + number.end()


def test_arithmetic_operands_intermediates_and_answer_stay_within_the_bound():
    bound = synth.ARITHMETIC_BOUND
    counts = set()
    for record in synth.arithmetic(300, seed=5):
        expr, answer = re.fullmatch(r"expr=(.*), ans=(.*)", record["text"]).groups()
        seen: list[float] = []
        value, end = _evaluate_tree(f"({expr})", 0, seen)
        assert end == len(expr) + 2
        assert float(answer) == pytest.approx(value, abs=5e-5)
        assert max(abs(v) for v in seen) <= bound, record["text"]
        counts.add(record["n_operands"])
        parsed = extract_numbers(record["text"])
        assert parsed.fields[-1] == "ans" and set(parsed.fields[:-1]) == {"expr"}
    assert counts == {2, 3, 4}


def test_unbounded_products_would_leave_the_normalised_range():
    """Why the bound: 2-4 operands in [-10, 10] without it reach ±10⁴; z-scored, typical answers
    are a sliver near 0 and the tail is clipped. Bounded answers fill the range."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 5, 3000)
    free = np.array([synth._expression(rng, int(n))[1] for n in sizes])
    bounded = np.array([synth.bounded_expression(rng, int(n))[1] for n in sizes[:600]])
    z_free = (free - free.mean()) / free.std()
    assert np.median(np.abs(z_free)) < 0.15 and np.abs(z_free).max() > 10
    z_bounded = (bounded - bounded.mean()) / bounded.std()
    assert np.median(np.abs(z_bounded)) > 0.5 and np.abs(z_bounded).max() < 5


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    true = rng.normal(size=50)
    pred = true + rng.normal(scale=0.3, size=50)
    assert mse(true, pred) == pytest.approx(mean_squared_error(true, pred))
    assert r2(true, pred) == pytest.approx(r2_score(true, pred))
    pred_nan = pred.copy()
    pred_nan[:5] = np.nan
    assert r2(true, pred_nan) == pytest.approx(r2_score(true[5:], pred[5:]))
    assert math.isnan(mse(true, np.full(50, np.nan)))


def _pred(key, field, true, predicted):
    return Prediction(key, field, true, predicted)


def test_arithmetic_score_groups_by_operand_count():
    records = {"a": {"n_operands": 2}, "b": {"n_operands": 2}, "c": {"n_operands": 3}, "d": {"n_operands": 3}}
    preds = [
        _pred("a", "ans", 1, 1),
        _pred("b", "ans", 3, 3),
        _pred("c", "ans", 1, 2),
        _pred("d", "ans", 3, 2),
    ]
    two, three, four = score_arithmetic(preds, records)
    assert two == 1.0 and three == pytest.approx(r2_score([1, 3], [2, 2])) and math.isnan(four)


def test_planet_score_and_unparseable_share():
    preds = [_pred("x", "a", 1.0, 1.5), _pred("x", "e", 1.0, 1.0), _pred("y", "a", 2.0, np.nan)]
    assert score_planets(preds, {})[:2] == [0.25, 0.0]
    assert unparseable_fraction(preds) == pytest.approx(1 / 3)


def test_table_round_trips_with_paper_rows(tmp_path):
    task = TASKS["temperature"]
    results = {"xval": [_pred("k", "next", 10.0, 11.0)], "p10": [_pred("k", "next", 10.0, np.nan)]}
    table = build_table(task, results, {}, figures=["xval-temperature.png"], provenance={"command": "x"})
    back = read_table(write_table(tmp_path, table))
    assert back.name == "xval-temperature" and back.family == "xval"
    assert [(r.label, r.source) for r in back.rows[:2]] == [("xVal", "ours"), ("P10", "ours")]
    assert back.rows[0].values == [1.0] and back.rows[1].values == [None]
    paper = {r.label: r.values for r in back.rows if r.source == "paper"}
    assert paper == {
        "xVal (paper)": [1.75],
        "FP15 (paper)": [2.14],
        "P1000 (paper)": [20.0],
        "P10 (paper)": [73.0],
    }
    assert any("Unparseable" in n and "P10 100.0%" in n for n in back.notes)


def test_xval_tasks_refuses_an_unknown_encoding(tmp_path, capsys):
    code = main(
        ["evaluate", "xval-tasks", "--task", "arithmetic", "--out", str(tmp_path), "--encodings", "p7"]
    )
    assert code == 2 and "p7" in capsys.readouterr().err


@pytest.mark.slow
def test_xval_tasks_trains_every_encoding_and_writes_the_table(tmp_path):
    out, tables = tmp_path / "work", tmp_path / "tables"
    args = ["evaluate", "xval-tasks", "--task", "temperature", "--out", str(out), "--tables", str(tables)]
    args += ["--samples", "120", "--steps", "2", "--set", "model.d_model=16", "--set", "model.n_layers=1"]
    assert main(args) == 0
    table = read_table(tables / "xval-temperature.table.json")
    assert [r.label for r in table.rows if r.source == "ours"] == ["xVal", "P10", "P1000", "B1999", "FP15"]
    assert (tables / table.figures[0]).stat().st_size > 0
    assert "xval-tasks" in table.provenance["command"]


def test_normaliser_spread_sets_the_std_of_normalised_values():
    from encoders.xval.normalizer import Normalizer

    values = np.random.default_rng(0).normal(3.0, 2.0, 500)
    names = ["v"] * 500
    norm = Normalizer.fit(values, names, spread=0.25)
    ids = norm.field_ids(names)
    z, clipped = norm.transform(values, ids)
    assert z.std() == pytest.approx(0.25) and clipped == 0
    assert np.allclose(norm.inverse(z, ids), values)
    with pytest.raises(ValueError, match="spread"):
        Normalizer.fit(values, names, spread=0)


def test_synth_refuses_a_non_positive_spread(tmp_path, capsys):
    assert main(["synth", "xval", "--task", "orbits", "--out", str(tmp_path), "--spread", "0"]) == 2
    assert "must be > 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training masks the answer


def _answer_collate(encoding: str, mask_prob: float = 0.01):
    from encoders.xval.collate import XValCollate
    from encoders.xval.encodings import get_encoding
    from encoders.xval.normalizer import FieldMap, Normalizer

    norm = Normalizer(["_", "expr", "ans"], [FieldMap("affine", 0.0, 1.0)] * 3, clip=5.0)
    return XValCollate(norm, get_encoding(encoding), 40, 64, pack=True, mask_prob=mask_prob, mask_fields=[2])


def _arithmetic_sample(rng):
    from encoders.xval.tokenizer import NUM_ID

    tokens = np.array([5, NUM_ID, 6, NUM_ID, 7, NUM_ID], dtype=np.int32)  # expr=a+b, ans=c
    return {"tokens": tokens, "values": rng.uniform(-3, 3, 3), "fields": np.array([1, 1, 2], dtype=np.int16)}


@pytest.mark.parametrize("encoding", ["xval", "p10"])
def test_training_masks_every_answer_like_the_evaluation(encoding):
    collate = _answer_collate(encoding)
    rng = np.random.default_rng(0)
    batch = collate([_arithmetic_sample(rng) for _ in range(16)], rng=np.random.default_rng(1))
    mask, field, slot = batch["mlm_mask"].numpy(), batch["field"].numpy(), batch["slot"].numpy()
    answer = slot & (field == 2)
    assert answer.sum() == 16 * collate.encoding.tokens_per_number  # every token of every answer
    assert mask[answer].all()
    assert mask[~answer].mean() < 0.1  # the rest only at the (small) random rate


def test_mask_fields_must_name_fields_of_the_data():
    from encoders.xval.family import mask_field_ids
    from encoders.xval.model import XValConfig
    from encoders.xval.normalizer import FieldMap, Normalizer
    from foundation.errors import ConfigError

    norm = Normalizer(["_", "expr", "ans"], [FieldMap("affine", 0.0, 1.0)] * 3)
    assert mask_field_ids(XValConfig(mask_fields=["ans"]), norm) == [2]
    with pytest.raises(ConfigError, match="'answer' not among"):
        mask_field_ids(XValConfig(mask_fields=["answer"]), norm)
    with pytest.raises(ValueError, match="mode: mlm"):
        XValConfig(mode="causal", mask_fields=["ans"])


def test_arithmetic_task_trains_with_the_answer_masked():
    task = TASKS["arithmetic"]
    assert "model.mask_fields=[ans]" in task.settings and task.fields == ("ans",)
    assert all("mask_fields" not in s for name in ("planets", "temperature") for s in TASKS[name].settings)


@pytest.mark.slow
def test_xval_tasks_applies_the_task_settings_to_every_training(tmp_path):
    from foundation.config import read_yaml

    out = tmp_path / "work"
    args = ["evaluate", "xval-tasks", "--task", "arithmetic", "--out", str(out), "--encodings", "xval,p10"]
    args += ["--samples", "200", "--steps", "2", "--set", "model.d_model=16", "--set", "model.n_layers=1"]
    assert main(args) == 0
    for encoding in ("xval", "p10"):
        config = read_yaml(out / "runs" / encoding / "config.yaml")
        assert config["model"]["mask_fields"] == ["ans"] and config["model"]["d_model"] == 16
    table = read_table(out / "xval-arithmetic.table.json")
    assert any("model.mask_fields=[ans]" in note for note in table.notes)
