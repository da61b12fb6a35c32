"""The papers' tables from rollout reports: MPP's one-step NRMSE per system, The Well's one-step
VRMSE and its rollout VRMSE over steps 6–12 and 13–30, each with the papers' own rows beside ours.

Rows are runs (labelled as given: pretrained, scratch, fine-tuned, ...) plus persistence, columns
are systems (the paper's name and ours). The papers' numbers were measured on their data (PDEBench
at 128², The Well at full size), not on the built-in systems: they mark scale, not a like-for-like
comparison. `write_tables` writes each as `<name>.table.json` (`foundation.results`) with the
rollout-error-vs-step figure beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from encoders.mpp.evaluate import WELL_WINDOWS
from foundation.atomic import write_figure
from foundation.results import ResultRow, ResultTable, Value, write_table

PAPER_NAMES = {
    "shallow_water": "SWE",
    "diffusion_reaction": "DiffRe2D",
    "compressible_ns_m1": "CNS M1.0",
    "compressible_ns_m01": "CNS M0.1",
    "navier_stokes": "INS",
}
"""Built-in systems → the MPP paper's column names (its pretraining systems), in its order."""

MPP_PAPER = {
    "MPP-AViT-B (paper)": {
        "shallow_water": 0.0024,
        "diffusion_reaction": 0.0106,
        "compressible_ns_m1": 0.0281,
        "compressible_ns_m01": 0.0172,
    },
    "MPP-AViT-L (paper)": {
        "shallow_water": 0.0022,
        "diffusion_reaction": 0.0098,
        "compressible_ns_m1": "~0.021",
        "compressible_ns_m01": "~0.015",
    },
}
"""One-step NRMSE of the pretrained models (no fine-tuning), McCabe et al. 2023, Table 1."""

WELL_ONE_STEP_PAPER = {
    "FNO (The Well, paper)": {"gray_scott": 0.1365},
    "CNextU-net (The Well, paper)": {"gray_scott": 0.1761},
}
"""Test VRMSE, one step from 4 of history (The Well's benchmark, gray_scott_reaction_diffusion)."""

WELL_ROLLOUT_PAPER = {
    "FNO (The Well, paper)": {"gray_scott": (0.89, ">10")},
    "CNextU-net (The Well, paper)": {"gray_scott": (0.29, 7.62)},
}
"""Test VRMSE averaged over rollout steps 6:12 and 13:30 (same benchmark)."""

FIGURE = "rollout_vrmse_vs_step.png"
PERSISTENCE = "persistence (last input repeated)"


def system_order(reports: Mapping[str, dict[str, Any]]) -> list[str]:
    """The paper's systems first (in its order), then every other evaluated system, sorted."""
    ours = {d for r in reports.values() for d in r["one_step"]["nrmse"]["per_dataset"]}
    return [*PAPER_NAMES, "gray_scott", *sorted(ours - set(PAPER_NAMES) - {"gray_scott"})]


def column_name(system: str) -> str:
    return f"{PAPER_NAMES[system]} ({system})" if system in PAPER_NAMES else system


def _value(summary: dict[str, Any] | None, key: str) -> Value:
    if summary is None:
        return None
    value = summary[key]
    return float(value) if value is not None else None


def _per_system(report: dict[str, Any], mode: str, metric: str, systems: list[str], key: str) -> list[Value]:
    per_dataset = report[mode][metric]["per_dataset"]
    return [_value(per_dataset.get(s), key) for s in systems]


def _rollout_cells(report: dict[str, Any], mode: str, systems: list[str]) -> list[Value]:
    per_dataset = report[mode]["vrmse"]["per_dataset"]
    cells: list[Value] = []
    for system in systems:
        windows = per_dataset.get(system, {}).get("well_windows", {})
        cells += [windows.get(f"{a}:{b}") for a, b in WELL_WINDOWS]
    return cells


def _reader_of(reports: Mapping[str, dict[str, Any]], system: str) -> dict[str, Any]:
    """The first report that scored `system` (persistence depends on the data only), else the first."""
    for report in reports.values():
        if system in report["persistence"]["vrmse"]["per_dataset"]:
            return report
    return next(iter(reports.values()))


def _paper_rows(paper: dict[str, dict[str, Any]], systems: list[str], pairs: bool = False) -> list[ResultRow]:
    rows = []
    for label, values in paper.items():
        if pairs:
            cells = [v for s in systems for v in values.get(s, (None, None))]
        else:
            cells = [values.get(s) for s in systems]
        rows.append(ResultRow(label, cells, source="paper"))
    return rows


def _provenance(reports: Mapping[str, dict[str, Any]], command: str) -> dict[str, Any]:
    first = next(iter(reports.values()))
    data = {label: r["data"] for label, r in reports.items()}
    return {
        "command": command,
        "config_hash": {label: r.get("config_hash") for label, r in reports.items()},
        "data": first["data"] if len(set(data.values())) == 1 else data,
        "split": first["split"],
        "steps": first["steps"],
    }


def _coverage_notes(reports: Mapping[str, dict[str, Any]], systems: list[str]) -> list[str]:
    evaluated = {d for r in reports.values() for d in r["one_step"]["nrmse"]["per_dataset"]}
    missing = [s for s in systems if s not in evaluated]
    notes = [
        f"{label}: left out {', '.join(f'{d} ({n} windows)' for d, n in sorted(skipped.items()))} — "
        "fields outside its vocabulary."
        for label, r in reports.items()
        if (skipped := r.get("skipped_unknown_fields"))
    ]
    if missing:
        notes.append(
            f"Not in the evaluated data (empty cells in our rows): {', '.join(missing)} "
            "(`foundation synth mpp` writes them all)."
        )
    return notes


def build_tables(reports: Mapping[str, dict[str, Any]], command: str = "") -> list[ResultTable]:
    """The three tables for `reports` (label → `rollout_report` result, same data and steps)."""
    first = next(iter(reports.values()))
    systems = system_order(reports)
    columns = [column_name(s) for s in systems]
    provenance = _provenance(reports, command)
    coverage = _coverage_notes(reports, systems)
    paper_data = (
        "Paper rows are the papers' own numbers on their data (PDEBench at 128x128 for MPP, The Well "
        "at full size), not on ours."
    )

    def ours(mode: str, metric: str, key: str) -> list[ResultRow]:
        rows = [ResultRow(label, _per_system(r, mode, metric, systems, key)) for label, r in reports.items()]
        floor = {s: _per_system(_reader_of(reports, s), "persistence", metric, [s], key)[0] for s in systems}
        rows.append(ResultRow(PERSISTENCE, [floor[s] for s in systems]))
        return rows

    mpp = ResultTable(
        family="mpp",
        name="mpp_one_step_nrmse",
        title="One-step NRMSE per system (MPP, Table 1 layout)",
        columns=columns,
        rows=ours("one_step", "nrmse", "mean") + _paper_rows(MPP_PAPER, systems),
        metric="NRMSE",
        higher_is_better=False,
        notes=[
            "NRMSE = sqrt(mean_xy(e^2) / (mean_xy(y^2) + 1e-7)) per sample and field, averaged over the "
            "samples and fields of each system, as MPP validates; ours average every teacher-forced step "
            f"of the {first['steps']}-step windows (each a next-step prediction from true history).",
            paper_data + " The paper's MPP rows are its pretrained models without fine-tuning; "
            "its L values for CNS are approximate (~).",
            *coverage,
        ],
        provenance=provenance,
    )
    well_one = ResultTable(
        family="mpp",
        name="well_one_step_vrmse",
        title="One-step VRMSE per system (The Well's benchmark layout)",
        columns=columns,
        rows=ours("one_step", "vrmse", "mean") + _paper_rows(WELL_ONE_STEP_PAPER, systems),
        metric="VRMSE",
        higher_is_better=False,
        notes=[
            "VRMSE = sqrt(mean_xy(e^2) / (var_xy(y) + 1e-7)), var unbiased; predicting the field's mean "
            "scores ~1.",
            paper_data + " The Well's gray_scott_reaction_diffusion is the Gray-Scott system.",
            *coverage,
        ],
        provenance=provenance,
    )
    rollout_columns = [f"{column_name(s)} {a}:{b}" for s in systems for a, b in WELL_WINDOWS]
    rollout_rows = [ResultRow(label, _rollout_cells(r, "rollout", systems)) for label, r in reports.items()]
    floor = [c for s in systems for c in _rollout_cells(_reader_of(reports, s), "persistence", [s])]
    rollout_rows.append(ResultRow(PERSISTENCE, floor))
    steps = first["steps"]
    window_notes = [
        "Autoregressive rollout VRMSE averaged over rollout steps 6-12 and 13-30 (The Well's 6:12 and "
        "13:30: 1-based, inclusive)."
    ]
    short = [f"{a}:{b}" for a, b in WELL_WINDOWS if b > steps]
    if short:
        window_notes.append(
            f"Evaluated {steps} rollout steps: window(s) {', '.join(short)} need up to step "
            f"{WELL_WINDOWS[-1][1]} (prepare shards with --window >= history + 30 and evaluate with "
            "--steps 30); their cells are empty."
        )
    well_rollout = ResultTable(
        family="mpp",
        name="well_rollout_vrmse",
        title="Rollout VRMSE over The Well's windows 6:12 and 13:30",
        columns=rollout_columns,
        rows=rollout_rows + _paper_rows(WELL_ROLLOUT_PAPER, systems, pairs=True),
        metric="VRMSE",
        higher_is_better=False,
        notes=[*window_notes, paper_data, *coverage],
        figures=[FIGURE],
        provenance=provenance,
    )
    return [mpp, well_one, well_rollout]


def plot_rollout_vs_step(reports: Mapping[str, dict[str, Any]], path: str | Path) -> None:
    """Rollout VRMSE vs step, one panel per evaluated system, one line per run (persistence dashed);
    The Well's windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = {d for r in reports.values() for d in r["rollout"]["vrmse"]["per_dataset"]}
    systems = [s for s in system_order(reports) if s in evaluated]
    cols = min(3, max(1, len(systems)))
    rows = (len(systems) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(reports)}  # one colour per run, every panel
    for ax, system in zip(axes.flat, systems, strict=False):
        for label, report in reports.items():
            values = report["rollout"]["vrmse"]["per_dataset"].get(system, {}).get("per_step")
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, "-", color=colors[label])
        floor = _reader_of(reports, system)["persistence"]["vrmse"]["per_dataset"][system]["per_step"]
        ax.plot(np.arange(1, len(floor) + 1), floor, "--", color="gray")
        for a, b in WELL_WINDOWS:
            if a <= len(floor):
                ax.axvspan(a - 0.5, min(b, len(floor)) + 0.5, color="k", alpha=0.05)
        ax.set_title(column_name(system), fontsize=9)
        ax.set_xlabel("rollout step")
        ax.set_ylabel("VRMSE")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(systems) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=label) for label, c in colors.items()]
    handles.append(plt.Line2D([], [], color="gray", linestyle="--", label="persistence"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    write_figure(path, fig, dpi=100)


def write_tables(folder: str | Path, reports: Mapping[str, dict[str, Any]], command: str = "") -> list[Path]:
    """Write the three tables and their figure into `folder`; returns the table files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot_rollout_vs_step(reports, folder / FIGURE)
    return [write_table(folder, table) for table in build_tables(reports, command)]
