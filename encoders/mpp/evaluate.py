"""Rollout evaluation: one-step (teacher-forced) and autoregressive K-step errors.

For each window of `history + K` true steps: the one-step prediction of step k uses the true
history before k; the rollout prediction of step k feeds the model its own earlier predictions.
Both are scored with every metric of The Well (`encoders.mpp.metrics`) per sample, step and field,
then averaged per field, per data set, per step and per window of steps — among them The Well's
rollout windows, steps 6–12 and 13–30. Persistence (repeat the last input) is scored alongside as
the floor any surrogate must beat. `rollout_report` runs all of it for a checkpoint and a shard
split and writes the report with its plots; `compare_runs` does so for several labelled runs and
writes the papers' tables (`encoders.mpp.tables`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.mpp.collate import MPPCollate
from encoders.mpp.metrics import METRIC_NAMES, all_metrics
from foundation.atomic import write_figure, write_json
from foundation.device import resolve_device
from foundation.errors import DataError

WELL_WINDOWS = ((6, 12), (13, 30))
"""The Well's rollout windows (1-based rollout steps, inclusive): its tables' "6:12" and "13:30",
the slices [5:12] and [12:30] of its validation loop's log-spaced intervals over 30 steps."""


def parse_windows(spec: str | None, steps: int) -> list[tuple[int, int]]:
    """ "1,2-5,6-10" → [(1,1), (2,5), (6,10)] (1-based, inclusive); default: 1, 2–5, 6–K, ..."""
    if not spec:
        bounds, lo = [], 1
        for hi in (1, 5, 10, 20, 50, 100):
            if lo > steps:
                break
            bounds.append((lo, min(hi, steps)))
            lo = min(hi, steps) + 1
        if lo <= steps:
            bounds.append((lo, steps))
        return bounds
    out = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        a, b = int(lo), int(hi or lo)
        if not (1 <= a <= b <= steps):
            raise ValueError(f"time window {part!r} is outside steps 1..{steps}")
        out.append((a, b))
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, batch: dict[str, Any], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-step, rollout) predictions, each (B, K, C, X, Y), for a batch with `future` of K steps."""
    x, future = batch["x"], batch["future"]
    ids, mask, bcs = batch["field_ids"], batch["field_mask"], batch["bcs"]
    history = x.shape[1]
    truth = torch.cat([x, future], dim=1)
    one_step, rollout = [], []
    state = x
    for k in range(steps):
        one_step.append(model(truth[:, k : k + history], ids, mask, bcs))
        nxt = model(state, ids, mask, bcs) if k else one_step[0]
        rollout.append(nxt)
        state = torch.cat([state[:, 1:], nxt[:, None]], dim=1)
    return torch.stack(one_step, 1), torch.stack(rollout, 1)


@dataclass
class KnownFieldsCollate:
    """Evaluation collate that leaves out the windows with fields outside the model's vocabulary,
    counting them per data set: one shard set of many systems scores each run on the systems it
    can read (a model pretrained without a system's fields cannot predict them)."""

    collate: MPPCollate
    skipped: dict[str, int] = field(default_factory=dict)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any] | None:
        known = set(self.collate.fields)
        keep = [s for s in samples if set(s["meta"]["field_names"]) <= known]
        for s in samples:
            if not set(s["meta"]["field_names"]) <= known:
                name = str(s["meta"].get("dataset", ""))
                self.skipped[name] = self.skipped.get(name, 0) + 1
        return self.collate(keep) if keep else None


def window_name(a: int, b: int) -> str:
    return f"{a}-{b}" if a != b else str(a)


class _Accumulator:
    """Per (mode, metric, dataset, field): the sum and count of per-sample values at each step."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str, str, str], np.ndarray] = {}

    def add(
        self, mode: str, pred: torch.Tensor, truth: torch.Tensor, batch: dict[str, Any], names: list[str]
    ) -> None:
        mask = batch["field_mask"].cpu().numpy()
        datasets = np.asarray(batch["dataset"])
        for metric, values in all_metrics(pred.float(), truth.float()).items():
            per_sample = values.double().cpu().numpy()  # (B, K, C)
            for dataset in dict.fromkeys(batch["dataset"]):
                rows = per_sample[datasets == dataset]
                present = mask[datasets == dataset]
                for j, name in enumerate(names):
                    chosen = rows[present[:, j], :, j]  # (n, K)
                    if not len(chosen):
                        continue
                    acc = self.sums.setdefault((mode, metric, dataset, name), np.zeros((2, chosen.shape[1])))
                    acc[0] += chosen.sum(0)
                    acc[1] += len(chosen)

    def _mean(self, keys: list[tuple], lo: int = 0, hi: int | None = None) -> float:
        """Mean over every sample, field and step (0-based, [lo, hi)) that `keys` hold."""
        total = sum((self.sums[k][:, lo:hi].sum(1) for k in keys), np.zeros(2))
        return float(total[0] / total[1]) if total[1] else float("nan")

    def _summary(self, keys: list[tuple], steps: int, windows: Sequence[tuple[int, int]]) -> dict[str, Any]:
        fields = sorted({k[3] for k in keys})
        by_field = {f: [k for k in keys if k[3] == f] for f in fields}
        return {
            "mean": self._mean(keys),
            "step_1": self._mean(keys, 0, 1),
            "per_field": {f: self._mean(ks) for f, ks in by_field.items()},
            "per_step": [self._mean(keys, s, s + 1) for s in range(steps)],
            "per_step_field": {
                f: [self._mean(ks, s, s + 1) for s in range(steps)] for f, ks in by_field.items()
            },
            "windows": {
                window_name(a, b): {
                    "mean": self._mean(keys, a - 1, b),
                    **{f: self._mean(ks, a - 1, b) for f, ks in by_field.items()},
                }
                for a, b in windows
            },
            "well_windows": {
                f"{a}:{b}": self._mean(keys, a - 1, b) if b <= steps else None for a, b in WELL_WINDOWS
            },
        }

    def table(self, steps: int, windows: Sequence[tuple[int, int]]) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for mode in sorted({key[0] for key in self.sums}):
            report[mode] = {}
            for metric in METRIC_NAMES:
                keys = [k for k in self.sums if k[0] == mode and k[1] == metric]
                summary = self._summary(keys, steps, windows)
                summary["per_dataset"] = {
                    d: self._summary([k for k in keys if k[2] == d], steps, windows)
                    for d in sorted({k[2] for k in keys})
                }
                report[mode][metric] = summary
        return report


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any] | None],
    steps: int,
    windows: Sequence[tuple[int, int]],
    progress: Any = None,
    keep_example: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Score every batch; returns (report, one example for plotting or None)."""
    acc = _Accumulator()
    example = None
    samples = 0
    for batch in batches:
        if batch is None:  # every window of it was left out (see KnownFieldsCollate)
            continue
        names = [model.fields[i] for i in batch["field_ids"].tolist()]
        one_step, rollout = predict(model, batch, steps)
        truth = batch["future"][:, :steps]
        persistence = batch["x"][:, -1:].expand_as(truth)
        acc.add("one_step", one_step, truth, batch, names)
        acc.add("rollout", rollout, truth, batch, names)
        acc.add("persistence", persistence, truth, batch, names)
        if keep_example and example is None:
            present = [j for j in range(len(names)) if bool(batch["field_mask"][0, j])]
            example = {
                "key": batch["__key__"][0],
                "dataset": batch["dataset"][0],
                "fields": [names[j] for j in present],
                "truth": truth[0][:, present].float().cpu().numpy(),
                "rollout": rollout[0][:, present].float().cpu().numpy(),
            }
        samples += len(batch["__key__"])
        if progress is not None:
            progress.update(len(batch["__key__"]))
    report = acc.table(steps, windows)
    report["samples"] = samples
    return report, example


def plot_frames(example: dict[str, Any], path: str | Path) -> None:
    """Truth / rollout prediction / error for each field at the first, middle and last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth, pred = example["truth"], example["rollout"]
    steps = truth.shape[0]
    chosen = sorted({0, steps // 2, steps - 1})
    fields = example["fields"]
    fig, axes = plt.subplots(
        len(fields), 3 * len(chosen), figsize=(2.0 * 3 * len(chosen), 2.0 * len(fields)), squeeze=False
    )
    for i, name in enumerate(fields):
        lo, hi = float(truth[:, i].min()), float(truth[:, i].max())
        err_max = float(np.abs(pred[:, i] - truth[:, i]).max()) or 1.0
        for c, k in enumerate(chosen):
            panels = (
                (truth[k, i], f"truth t+{k + 1}", "viridis", lo, hi),
                (pred[k, i], f"pred t+{k + 1}", "viridis", lo, hi),
                (pred[k, i] - truth[k, i], f"error t+{k + 1}", "RdBu_r", -err_max, err_max),
            )
            for p, (img, title, cmap, vmin, vmax) in enumerate(panels):
                ax = axes[i, 3 * c + p]
                ax.imshow(img.T, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
                ax.set_title(f"{name}: {title}", fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f"{example['dataset']} — {example['key']} (autoregressive rollout)", fontsize=9)
    fig.tight_layout()
    write_figure(path, fig, dpi=90)


def plot_error_curve(report: dict[str, Any], path: str | Path, metric: str = "vrmse") -> None:
    """Error vs rollout step per field (solid: model rollout, dotted: one-step, dashed: persistence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"rollout": "-", "one_step": ":", "persistence": "--"}
    colors: dict[str, Any] = {}
    for mode, style in styles.items():
        if mode not in report:
            continue
        for name, values in report[mode][metric]["per_step_field"].items():
            steps = np.arange(1, len(values) + 1)
            line = ax.plot(steps, values, style, color=colors.get(name), label=f"{name} ({mode})")[0]
            colors.setdefault(name, line.get_color())
    ax.set_xlabel("rollout step")
    ax.set_ylabel(metric.upper())
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    write_figure(path, fig, dpi=100)


def rollout_report(
    checkpoint: str | Path,
    data: str | Path,
    steps: int,
    out: str | Path,
    split: str = "test",
    batch_size: int = 8,
    windows: str | None = None,
    max_samples: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `checkpoint` on `split` of the shard set `data` over `steps` autoregressive steps;
    write rollout.json, frames.png and error_vs_step.png under `out`; return the report."""
    from tqdm import tqdm

    from foundation.config import config_hash
    from foundation.data import ShardDataset
    from foundation.train import load_pretrained

    if steps < 1:
        raise DataError(f"--steps must be >= 1, got {steps}")
    dev = resolve_device(device)
    model, cfg, family = load_pretrained(checkpoint, map_location=dev)
    if family.name != "mpp":
        raise DataError(
            f"{checkpoint} is a {family.name!r} model; `evaluate rollout` needs an MPP checkpoint"
        )
    try:
        spans = parse_windows(windows, steps)
    except ValueError as exc:
        raise DataError(f"--windows: {exc}") from None
    collate = KnownFieldsCollate(
        MPPCollate(list(model.fields), model.cfg.history, steps, False, model.cfg.loss, model.cfg.patch_size)
    )
    dataset = ShardDataset.in_order(data, split, batch_size, collate)  # all of it, even under torchrun
    total = dataset.manifest.split(split).samples
    batches: Iterator[dict[str, Any] | None] = iter(dataset)
    if max_samples is not None:
        total = min(total, max_samples)
        batches = itertools.islice(batches, (max_samples + batch_size - 1) // batch_size)
    moved = (
        {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} if batch else None
        for batch in batches
    )
    with tqdm(total=total, desc="evaluate rollout", unit="window", disable=not progress) as bar:
        report, example = evaluate(model, moved, steps, spans, progress=bar)
    if not report["samples"]:
        raise DataError(
            f"no window of split {split!r} in {data} has only fields that {checkpoint} knows "
            f"({', '.join(model.fields)}); evaluate it on data of the systems it was trained on"
        )
    report = {
        "checkpoint": str(checkpoint),
        "config_hash": config_hash(cfg),
        "data": str(data),
        "split": split,
        "steps": steps,
        "skipped_unknown_fields": dict(collate.skipped),
        **report,
    }
    out = Path(out)
    write_json(out / "rollout.json", report, indent=1, allow_nan=True)
    if example is not None:
        plot_frames(example, out / "frames.png")
    plot_error_curve(report, out / "error_vs_step.png")
    return report


def parse_runs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """["pretrained=runs/a", "runs/b"] → [("pretrained", "runs/a"), ("b", "runs/b")]: LABEL=RUN, or a
    bare RUN labelled by its folder name; labels must be distinct folder-safe names."""
    runs = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or "/" in label or not label:
            label, path = Path(spec.rstrip("/")).name, spec
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", label):
            raise DataError(
                f"--checkpoint {spec!r}: label {label!r} must be letters, digits, _ . + - (LABEL=RUN)"
            )
        runs.append((label, path))
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise DataError(f"--checkpoint labels repeat ({', '.join(labels)}); give each run its own LABEL=RUN")
    return runs


def compare_runs(
    runs: Sequence[tuple[str, str]],
    data: str | Path,
    steps: int,
    out: str | Path,
    tables: str | Path | None = None,
    command: str = "",
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """`rollout_report` for each (label, checkpoint) on the same data — into `out` for one run,
    `out/<label>` for several — then, when `tables` is given, the papers' tables over all of them
    (`encoders.mpp.tables.write_tables`). Returns the reports by label."""
    from encoders.mpp.tables import write_tables

    out = Path(out)
    reports = {}
    for label, checkpoint in runs:
        folder = out / label if len(runs) > 1 else out
        reports[label] = rollout_report(checkpoint, data, steps, folder, **options)
    if tables is not None:
        write_tables(tables, reports, command=command)
    return reports
