"""MPP jobs: `synth mpp` (built-in PDE data in The Well's format), `prepare mpp` (Well / PDEBench
HDF5 → shards) and `evaluate rollout` (one-step and autoregressive errors of a checkpoint)."""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

from foundation.cli import Command, add_progress_argument, progress_enabled
from foundation.errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


# ----------------------------------------------------------------------------- synth


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="Output root: one Well data set folder per system.")
    parser.add_argument(
        "--systems",
        default="navier_stokes,diffusion_reaction,shallow_water,gray_scott,burgers",
        help="Comma-separated: navier_stokes, diffusion_reaction, shallow_water, gray_scott, burgers.",
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


def _synth_run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from encoders.mpp.solvers import SYSTEMS
    from encoders.mpp.well import compute_stats, write_simulation, write_stats

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise DataError(f"unknown system(s) {unknown or systems}; choose from {', '.join(SYSTEMS)}")
    try:
        counts = [int(v) for v in args.trajectories.split(",")]
    except ValueError:
        counts = []
    if len(counts) != 3 or min(counts) < 0 or counts[0] < 1:
        raise DataError(
            f"--trajectories must be three counts train,valid,test (train >= 1), got {args.trajectories!r}"
        )
    out = Path(args.out)
    for system in systems:
        if (out / system).exists():
            raise DataError(f"{out / system} already exists; refusing to overwrite it (choose another --out)")
    bar = tqdm(
        total=len(systems) * 3, desc="synth mpp", unit="file", disable=not progress_enabled(args.progress)
    )
    for system in systems:
        root = out / system
        written = []
        for split_index, (split, n_traj) in enumerate(zip(SPLIT_NAMES, counts, strict=True)):
            bar.update(1)
            if n_traj == 0:
                continue
            seed = np.random.SeedSequence([args.seed, zlib.crc32(system.encode()), split_index])
            sim = SYSTEMS[system](np.random.default_rng(seed), n_traj, args.resolution, args.steps)
            written.append(write_simulation(sim, root / "data" / split / f"{system}_{split}.hdf5"))
        write_stats(compute_stats([p for p in written if p.parent.name == "train"]), root / "stats.yaml")
    bar.close()
    print(f"wrote {len(systems)} Well data set(s) under {out}: {', '.join(systems)}")
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
    parser.add_argument(
        "--split-fractions",
        default="train=0.8,valid=0.1,test=0.1",
        help="For files outside train/valid/test folders: trajectory fractions per split.",
    )
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--max-windows-per-trajectory", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="Salt of the trajectory-to-split hash.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing shard set at --out.")
    parser.add_argument(
        "--allow-degenerate",
        action="store_true",
        help="Write fields that come out all zeros, constant or mostly non-finite (docs/shards.md).",
    )
    add_progress_argument(parser)


def _parse_fractions(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise DataError(f"--split-fractions: {part!r} is not NAME=FRACTION") from None
        if not sep or not name.strip():
            raise DataError(f"--split-fractions: {part!r} is not NAME=FRACTION")
    return out


_PREPARE_OPTIONS = ("window", "stride", "resolution", "split_fractions", "max_windows_per_trajectory", "seed")


def _prepare_run(args: argparse.Namespace) -> int:
    from encoders.mpp.prepare import PrepareOptions, prepare
    from foundation.data import Manifest
    from foundation.data.summary import format_field_summary

    options = PrepareOptions(
        history=args.history,
        window=args.window,
        stride=args.stride,
        resolution=args.resolution,
        split_fractions=_parse_fractions(args.split_fractions),
        samples_per_shard=args.samples_per_shard,
        max_windows_per_trajectory=args.max_windows_per_trajectory,
        seed=args.seed,
        overwrite=args.overwrite,
        allow_degenerate=args.allow_degenerate,
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
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k in _PREPARE_OPTIONS and v is not None
        ]
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
    print(format_field_summary(Manifest.load(args.out)))
    print(f"wrote shard set {args.out}")
    return 0


# ----------------------------------------------------------------------------- evaluate rollout


def _rollout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Run dir, step-N checkpoint or model.pt.")
    parser.add_argument("--data", required=True, help="Shard set (windows of >= history + steps).")
    parser.add_argument("--steps", type=int, required=True, help="Autoregressive steps K.")
    parser.add_argument(
        "--out", required=True, help="Report folder: rollout.json, frames.png, error_vs_step.png."
    )
    parser.add_argument("--split", default="test", help="Split to evaluate.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--windows", default=None, help="Step windows, e.g. 1,2-5,6-10 (default 1, 2-5, 6-10, ...)."
    )
    parser.add_argument("--max-samples", type=int, default=None, help="Evaluate at most this many windows.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    add_progress_argument(parser)


def rollout_report(
    checkpoint: str,
    data: str,
    steps: int,
    out: str | Path,
    split: str = "test",
    batch_size: int = 8,
    windows: str | None = None,
    max_samples: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Evaluate and write rollout.json + PNGs under `out`; returns the report."""
    import itertools

    import torch
    from tqdm import tqdm

    from encoders.mpp.family import MPPCollate
    from encoders.mpp.rollout import evaluate, parse_windows, plot_error_curve, plot_frames
    from foundation.data import ShardDataset
    from foundation.train import load_pretrained

    if steps < 1:
        raise DataError(f"--steps must be >= 1, got {steps}")
    model, cfg, family = load_pretrained(checkpoint, map_location=device)
    if family.name != "mpp":
        raise DataError(
            f"{checkpoint} is a {family.name!r} model; `evaluate rollout` needs an MPP checkpoint"
        )
    try:
        spans = parse_windows(windows, steps)
    except ValueError as exc:
        raise DataError(f"--windows: {exc}") from None
    collate = MPPCollate(
        list(model.fields), model.cfg.history, steps, False, model.cfg.loss, model.cfg.patch_size
    )
    dataset = ShardDataset(
        data, split=split, batch_size=batch_size, shuffle=False, epochs=1, drop_last=False, collate_fn=collate
    )
    total = dataset.manifest.split(split).samples
    if max_samples is not None:
        total = min(total, max_samples)
    batches = iter(dataset)
    if max_samples is not None:
        batches = itertools.islice(batches, (max_samples + batch_size - 1) // batch_size)
    dev = torch.device(device)

    def moved():
        for batch in batches:
            yield {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    bar = tqdm(total=total, desc="evaluate rollout", unit="window", disable=not progress)
    report, example = evaluate(model, moved(), steps, spans, progress=bar)
    bar.close()
    report = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "steps": steps, **report}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rollout.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, out / "rollout.json")
    if example is not None:
        plot_frames(example, out / "frames.png")
    plot_error_curve(report, out / "error_vs_step.png")
    return report


def _rollout_run(args: argparse.Namespace) -> int:
    report = rollout_report(
        args.checkpoint,
        args.data,
        args.steps,
        args.out,
        split=args.split,
        batch_size=args.batch_size,
        windows=args.windows,
        max_samples=args.max_samples,
        device=args.device,
        progress=progress_enabled(args.progress),
    )
    print(f"{report['samples']} windows from split {args.split!r}, {args.steps} steps")
    print(f"{'':14s}{'VRMSE step 1':>14s}{'VRMSE 1..K':>12s}{'NRMSE step 1':>14s}")
    for mode in ("one_step", "rollout", "persistence"):
        v, n = report[mode]["vrmse"], report[mode]["nrmse"]
        print(f"{mode:14s}{v['per_step'][0]:14.4f}{v['mean']:12.4f}{n['per_step'][0]:14.4f}")
    print(f"report: {Path(args.out) / 'rollout.json'}")
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
        "One-step and autoregressive K-step NRMSE/VRMSE of an MPP checkpoint, with plots.",
        _rollout_arguments,
        _rollout_run,
    ),
]
