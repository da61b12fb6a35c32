"""PDEBench 2-D HDF5 layouts (the ones MPP pretrains on), read as windowable trajectory sources.

Layouts (Takamoto et al. 2022, as distributed):
- per-sample groups — shallow water `2D_rdb_NA_NA.h5`, diffusion–reaction
  `2D_diff-react_NA_NA.h5`: one group per seed (`"0000"`, ...) holding `data` (T, X, Y, C) and
  optionally `grid/{t,x,y}`;
- compressible NS (`2D_CFD_*.hdf5`): `Vx`, `Vy`, `density`, `pressure`, each (N, T, X, Y), plus
  `t-coordinate`, `x-coordinate`, `y-coordinate`; periodic;
- incompressible NS (`ns_incom_*.h5`): `velocity` (N, T, X, Y, 2), `particles` (N, T, X, Y, 1),
  optionally `force` (N, X, Y, 2) and `t` (N, T).

Field names are mapped onto the same vocabulary as The Well's (`Vx` → `velocity_x`, the SWE
channel → `height`, ...), so that a model pretrained on one source shares embedding slots with
another. Small writers for each layout are included for tests and demos.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np

from encoders.mpp.well import OPEN, PERIODIC, WALL
from foundation.errors import DataError
from foundation.hdf5 import open_hdf5

CFD_KEYS = ("Vx", "Vy", "density", "pressure")
CFD_NAMES = ("velocity_x", "velocity_y", "density", "pressure")


def _group_field_names(path: str, n_channels: int) -> list[str]:
    """Channel names of a per-sample-group file, from PDEBench's file naming."""
    name = Path(path).name.lower()
    if ("rdb" in name or "swe" in name or "shallow" in name) and n_channels == 1:
        return ["height"]
    if ("diff-react" in name or "diff_react" in name or "diffreact" in name) and n_channels == 2:
        return ["activator", "inhibitor"]
    return ["u"] if n_channels == 1 else [f"u{i}" for i in range(n_channels)]


def _cfd_parameters(path: str) -> dict[str, float]:
    """`2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_128_Train.hdf5` → {M, eta, zeta}."""
    params = {}
    for key, label in (("M", "M"), ("Eta", "eta"), ("Zeta", "zeta")):
        m = re.search(rf"_{key}([0-9.eE+-]+?)(?=_|\.h)", Path(path).name)
        if m:
            try:
                params[label] = float(m.group(1))
            except ValueError:
                pass
    return params


class PDEBenchFile:
    """One PDEBench 2-D file: `window(trajectory, start, length)` → float32 (length, C, X, Y)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open_hdf5(self.path) as f:
            self._detect(f)

    def _err(self, what: str) -> DataError:
        return DataError(f"{self.path}: {what}")

    def _detect(self, f: h5py.File) -> None:
        self.params: dict[str, float] = {}
        stem = Path(self.path).stem
        if all(k in f for k in CFD_KEYS):
            self.layout = "cfd"
            shapes = {k: f[k].shape for k in CFD_KEYS}
            if len(set(shapes.values())) != 1 or len(shapes["Vx"]) != 4:
                raise self._err(f"CFD datasets must share one (N, T, X, Y) shape; got {shapes}")
            n, t, x, y = shapes["Vx"]
            self.field_names = list(CFD_NAMES)
            lower = stem.lower()
            self.bc = (OPEN, OPEN) if ("outgoing" in lower or "open" in lower) else (PERIODIC, PERIODIC)
            self.params = _cfd_parameters(self.path)
            self.dataset_name = "pdebench_compressible_ns"
        elif "velocity" in f:
            self.layout = "ins"
            vel = f["velocity"]
            if vel.ndim != 5 or vel.shape[-1] != 2:
                raise self._err(f"'velocity' must be (N, T, X, Y, 2); got {vel.shape}")
            n, t, x, y, _ = vel.shape
            self.field_names = ["velocity_x", "velocity_y"]
            if "particles" in f:
                if tuple(f["particles"].shape[:4]) != (n, t, x, y):
                    raise self._err(
                        f"'particles' shape {f['particles'].shape} does not match 'velocity' {vel.shape}"
                    )
                self.field_names += (
                    ["particles"]
                    if f["particles"].shape[-1] == 1
                    else [f"particles_{i}" for i in range(f["particles"].shape[-1])]
                )
            self._has_force = "force" in f
            if self._has_force:
                if tuple(f["force"].shape) != (n, x, y, 2):
                    raise self._err(f"'force' must be (N, X, Y, 2); got {f['force'].shape}")
                self.field_names += ["force_x", "force_y"]
            self.bc = (WALL, WALL)
            self.dataset_name = "pdebench_incompressible_ns"
        else:
            groups = sorted(k for k in f if isinstance(f[k], h5py.Group))
            if not groups:
                raise self._err(
                    "not a recognised PDEBench layout: expected per-sample groups with 'data', "
                    f"'Vx'/'Vy'/'density'/'pressure', or 'velocity'; found keys {sorted(f)[:8]}"
                )
            self.layout = "groups"
            self._groups = groups
            first = f[groups[0]]
            if "data" not in first:
                raise self._err(f"missing 'data' in group {groups[0]!r} (per-sample PDEBench layout)")
            shape = first["data"].shape
            if len(shape) != 4:
                raise self._err(f"{groups[0]}/data must be (T, X, Y, C); got shape {shape}")
            for g in groups:
                if "data" not in f[g]:
                    raise self._err(f"missing 'data' in group {g!r} (per-sample PDEBench layout)")
                if f[g]["data"].shape != shape:
                    raise self._err(
                        f"{g}/data has shape {f[g]['data'].shape}, but {groups[0]}/data has {shape}"
                    )
            t, x, y, c = shape
            n = len(groups)
            self.field_names = _group_field_names(self.path, c)
            self.bc = (WALL, WALL)
            lower = stem.lower()
            self.dataset_name = (
                "pdebench_shallow_water"
                if self.field_names == ["height"]
                else "pdebench_diffusion_reaction"
                if "diff" in lower
                else f"pdebench_{re.sub(r'[^a-z0-9]+', '_', lower).strip('_')}"
            )
        self.n_trajectories, self.n_steps, self.shape = int(n), int(t), (int(x), int(y))
        if self.n_steps < 2:
            raise self._err(f"only {self.n_steps} time step(s); need at least 2")

    def parameters(self, trajectory: int) -> dict[str, float]:
        return dict(self.params)

    def window(self, trajectory: int, start: int, length: int) -> np.ndarray:
        if not (0 <= trajectory < self.n_trajectories) or start < 0 or start + length > self.n_steps:
            raise IndexError(f"window ({trajectory}, {start}, {length}) outside {self.path}")
        sl = slice(start, start + length)
        with h5py.File(self.path, "r") as f:
            if self.layout == "cfd":
                data = np.stack(
                    [np.asarray(f[k][trajectory, sl], dtype=np.float32) for k in CFD_KEYS], axis=1
                )
            elif self.layout == "ins":
                parts = [np.moveaxis(np.asarray(f["velocity"][trajectory, sl], dtype=np.float32), -1, 1)]
                if "particles" in f:
                    parts.append(
                        np.moveaxis(np.asarray(f["particles"][trajectory, sl], dtype=np.float32), -1, 1)
                    )
                if self._has_force:
                    force = np.moveaxis(np.asarray(f["force"][trajectory], dtype=np.float32), -1, 0)
                    parts.append(np.broadcast_to(force[None], (length, *force.shape)))
                data = np.concatenate(parts, axis=1)
            else:
                raw = np.asarray(f[self._groups[trajectory]]["data"][sl], dtype=np.float32)
                data = np.moveaxis(raw, -1, 1)
        return np.ascontiguousarray(data)


# ----------------------------------------------------------------------------- writers (tests, demos)


def _atomic_h5(path: str | Path):
    path = Path(path)
    if path.exists():
        raise DataError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_groups(path: str | Path, data: np.ndarray, dt: float = 0.01) -> Path:
    """Per-sample-group layout: `data` (N, T, X, Y, C) → groups "0000".. with `data` and `grid`."""
    path, tmp = _atomic_h5(path)
    n, t, x, y, _ = data.shape
    with h5py.File(tmp, "w") as f:
        for i in range(n):
            g = f.create_group(f"{i:04d}")
            g.create_dataset("data", data=data[i].astype(np.float32))
            grid = g.create_group("grid")
            grid.create_dataset("t", data=(dt * np.arange(t)).astype(np.float32))
            grid.create_dataset("x", data=np.linspace(-1, 1, x, dtype=np.float32))
            grid.create_dataset("y", data=np.linspace(-1, 1, y, dtype=np.float32))
    os.replace(tmp, path)
    return path


def write_cfd(
    path: str | Path, vx: np.ndarray, vy: np.ndarray, density: np.ndarray, pressure: np.ndarray
) -> Path:
    """Compressible-NS layout: four (N, T, X, Y) datasets plus coordinates."""
    path, tmp = _atomic_h5(path)
    _, t, x, y = vx.shape
    with h5py.File(tmp, "w") as f:
        for key, value in zip(CFD_KEYS, (vx, vy, density, pressure), strict=True):
            f.create_dataset(key, data=value.astype(np.float32))
        f.create_dataset("t-coordinate", data=np.linspace(0, 1, t + 1, dtype=np.float32))
        f.create_dataset("x-coordinate", data=np.linspace(0, 1, x, dtype=np.float32))
        f.create_dataset("y-coordinate", data=np.linspace(0, 1, y, dtype=np.float32))
    os.replace(tmp, path)
    return path


def write_ins(
    path: str | Path, velocity: np.ndarray, particles: np.ndarray, force: np.ndarray | None = None
) -> Path:
    """Incompressible-NS layout: `velocity` (N,T,X,Y,2), `particles` (N,T,X,Y,1), `force`, `t`."""
    path, tmp = _atomic_h5(path)
    n, t = velocity.shape[:2]
    with h5py.File(tmp, "w") as f:
        f.create_dataset("velocity", data=velocity.astype(np.float32))
        f.create_dataset("particles", data=particles.astype(np.float32))
        if force is not None:
            f.create_dataset("force", data=force.astype(np.float32))
        f.create_dataset("t", data=np.tile(np.linspace(0, 1, t, dtype=np.float32), (n, 1)))
    os.replace(tmp, path)
    return path
