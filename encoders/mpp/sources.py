"""Find and open MPP source files: The Well or PDEBench HDF5, sniffed from their content.

A source is any object with `path`, `dataset_name`, `grid_type`, `n_trajectories`, `n_steps`,
`shape`, `field_names`, `bc` (one code per axis), `bc_ends` (codes of the low and high end of each
axis), `parameters(trajectory)`, `times(trajectory, start, length)` (None where the file has no
per-step times) and `window(trajectory, start, length) -> (length, C, X, Y) float32`. A valid file
MPP cannot use raises `SkippedSource` (a `DataError`) with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from encoders.mpp.pdebench import PDEBenchFile
from encoders.mpp.well import SPLITS, WellFile, find_split_files, is_well_file
from foundation.errors import DataError
from foundation.hdf5 import open_hdf5

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def open_source(path: str | Path) -> WellFile | PDEBenchFile:
    """Open `path` with the reader its content calls for (The Well schema, else PDEBench)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open_hdf5(path) as f:
        well = is_well_file(f)
    return WellFile(path) if well else PDEBenchFile(path)


def discover(inputs: Iterable[str | Path]) -> list[tuple[Path, str | None]]:
    """HDF5 files named by `inputs`, each with the split its location implies (None = unsplit).

    An input may be a file, a Well data set directory (`<name>/data/<split>/*.hdf5`), a directory
    holding several such data sets (a Well base folder `<base>/datasets/<name>/...`, the output of
    `synth mpp`), a split directory, or any directory of HDF5 files (searched recursively).
    """
    found: list[tuple[Path, str | None]] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input {str(path)!r} does not exist")
        if path.is_file():
            found.append((path, path.parent.name if path.parent.name in SPLITS else None))
            continue
        if (path / "data").is_dir():
            per_split = find_split_files(path)
            if not per_split:
                raise DataError(f"{path}/data has no {'/'.join(SPLITS)} folders with .hdf5 files")
            found.extend((f, split) for split, files in per_split.items() for f in files)
            continue
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in HDF5_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"no HDF5 files (*.h5, *.hdf5) under {path}")
        found.extend((f, f.parent.name if f.parent.name in SPLITS else None) for f in files)
    unique: dict[Path, str | None] = {}
    for f, split in found:
        unique.setdefault(f.resolve(), split)
    return list(unique.items())
