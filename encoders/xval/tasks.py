"""The xVal paper's tasks at CPU scale: what each evaluates, how it is scored, its result table.

A task is a built-in corpus (`encoders/xval/synth.py`), the fields `evaluate` masks and
predicts, a scorer that turns the predictions (predictions.csv rows) and the corpus records
into the paper's columns, and the paper's own numbers for those columns. Training and running
are orchestration (`foundation evaluate xval-tasks`, pipelines/xval.py); this module only
knows the tasks.

* arithmetic — R² of the answer, per number of operands (2, 3, 4); training masks the answer of
  every expression (`model.mask_fields`), the evaluation's protocol;
* planets — out-of-distribution MSE of the masked orbital parameters a, e, m and the step Δt
  (in the text's units: m ×10⁵, e ×20, as the reference);
* temperature — MSE (°C²) of the next 3-hourly reading on the held-out last sixth of the period.

Metrics are taken over parseable predictions; the share of unparseable ones (text baselines
only) goes into the table's notes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import DataError
from foundation.results import ResultRow, ResultTable

LABELS = {"xval": "xVal", "p10": "P10", "p1000": "P1000", "b1999": "B1999", "fp15": "FP15"}
PAPER_NOTE = "Rows marked 'paper' are the published numbers of Golkar et al. (2023), on the paper's data."


@dataclass(frozen=True)
class Prediction:
    key: str
    field: str
    true: float
    predicted: float


def mse(true: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error over the finite predictions (NaN when there are none)."""
    ok = np.isfinite(pred)
    return float(np.mean((pred[ok] - true[ok]) ** 2)) if ok.any() else float("nan")


def r2(true: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination 1 − SS_res/SS_tot over the finite predictions."""
    ok = np.isfinite(pred)
    t, p = true[ok], pred[ok]
    if len(t) < 2 or np.ptp(t) == 0:
        return float("nan")
    return float(1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2))


def unparseable_fraction(preds: Sequence[Prediction]) -> float:
    return float(np.mean([not np.isfinite(p.predicted) for p in preds])) if preds else 0.0


def _arrays(preds: Iterable[Prediction]) -> tuple[np.ndarray, np.ndarray]:
    preds = list(preds)
    return np.array([p.true for p in preds]), np.array([p.predicted for p in preds])


def score_arithmetic(preds: Sequence[Prediction], records: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """R² of `ans` for 2, 3 and 4 operands."""
    out = []
    for n in (2, 3, 4):
        chosen = [p for p in preds if p.field == "ans" and records[p.key]["n_operands"] == n]
        out.append(r2(*_arrays(chosen)))
    return out


PLANET_FIELDS = ("a", "e", "m", "stepsize")


def score_planets(preds: Sequence[Prediction], records: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """MSE of a, e, m and Δt over the (out-of-distribution) test records."""
    return [mse(*_arrays(p for p in preds if p.field == name)) for name in PLANET_FIELDS]


def score_temperature(preds: Sequence[Prediction], records: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """MSE of the next reading."""
    return [mse(*_arrays(p for p in preds if p.field == "next"))]


@dataclass(frozen=True)
class Task:
    """One paper task: its corpus, the fields to predict, the table layout and the paper's rows."""

    name: str
    title: str
    fields: tuple[str, ...]
    columns: tuple[str, ...]
    metric: str
    higher_is_better: bool
    scorer: Callable[[Sequence[Prediction], Mapping[str, Mapping[str, Any]]], list[float]]
    max_len: int
    plot_field: str
    paper: dict[str, list[float | None]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    steps: int = 600
    """Default training steps per encoding (the same for every encoding)."""
    settings: tuple[str, ...] = ()
    """Config overrides (`dotted.key=value`) that are part of the task's protocol, applied to
    every encoding's training before the user's own."""


ARITHMETIC_STEPS = 8000
ARITHMETIC_MASK_PROB = 0.01
"""Random masking besides the answer: rare, since a masked operand or operator leaves the answer
undetermined and the training signal on it noise."""

TASKS: dict[str, Task] = {
    "arithmetic": Task(
        name="arithmetic",
        title="Multi-operand arithmetic: R² of the answer by number of operands",
        fields=("ans",),
        columns=("2 operands", "3 operands", "4 operands"),
        metric="R²",
        higher_is_better=True,
        scorer=score_arithmetic,
        max_len=80,
        plot_field="ans",
        paper={
            "xval": [0.99998, 0.99994, 0.99998],
            "p10": [0.998, 0.996, 0.992],
            "fp15": [0.993, 0.981, 0.935],
        },
        notes=(
            "Operands, every intermediate result and the answer lie in [-10, 10]; training masks the "
            "answer of every expression, as the evaluation does (model.mask_fields=[ans]).",
        ),
        steps=ARITHMETIC_STEPS,
        settings=("model.mask_fields=[ans]", f"model.mask_prob={ARITHMETIC_MASK_PROB}"),
    ),
    "planets": Task(
        name="planets",
        title="Planetary orbits (N-body): out-of-distribution MSE of the masked parameters",
        fields=PLANET_FIELDS,
        columns=("a", "e", "m", "Δt"),
        metric="MSE (OoD)",
        higher_is_better=False,
        scorer=score_planets,
        max_len=256,
        plot_field="a",
        paper={
            "xval": [0.0010, None, 1.4, 0.0021],
            "p10": [0.0076, None, None, 0.0036],
            "fp15": [0.050, None, None, 0.0075],
        },
        notes=(
            "Test systems have their outer semi-major axis in [2.1, 2.4) and their step in [0.5, 0.6), "
            "bands that no training system touches; e is shown ×20 and m ×10⁵ as in the reference.",
            "The paper's a column is its a₁ (the first planet's semi-major axis); ours pools both planets.",
        ),
    ),
    "temperature": Task(
        name="temperature",
        title="Temperature forecasting: MSE (°C²) of the next 3-hourly reading",
        fields=("next",),
        columns=("next reading",),
        metric="MSE (°C²)",
        higher_is_better=False,
        scorer=score_temperature,
        max_len=128,
        plot_field="next",
        paper={"xval": [1.75], "fp15": [2.14], "p1000": [20.0], "p10": [73.0]},
        notes=(
            "Ours: a synthetic ERA5-like series (16 stations, seasonal + diurnal cycles, AR(1) "
            "weather, sensor noise); test = the last sixth of the period. The paper's rows are ERA5.",
        ),
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown xVal task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def read_predictions(path: str | Path) -> list[Prediction]:
    """The rows of an `evaluate xval` predictions.csv."""
    with Path(path).open(newline="") as handle:
        return [
            Prediction(r["key"], r["field"], float(r["true"]), float(r["predicted"]))
            for r in csv.DictReader(handle)
        ]


def read_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """A synthesised JSONL corpus by record id."""
    records = {}
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            records[record["id"]] = record
    return records


def build_table(
    task: Task,
    results: Mapping[str, Sequence[Prediction]],
    records: Mapping[str, Mapping[str, Any]],
    *,
    notes: Sequence[str] = (),
    figures: Sequence[str] = (),
    provenance: Mapping[str, Any] | None = None,
) -> ResultTable:
    """The task's table: one `ours` row per evaluated encoding (in the given order), then the
    paper's rows for the encodings the paper reports."""
    rows = [ResultRow(LABELS[enc], task.scorer(preds, records)) for enc, preds in results.items()]
    rows += [ResultRow(f"{LABELS[enc]} (paper)", list(vals), "paper") for enc, vals in task.paper.items()]
    bad = [
        f"{LABELS[enc]} {100 * unparseable_fraction(preds):.1f}%"
        for enc, preds in results.items()
        if unparseable_fraction(preds) > 0
    ]
    all_notes = [*notes, *task.notes, PAPER_NOTE]
    if bad:
        all_notes.append("Unparseable predictions (left out of the metric): " + ", ".join(bad) + ".")
    return ResultTable(
        family="xval",
        name=f"xval-{task.name}",
        title=task.title,
        columns=list(task.columns),
        rows=rows,
        metric=task.metric,
        higher_is_better=task.higher_is_better,
        notes=all_notes,
        figures=list(figures),
        provenance=dict(provenance or {}),
    )


def plot_task(path: Path, task: Task, results: Mapping[str, Sequence[Prediction]]) -> None:
    """Predicted vs true of the task's main field, one panel per encoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from foundation.atomic import write_figure

    encodings = list(results)
    fig, axes = plt.subplots(1, len(encodings), figsize=(3.0 * len(encodings), 3.0), squeeze=False)
    for ax, enc in zip(axes[0], encodings, strict=True):
        true, pred = _arrays(p for p in results[enc] if p.field == task.plot_field)
        ok = np.isfinite(pred)
        ax.scatter(true[ok], pred[ok], s=4, alpha=0.5)
        if ok.any():
            lo, hi = float(min(true[ok].min(), pred[ok].min())), float(max(true[ok].max(), pred[ok].max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        else:
            ax.text(0.5, 0.5, "no parseable\npredictions", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{LABELS[enc]}", fontsize=9)
        ax.set_xlabel(f"true {task.plot_field}", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
    fig.suptitle(f"{task.title} (test split)", fontsize=9)
    fig.tight_layout()
    write_figure(path, fig, dpi=100)
