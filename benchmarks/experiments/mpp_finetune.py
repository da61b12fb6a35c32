"""Does multiple-physics pretraining help on a held-out system? (tiny scale, CPU)

Runs the real pipeline end to end, in this process, through the CLI entry points:
  1. `foundation synth mpp`   — 5 built-in systems in The Well's format (32×32);
  2. `foundation prepare mpp` — pretraining shards from 4 systems, fine-tuning shards from the
     held-out one (Gray–Scott by default: its fields A and B are unseen, so fine-tuning adds
     embedding slots);
  3. `foundation pretrain`    — for each seed: pretrain on the 4 systems; fine-tune the pretrained
     model on the held-out system (`model.init_from`); train the same model from scratch on the
     held-out system with the same steps and optimiser;
  4. `foundation evaluate rollout` — test-split VRMSE of the held-out system: one step, and the
     mean over a 5-step autoregressive rollout; persistence (repeat the last input) as a floor.
Prints mean ± std over seeds and writes all numbers to <out>/results.json.

    python benchmarks/experiments/mpp_finetune.py --out /tmp/mpp-exp          # full run
    python benchmarks/experiments/mpp_finetune.py --out /tmp/mpp-smoke --quick  # minutes → seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

PRETRAIN_SYSTEMS = ["navier_stokes", "shallow_water", "diffusion_reaction", "burgers"]


def _cli(*argv: str) -> None:
    from foundation.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"command failed ({code}): foundation {' '.join(map(str, argv))}")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.embed_dim={args.embed_dim}",
        f"model.num_heads={args.heads}",
        f"model.depth={args.depth}",
        "model.patch_size=8",
        f"model.history={args.history}",
        "model.layer_scale_init=0.1",
        f"model.loss={args.loss}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        "train.ckpt_every=0",
        "train.val_every=0",
        "train.log_every=50",
        "optim.weight_decay=0.001",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--held-out", default="gray_scott")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument(
        "--finetune-trajectories", type=int, default=6, help="Training trajectories of the held-out system."
    )
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--history", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loss", default="vmse", choices=("nmse", "vmse"))
    parser.add_argument("--rollout", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="Tiny smoke run (a few steps) to check the wiring."
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.seeds = 20, 10, 2

    import torch

    torch.set_num_threads(1)  # one core per job: on a shared machine more threads stall on barriers
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; choose a new --out")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.process_time()
        timings[name] = timings.get(name, 0.0) + now - since
        return now

    t = time.process_time()
    well = out / "well"
    window = args.history + args.rollout + 1
    # Seed 0 for the pretraining systems, 1 for the held-out one; trajectories are train,valid,test.
    synth = [(",".join(PRETRAIN_SYSTEMS), "8,2,2"), (args.held_out, f"{args.finetune_trajectories},2,4")]
    for seed, (systems, trajectories) in enumerate(synth):
        options = ["--systems", systems, "--trajectories", trajectories, "--seed", seed]
        _cli("synth", "mpp", "--out", well, "--resolution", 32, "--steps", 40, *options)
    t = lap("synth", t)
    pre_shards, ft_shards = out / "shards-pretrain", out / "shards-heldout"
    prep = ["--history", args.history, "--window", window, "--stride", 3]
    _cli("prepare", "mpp", *[well / s for s in PRETRAIN_SYSTEMS], "--out", pre_shards, *prep)
    _cli("prepare", "mpp", well / args.held_out, "--out", ft_shards, *prep)
    t = lap("prepare", t)

    base = ["configs/mpp/tiny.yaml", *_train_overrides(args)]
    root = Path(__file__).resolve().parents[2]
    base[0] = str(root / base[0])
    results: dict[str, list[dict]] = {"pretrained+finetuned": [], "scratch": [], "persistence": []}
    for seed in range(args.seeds):
        pre_run, ft_run, scratch_run = (
            out / f"pretrain-s{seed}",
            out / f"finetune-s{seed}",
            out / f"scratch-s{seed}",
        )
        _cli(
            "pretrain",
            *base,
            f"data.path={pre_shards}",
            f"run.dir={pre_run}",
            f"run.seed={seed}",
            f"train.steps={args.pretrain_steps}",
            "optim.lr=1e-3",
            "optim.warmup_steps=50",
        )
        t = lap("pretrain", t)
        ft_common = [
            f"data.path={ft_shards}",
            f"run.seed={seed}",
            f"train.steps={args.finetune_steps}",
            "optim.lr=5e-4",
            "optim.warmup_steps=20",
        ]
        _cli("pretrain", *base, *ft_common, f"run.dir={ft_run}", f"model.init_from={pre_run}")
        t = lap("finetune", t)
        _cli("pretrain", *base, *ft_common, f"run.dir={scratch_run}")
        t = lap("scratch", t)
        for label, run in (("pretrained+finetuned", ft_run), ("scratch", scratch_run)):
            _cli(
                "evaluate",
                "rollout",
                "--checkpoint",
                run,
                "--data",
                ft_shards,
                "--steps",
                args.rollout,
                "--split",
                "test",
                "--out",
                out / f"eval-{run.name}",
                "--batch-size",
                8,
            )
            report = json.loads((out / f"eval-{run.name}" / "rollout.json").read_text())
            results[label].append(_summary(report["rollout"], report["one_step"]))
            if label == "scratch":
                results["persistence"].append(_summary(report["persistence"], report["persistence"]))
        t = lap("evaluate", t)

    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    table = _table(results, args)
    print(table)
    print(
        f"\nCPU time {cpu / 60:.1f} min (wall {wall / 60:.1f} min on a shared machine); by stage: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    )
    record = {
        "args": vars(args),
        "results": results,
        "cpu_s": cpu,
        "wall_s": wall,
        "cpu_by_stage_s": timings,
        "table": table,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {out / 'results.json'}")


def _summary(rollout: dict, one_step: dict) -> dict:
    v = rollout["vrmse"]
    return {
        "vrmse_one_step": one_step["vrmse"]["per_step"][0],
        "vrmse_rollout_mean": v["mean"],
        "vrmse_rollout_last": v["per_step"][-1],
        "vrmse_rollout_per_field": v["per_field"],
    }


def _table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    def stat(rows: list[dict], key: str) -> str:
        values = [r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    lines = [
        f"Held-out system: {args.held_out} ({args.finetune_trajectories} training trajectories, 32x32); "
        f"pretrained on {', '.join(PRETRAIN_SYSTEMS)} for {args.pretrain_steps} steps; fine-tune/scratch "
        f"{args.finetune_steps} steps; AViT {args.embed_dim}/{args.heads}/{args.depth}, "
        f"history {args.history}, "
        f"loss {args.loss}; test-split VRMSE, mean ± std over {args.seeds} seeds",
        "",
        f"| model | VRMSE one-step | VRMSE {args.rollout}-step rollout (mean of steps 1..{args.rollout}) "
        f"| VRMSE at step {args.rollout} |",
        "|---|---|---|---|",
    ]
    for label, rows in results.items():
        lines.append(
            f"| {label} | {stat(rows, 'vrmse_one_step')} | {stat(rows, 'vrmse_rollout_mean')} "
            f"| {stat(rows, 'vrmse_rollout_last')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
