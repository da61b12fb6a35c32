"""Built-in PDE data: trajectories of the `solvers` systems written as The Well data sets.

Each system becomes `<out>/<system>/data/{train,valid,test}/<system>_<split>.hdf5` plus
`<out>/<system>/stats.yaml` (statistics of the training files, as The Well publishes them), so
`prepare mpp` reads built-in data through the same reader as downloaded data. Initial conditions
and PDE parameters come from one seed per (seed, system, split): the same arguments give the same
files.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from encoders.mpp.solvers import SYSTEMS
from encoders.mpp.well import SPLITS, compute_stats, write_simulation, write_stats
from foundation.errors import DataError


def check_request(out: Path, systems: Sequence[str], trajectories: Sequence[int]) -> None:
    """Refuse unknown systems, counts that are not train,valid,test (train >= 1) and existing
    data set folders, before anything is written."""
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise DataError(f"unknown system(s) {unknown or list(systems)}; choose from {', '.join(SYSTEMS)}")
    if len(trajectories) != len(SPLITS) or min(trajectories) < 0 or trajectories[0] < 1:
        raise DataError(
            f"trajectories must be three counts train,valid,test (train >= 1), got {list(trajectories)}"
        )
    for system in systems:
        if (out / system).exists():
            raise DataError(f"{out / system} already exists; refusing to overwrite it (choose another --out)")


def write_system(
    out: Path, system: str, trajectories: Sequence[int], resolution: int, steps: int, seed: int
) -> list[Path]:
    """One Well data set folder for `system`; returns the HDF5 files written."""
    root = out / system
    written = []
    for split_index, (split, n_traj) in enumerate(zip(SPLITS, trajectories, strict=True)):
        if n_traj == 0:
            continue
        split_seed = np.random.SeedSequence([seed, zlib.crc32(system.encode()), split_index])
        sim = SYSTEMS[system](np.random.default_rng(split_seed), n_traj, resolution, steps)
        written.append(write_simulation(sim, root / "data" / split / f"{system}_{split}.hdf5"))
    write_stats(compute_stats([p for p in written if p.parent.name == "train"]), root / "stats.yaml")
    return written


def write_datasets(
    out: str | Path,
    systems: Sequence[str],
    trajectories: Sequence[int],
    *,
    resolution: int = 64,
    steps: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> list[Path]:
    """Write one Well data set per system under `out` (see the module docstring); returns their
    folders. `trajectories` counts train, valid and test trajectories per system."""
    from tqdm import tqdm

    out = Path(out)
    check_request(out, systems, trajectories)
    with tqdm(total=len(systems), desc="synth mpp", unit="system", disable=not progress) as bar:
        for system in systems:
            write_system(out, system, trajectories, resolution, steps, seed)
            bar.update(1)
    return [out / system for system in systems]
