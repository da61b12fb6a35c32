"""`foundation runs plot RUN_DIR`: loss, learning-rate, gradient-norm and throughput curves as a PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from foundation.atomic import write_figure
from foundation.cli import Command
from foundation.errors import DataError


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl; cut-off or foreign lines
    (not a record with a numeric step and loss) are skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(
            f"{str(run_dir)!r} has no metrics.jsonl (is it a run directory of `foundation pretrain`?)"
        )
    train, val = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            continue
        if _is_number(record.get("loss")) and _is_number(record.get("lr")):
            train.append(record)
        elif _is_number(record.get("val_loss")):
            val.append(record)
    if not train:
        raise DataError(f"{str(path)!r} holds no training records yet")
    return train, val


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_run(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(run_dir)
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(title="loss", xlabel="step")
    if all(r["loss"] > 0 for r in train):
        ax.set_yscale("log")
    ax.legend()
    axes[0, 1].plot(steps, [r["lr"] for r in train])
    axes[0, 1].set(title="learning rate", xlabel="step")
    axes[1, 0].plot(steps, [r.get("grad_norm") for r in train])
    axes[1, 0].set(title="gradient norm (before clipping)", xlabel="step")
    ax = axes[1, 1]
    ax.plot(steps, [r.get("samples_per_s") for r in train], label="samples/s")
    ax.set(title="throughput", xlabel="step", ylabel="samples/s")
    if any("data_wait_pct" in r for r in train):
        twin = ax.twinx()
        twin.plot(steps, [r.get("data_wait_pct") for r in train], color="tab:red", alpha=0.5)
        twin.set_ylabel("data wait %", color="tab:red")
    fig.suptitle(str(run_dir))
    return write_figure(out, fig, dpi=100)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="Run directory (holds metrics.jsonl).")
    parser.add_argument("-o", "--out", type=Path, help="PNG to write (default RUN_DIR/metrics.png).")


def _run(args: argparse.Namespace) -> int:
    out = plot_run(args.run_dir, args.out or args.run_dir / "metrics.png")
    print(out)
    return 0


COMMANDS = [
    Command(("runs", "plot"), "Plot a run's loss, lr and throughput curves to a PNG.", _add_arguments, _run)
]
