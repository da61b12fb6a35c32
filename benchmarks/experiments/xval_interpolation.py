"""Out-of-distribution interpolation: xVal vs P10 vs FP15 (the paper's continuity claim).

The training data's target `p` takes only a few gapped values ({0.2, 0.3, 0.5, 0.8} by
default) and is observable through six noisy measurements `p·(1 + 0.02ε)` in the same record;
the test split puts `p`
on a dense grid over [0.2, 0.8] (`foundation synth xval --task interpolation`). Each encoding
is pretrained with the same config (configs/xval/interpolation.yaml; only `model.encoding`
differs) through the real pipeline — synth -> shards -> `foundation pretrain` ->
`foundation evaluate xval --fields p` — and scored here from the evaluation's predictions.csv.
The data are normalised with `--spread` (0.25 by default) and trained `--steps` (300); `--set
KEY=VALUE` changes the config of every training and `--tag=-NAME` names the runs, so settings can
be compared in one folder:

* OoD MSE: over test records whose p is not a training value (18 of the 21 grid points);
  in-distribution MSE: over those whose p is one (0.2, 0.5, 0.8 lie on the grid);
* unseen-value rate: share of the OoD predictions farther than `--tolerance` from every
  training value;
* snapped: OoD grid points whose median prediction lies within the tolerance of a training
  value (a model that only memorised the training values snaps them all);
* unparseable: predictions of the text baselines that do not spell a number.

Runs two trainings at a time, each on one thread (tiny models gain nothing from more), and
reports CPU seconds as well as wall time because the machine may be shared.

    python benchmarks/experiments/xval_interpolation.py --out runs/xval-interp-exp
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "xval" / "interpolation.yaml"
TRAIN_VALUES = (0.2, 0.3, 0.5, 0.8)


def foundation(*args: str, log: Path) -> float:
    """Run `foundation ARGS` on one thread; returns its CPU seconds (user + system)."""
    exe = shutil.which("foundation", path=str(Path(sys.executable).parent)) or "foundation"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("a") as handle:
        proc = subprocess.Popen([exe, *args], stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"`foundation {' '.join(args)}` failed; see {log}")
    return usage.ru_utime + usage.ru_stime


def score(predictions: Path, train_values: tuple[float, ...], tolerance: float) -> dict[str, float]:
    rows = [r for r in csv.DictReader(predictions.open()) if r["field"] == "p"]
    true = np.array([float(r["true"]) for r in rows])
    pred = np.array([float(r["predicted"]) for r in rows])
    seen = np.asarray(train_values)
    parsed = np.isfinite(pred)
    ood = np.min(np.abs(true[:, None] - seen[None, :]), axis=1) > 1e-9
    distance = np.min(np.abs(pred[parsed & ood, None] - seen[None, :]), axis=1)
    grid = np.unique(true[ood])
    snapped = 0
    for g in grid:
        sel = (true == g) & parsed
        if sel.any():
            median = np.median(pred[sel])
            snapped += int(np.min(np.abs(median - seen)) <= tolerance)
    return {
        "ood_mse": float(np.mean((pred[parsed & ood] - true[parsed & ood]) ** 2)),
        "in_distribution_mse": float(np.mean((pred[parsed & ~ood] - true[parsed & ~ood]) ** 2)),
        "unseen_rate": float(np.mean(distance > tolerance)),
        "snapped": snapped,
        "ood_grid": len(grid),
        "grid": len(np.unique(true)),
        "unparseable": float(1 - parsed.mean()),
        "n": len(true),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/xval-interp-exp")
    parser.add_argument("--encodings", default="xval,p10,fp15")
    parser.add_argument("--samples", type=int, default=6000, help="Gapped train+valid records.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tolerance", type=float, default=0.01, help="'Seen' = within this of a training value."
    )
    parser.add_argument("--parallel", type=int, default=2, help="Trainings run at once (one thread each).")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override for every training (repeatable), e.g. model.number_loss_weight=10.",
    )
    parser.add_argument(
        "--spread", type=float, default=0.25, help="Normaliser spread of the data (synth xval --spread)."
    )
    parser.add_argument("--tag", default="", help="Suffix of the run/eval folders and the summary file.")
    parser.add_argument(
        "--rescore", action="store_true", help="Only re-score the predictions of an earlier run in --out."
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    if args.rescore:
        summary = json.loads((out / f"summary{args.tag}.json").read_text())
        summary["results"] = {
            e: score(out / f"eval-{e}{args.tag}" / "predictions.csv", TRAIN_VALUES, args.tolerance)
            for e in encodings
        }
        summary["tolerance"] = args.tolerance
        (out / f"summary{args.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_table(summary, encodings)
        return
    log = out / "log.txt"
    data = out / f"data-spread{args.spread:g}"
    started = time.perf_counter()
    cpu = {}
    if not (data / "shards" / "manifest.json").exists():
        cpu["synth"] = foundation(
            "synth",
            "xval",
            "--task",
            "interpolation",
            "--samples",
            str(args.samples),
            "--out",
            str(data),
            "--seed",
            str(args.seed),
            "--train-values",
            ",".join(map(str, TRAIN_VALUES)),
            "--spread",
            str(args.spread),
            log=log,
        )

    def train_and_evaluate(encoding: str) -> tuple[str, float, float]:
        run = out / f"run-{encoding}{args.tag}"
        t0 = time.perf_counter()
        seconds = foundation(
            "pretrain",
            str(CONFIG),
            f"data.path={data / 'shards'}",
            f"run.dir={run}",
            f"model.encoding={encoding}",
            f"train.steps={args.steps}",
            f"run.seed={args.seed}",
            "train.tensorboard=false",
            *args.set,
            log=out / f"log-{encoding}{args.tag}.txt",
        )
        seconds += foundation(
            "evaluate",
            "xval",
            "--checkpoint",
            str(run),
            "--data",
            str(data / "shards"),
            "--out",
            str(out / f"eval-{encoding}{args.tag}"),
            "--fields",
            "p",
            log=out / f"log-{encoding}{args.tag}.txt",
        )
        return encoding, seconds, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for encoding, seconds, wall in pool.map(train_and_evaluate, encodings):
            cpu[encoding] = seconds
            print(f"{encoding}: trained and evaluated in {wall:.0f} s wall, {seconds:.0f} CPU s", flush=True)
    results = {
        e: score(out / f"eval-{e}{args.tag}" / "predictions.csv", TRAIN_VALUES, args.tolerance)
        for e in encodings
    }
    total_wall = time.perf_counter() - started
    summary = {
        "steps": args.steps,
        "overrides": args.set,
        "spread": args.spread,
        "tolerance": args.tolerance,
        "train_values": TRAIN_VALUES,
        "results": results,
        "cpu_seconds": cpu,
        "wall_seconds": total_wall,
        "load_average": os.getloadavg(),
    }
    (out / f"summary{args.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary, encodings)


def print_table(summary: dict, encodings: list[str]) -> None:
    results, cpu = summary["results"], summary["cpu_seconds"]
    first = results[encodings[0]]
    print()
    print(
        f"p trained on {sorted(summary['train_values'])}, tested on a {first['grid']}-point grid "
        f"({first['ood_grid']} points unseen in training; {first['n']} test records); "
        f"{summary['steps']} steps; "
        f"'unseen' = more than {summary['tolerance']} from every training value"
    )
    print()
    print(
        "| encoding | OoD MSE | in-distribution MSE | OoD predictions of unseen values "
        "| OoD grid medians snapped | unparseable | CPU s |"
    )
    print("|---|---|---|---|---|---|---|")
    for e in encodings:
        r = results[e]
        print(
            f"| {e} | {r['ood_mse']:.2e} | {r['in_distribution_mse']:.2e} | {100 * r['unseen_rate']:.0f}% | "
            f"{r['snapped']}/{r['ood_grid']} | {100 * r['unparseable']:.1f}% | {cpu[e]:.0f} |"
        )
    print()
    print(
        f"total: {summary['wall_seconds'] / 60:.1f} min wall, {sum(cpu.values()) / 60:.1f} CPU min, "
        f"load average {summary['load_average'][0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
