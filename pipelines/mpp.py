"""MPP jobs: `synth mpp` (built-in PDE data in The Well's format), `prepare mpp` (Well / PDEBench
HDF5 → shards) and `evaluate rollout` (one-step and autoregressive errors of a checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from foundation.cli import (
    Command,
    add_part_argument,
    add_progress_argument,
    add_shard_output_arguments,
    add_workers_argument,
    progress_enabled,
)
from foundation.errors import DataError

# ----------------------------------------------------------------------------- synth


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="Output root: one Well data set folder per system.")
    parser.add_argument(
        "--systems",
        default="all",
        help="Comma-separated, or all (the default): navier_stokes, diffusion_reaction, shallow_water, "
        "gray_scott, burgers, compressible_ns_m1, compressible_ns_m01.",
    )
    parser.add_argument("--resolution", type=int, default=64, help="Grid points per side.")
    parser.add_argument("--steps", type=int, default=50, help="Saved time steps per trajectory.")
    parser.add_argument(
        "--trajectories",
        default="16,4,4",
        help="Trajectories in train,valid,test (PDE parameters drawn per trajectory).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for initial conditions and parameters.")
    add_progress_argument(parser)


def _trajectory_counts(text: str) -> list[int]:
    """`--trajectories train,valid,test` as three integers."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        counts = []
    if len(counts) != 3:
        raise DataError(f"--trajectories must be three counts train,valid,test (train >= 1), got {text!r}")
    return counts


def _synth_run(args: argparse.Namespace) -> int:
    from encoders.mpp.solvers import SYSTEMS
    from encoders.mpp.synth import write_datasets

    if args.systems.strip() == "all":
        systems = list(SYSTEMS)
    else:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    write_datasets(
        args.out,
        systems,
        _trajectory_counts(args.trajectories),
        resolution=args.resolution,
        steps=args.steps,
        seed=args.seed,
        progress=progress_enabled(args.progress),
    )
    print(f"wrote {len(systems)} Well data set(s) under {Path(args.out)}: {', '.join(systems)}")
    return 0


# ----------------------------------------------------------------------------- prepare


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="Well base folders (<base>/datasets/<name>/data/<split>/), data set folders, folders of "
        "HDF5 files, or HDF5 files; data sets MPP cannot use are skipped with the reason.",
    )
    parser.add_argument("--out", required=True, help="Shard set directory to create.")
    parser.add_argument("--history", type=int, default=4, help="Input steps the model will see (paper: 16).")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="Steps stored per sample (default history+1; >= history+K for rollouts).",
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="Steps between window starts (default: --window)."
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Block-average every source to N x N (must divide its size).",
    )
    parser.add_argument("--max-windows-per-trajectory", type=int, default=None)
    add_shard_output_arguments(
        parser,
        split_default="train=0.8,valid=0.1,test=0.1",
        split_help="For files outside train/valid/test folders: trajectory fractions per split.",
        samples_per_shard=256,
        seed_help="Salt of the trajectory-to-split hash.",
    )
    add_workers_argument(parser)
    add_part_argument(parser)
    add_progress_argument(parser)


_PREPARE_OPTIONS = ("window", "stride", "resolution", "split_fractions", "max_windows_per_trajectory", "seed")


def _option_text(value: object) -> str:
    """An option's value as it is written on the command line (split fractions as NAME=FRACTION,...)."""
    if isinstance(value, dict):
        return ",".join(f"{name}={fraction}" for name, fraction in value.items())
    return str(value)


def _prepare_run(args: argparse.Namespace) -> int:
    from encoders.mpp.prepare import PrepareOptions, prepare
    from foundation.data.remote import load_manifest
    from foundation.data.summary import format_field_summary

    options = PrepareOptions(
        history=args.history,
        window=args.window,
        stride=args.stride,
        resolution=args.resolution,
        split_fractions=args.split_fractions,
        samples_per_shard=args.samples_per_shard,
        max_windows_per_trajectory=args.max_windows_per_trajectory,
        seed=args.seed,
        overwrite=args.overwrite,
        allow_degenerate=args.allow_degenerate,
        workers=args.workers,
        part=args.part,
    )
    command = " ".join(
        [
            "foundation prepare mpp",
            *map(str, args.inputs),
            "--out",
            str(args.out),
            "--history",
            str(args.history),
        ]
        + [
            f"--{k.replace('_', '-')} {_option_text(v)}"
            for k, v in vars(args).items()
            if k in _PREPARE_OPTIONS and v is not None
        ]
        + ([f"--part {args.part[0]}/{args.part[1]}"] if args.part else [])
    )
    summary = prepare(
        args.inputs, args.out, options, command=command, progress=progress_enabled(args.progress)
    )
    for name, counts in summary.samples.items():
        print(f"{name}: " + ", ".join(f"{split} {n}" for split, n in sorted(counts.items())))
    for name, reason in summary.skipped.items():
        print(f"skipped {name}: {reason}")
    if summary.short_files:
        print(f"skipped {len(summary.short_files)} file(s) with fewer steps than the window")
    print(format_field_summary(load_manifest(args.out)))
    print(f"wrote shard set {args.out}")
    return 0


# ----------------------------------------------------------------------------- evaluate rollout


def _rollout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        metavar="[LABEL=]RUN",
        help="Run dir, step-N checkpoint or model.pt; several as LABEL=RUN (e.g. pretrained=runs/a "
        "scratch=runs/b finetuned=runs/c) are compared on the same data.",
    )
    parser.add_argument("--data", required=True, help="Shard set (windows of >= history + steps).")
    parser.add_argument(
        "--steps", type=int, required=True, help="Autoregressive steps K (30 for The Well's windows)."
    )
    parser.add_argument(
        "--out",
        required=True,
        help="Report folder: rollout.json, frames.png, error_vs_step.png (a LABEL subfolder per run "
        "when several are given).",
    )
    parser.add_argument(
        "--tables",
        default=None,
        metavar="DIR",
        help="Also write the papers' tables here: mpp_one_step_nrmse, well_one_step_vrmse, "
        "well_rollout_vrmse (.table.json) and rollout_vrmse_vs_step.png.",
    )
    parser.add_argument("--split", default="test", help="Split to evaluate.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--windows", default=None, help="Step windows, e.g. 1,2-5,6-10 (default 1, 2-5, 6-10, ...)."
    )
    parser.add_argument("--max-samples", type=int, default=None, help="Evaluate at most this many windows.")
    parser.add_argument("--device", default="cpu", help="auto (CUDA when available), cpu, cuda or cuda:N.")
    add_progress_argument(parser)


def _rollout_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this evaluation (recorded in the tables' provenance)."""
    parts = ["foundation evaluate rollout --checkpoint", *args.checkpoint]
    parts += ["--data", str(args.data), "--steps", str(args.steps), "--out", str(args.out)]
    parts += ["--split", args.split, "--batch-size", str(args.batch_size)]
    for flag, value in (
        ("--tables", args.tables),
        ("--windows", args.windows),
        ("--max-samples", args.max_samples),
    ):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(parts)


def _rollout_run(args: argparse.Namespace) -> int:
    from encoders.mpp.evaluate import compare_runs, parse_runs

    reports = compare_runs(
        parse_runs(args.checkpoint),
        args.data,
        args.steps,
        args.out,
        tables=args.tables,
        command=_rollout_command(args),
        split=args.split,
        batch_size=args.batch_size,
        windows=args.windows,
        max_samples=args.max_samples,
        device=args.device,
        progress=progress_enabled(args.progress),
    )
    for label, report in reports.items():
        print(f"{label}: {report['samples']} windows from split {args.split!r}, {args.steps} steps")
        print(f"{'':14s}{'VRMSE step 1':>14s}{'VRMSE 1..K':>12s}{'NRMSE step 1':>14s}")
        for mode in ("one_step", "rollout", "persistence"):
            v, n = report[mode]["vrmse"], report[mode]["nrmse"]
            print(f"{mode:14s}{v['per_step'][0]:14.4f}{v['mean']:12.4f}{n['per_step'][0]:14.4f}")
    folders = [Path(args.out)] if len(reports) == 1 else [Path(args.out) / label for label in reports]
    print("reports: " + ", ".join(str(f / "rollout.json") for f in folders))
    if args.tables is not None:
        print(f"tables: {Path(args.tables)} (mpp_one_step_nrmse, well_one_step_vrmse, well_rollout_vrmse)")
    return 0


COMMANDS = [
    Command(
        ("synth", "mpp"),
        "Write built-in PDE trajectories (NS, diffusion-reaction, SWE, ...) as Well HDF5.",
        _synth_arguments,
        _synth_run,
    ),
    Command(
        ("prepare", "mpp"),
        "Convert The Well / PDEBench HDF5 files into MPP shards.",
        _prepare_arguments,
        _prepare_run,
    ),
    Command(
        ("evaluate", "rollout"),
        "One-step and rollout errors (The Well's metrics) of MPP runs, with plots and the papers' tables.",
        _rollout_arguments,
        _rollout_run,
    ),
]
