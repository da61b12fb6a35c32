"""Native MPP files → shards: windows of `history + horizon` steps, one trajectory each.

Each shard sample is one window: `fields` (W, C, X, Y) float32 with the source's channels,
`bcs` (2,) int64 boundary codes per axis (WALL 0, OPEN 1, PERIODIC 2) and `meta` (JSON: data
set, field names, PDE parameters, source file, trajectory, first step, times). Files found under
a `train`/`valid`/`test` folder keep that split; other files (PDEBench) are split by whole
trajectories with a hash of (data set, file, trajectory), so no trajectory leaks across splits.
The manifest's `extra["mpp"]` holds the field vocabulary and per-data-set facts; its
`stats["fields"]` holds per-field mean/std/rms over the training windows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.mpp.sources import discover, open_source
from foundation.errors import DataError

DEFAULT_FRACTIONS = {"train": 0.8, "valid": 0.1, "test": 0.1}


@dataclass
class PrepareOptions:
    history: int = 4
    window: int | None = None
    stride: int | None = None
    resolution: int | None = None
    split_fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    samples_per_shard: int = 256
    max_windows_per_trajectory: int | None = None
    seed: int = 0
    overwrite: bool = False
    allow_degenerate: bool = False

    def resolved(self) -> tuple[int, int]:
        window = self.window if self.window is not None else self.history + 1
        if self.history < 1:
            raise DataError(f"--history must be >= 1, got {self.history}")
        if window < self.history + 1:
            raise DataError(f"--window {window} must be >= history + 1 = {self.history + 1}")
        stride = self.stride if self.stride is not None else window
        if stride < 1:
            raise DataError(f"--stride must be >= 1, got {stride}")
        return window, stride


def _key(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(str(p) for p in parts))


def downsample(frames: np.ndarray, resolution: int, where: str) -> np.ndarray:
    """Block-average (T, C, X, Y) to (T, C, resolution, resolution); sizes must divide."""
    _, _, nx, ny = frames.shape
    if (nx, ny) == (resolution, resolution):
        return frames
    if nx % resolution or ny % resolution or nx < resolution or ny < resolution:
        raise DataError(
            f"{where}: grid {nx}x{ny} cannot be block-averaged to {resolution}x{resolution} "
            "(--resolution must divide both sizes)"
        )
    fx, fy = nx // resolution, ny // resolution
    t, c = frames.shape[:2]
    return (
        frames.reshape(t, c, resolution, fx, resolution, fy)
        .mean(axis=(3, 5), dtype=np.float64)
        .astype(np.float32)
    )


class _FieldStats:
    def __init__(self) -> None:
        self.acc: dict[str, list[float]] = {}

    def add(self, names: Sequence[str], frames: np.ndarray) -> None:
        data = frames.astype(np.float64)
        for i, name in enumerate(names):
            ch = data[:, i]
            a = self.acc.setdefault(name, [0.0, 0.0, 0.0])
            a[0] += ch.size
            a[1] += float(ch.sum())
            a[2] += float((ch**2).sum())

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, (n, s1, s2) in sorted(self.acc.items()):
            mean, ms = s1 / n, s2 / n
            out[name] = {
                "mean": mean,
                "std": float(np.sqrt(max(ms - mean**2, 0.0))),
                "rms": float(np.sqrt(ms)),
            }
        return out


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    options: PrepareOptions,
    command: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Write the shard set; returns a summary {data set: {split: windows}}."""
    from tqdm import tqdm

    from foundation.data import ShardSetWriter, split_for_key

    window, stride = options.resolved()
    files = discover(inputs)
    sources = [(open_source(path), split) for path, split in files]
    fractions = options.split_fractions
    vocab = sorted({name for src, _ in sources for name in src.field_names})
    datasets: dict[str, dict[str, Any]] = {}
    stats = _FieldStats()
    shapes: set[tuple[int, int]] = set()
    jobs = []
    for src, split in sources:
        if src.n_steps < window:
            raise DataError(
                f"{src.path}: trajectories have {src.n_steps} steps, fewer than the window of {window} "
                "(lower --history/--window)"
            )
        starts = list(range(0, src.n_steps - window + 1, stride))
        if options.max_windows_per_trajectory:
            starts = starts[: options.max_windows_per_trajectory]
        shape = (options.resolution,) * 2 if options.resolution else tuple(src.shape)
        shapes.add(shape)
        info = datasets.setdefault(
            src.dataset_name,
            {
                "fields": list(src.field_names),
                "bc": list(src.bc),
                "shape": list(shape),
                "samples": {},
                "sources": [],
            },
        )
        if info["fields"] != list(src.field_names):
            raise DataError(
                f"{src.path}: data set {src.dataset_name!r} has fields {src.field_names} here but "
                f"{info['fields']} in another file"
            )
        info["sources"].append(str(src.path))
        for traj in range(src.n_trajectories):
            traj_split = split or split_for_key(
                _key(src.dataset_name, Path(src.path).stem, traj), fractions, salt=str(options.seed)
            )
            jobs.append((src, traj, traj_split, starts))

    if len(shapes) > 1:
        raise DataError(
            f"the inputs have different grid sizes {sorted(shapes)}; a batch needs one size, so pass "
            "--resolution N (N dividing every size) to block-average them to N x N"
        )
    manifest_extra = {
        "mpp": {
            "fields": vocab,
            "history": options.history,
            "window": window,
            "resolution": list(next(iter(shapes))),
            "datasets": datasets,
        }
    }
    schema = {
        "fields": {"description": "window of consecutive steps (steps, fields, x, y) in the source's units"},
        "bcs": {"description": "boundary code per axis (x, y): WALL 0, OPEN 1, PERIODIC 2"},
        "meta": {"description": "data set, field_names, params, source, trajectory, start, time"},
    }
    total = sum(len(starts) for *_, starts in jobs)
    with ShardSetWriter(
        out_dir,
        split_fractions=fractions,
        samples_per_shard=options.samples_per_shard,
        family="mpp",
        schema=schema,
        extra=manifest_extra,
        provenance={"sources": [str(p) for p, _ in files], "command": command, "seed": options.seed},
        seed=options.seed,
        overwrite=options.overwrite,
        allow_degenerate=options.allow_degenerate,
    ) as writer:
        bar = tqdm(total=total, desc="prepare mpp", unit="window", disable=not progress)
        for src, traj, traj_split, starts in jobs:
            params = src.parameters(traj)
            times = src.times(traj) if hasattr(src, "times") else None
            for start in starts:
                frames = src.window(traj, start, window)
                if options.resolution:
                    frames = downsample(frames, options.resolution, str(src.path))
                if not np.isfinite(frames).all():
                    raise DataError(
                        f"{src.path}: trajectory {traj} has non-finite values in steps "
                        f"{start}..{start + window - 1}"
                    )
                meta = {
                    "dataset": src.dataset_name,
                    "field_names": list(src.field_names),
                    "params": params,
                    "source": Path(src.path).name,
                    "trajectory": traj,
                    "start": start,
                }
                if times is not None:
                    meta["time"] = [float(t) for t in times[start : start + window]]
                key = _key(src.dataset_name, Path(src.path).stem, f"t{traj:05d}", f"s{start:05d}")
                writer.write(
                    {
                        "__key__": key,
                        "fields": frames,
                        "bcs": np.asarray(src.bc, dtype=np.int64),
                        "meta": meta,
                    },
                    split=traj_split,
                    source=str(src.path),
                )
                counts = datasets[src.dataset_name]["samples"]
                counts[traj_split] = counts.get(traj_split, 0) + 1
                if traj_split == "train":
                    stats.add(src.field_names, frames)
                bar.update(1)
        bar.close()
        writer.stats["fields"] = stats.result()
    return {name: info["samples"] for name, info in datasets.items()}
