"""PDEBench 2-D HDF5 layouts (the ones MPP pretrains on), read as windowable trajectory sources.

Layouts, as PDEBench's generators write them (`pdebench/data_gen/...`):
- per-sample groups — shallow water `2D_rdb_NA_NA.h5` (`gen_radial_dam_break.py`,
  `src/sim_radial_dam_break.py`: `<seed>/data` (T+1, X, Y, 1) float32, `<seed>/grid/{x,y,t}`,
  group attr `config`; pyclaw `extrap` boundaries), diffusion–reaction `2D_diff-react_NA_NA.h5`
  (`gen_diff_react.py`: the same keys, lzf-compressed, `data` (T, Y, X, 2) — its solver reshapes
  to (t, y, x); zero-flux Neumann boundaries);
- compressible NS `2D_CFD_<mode>_M.._Eta.._Zeta.._<bc>_<n>_Train.hdf5`
  (`data_gen_NLE/Data_Merge.py`): `density`, `pressure`, `Vx`, `Vy` (N, T, X, Y), `x-coordinate`,
  `y-coordinate`, `t-coordinate` (T+1), root attrs `eta`, `zeta`, `M`; boundaries from the
  generator's `bc` (`periodic`, `trans` = zero-gradient copy, `KHI` = periodic x, `trans` y),
  named in the file name (the test files `KH_*`, `2D_shock`, `OTVortex` name their config);
- incompressible NS `ns_incom_inhom_2d_<n>-<seed>.h5` (`src/data_io.py`): `velocity`
  (N, T, X, Y, 2), `particles` (N, T, X, Y, 1), `force` (N, X, Y, 2), `t` (N, T), lzf chunks of
  one frame; phiflow `ZERO` velocity extrapolation (no-slip walls).

Zero-gradient boundaries (pyclaw `extrap`, CFD `trans`, Neumann zero flux) let waves leave the
domain, so they map to OPEN; only the incompressible no-slip box is WALL. Field names are mapped
onto The Well's vocabulary (`Vx` → `velocity_x`, the SWE channel → `height`, ...), so a model
pretrained on one source shares embedding slots with another. 1-D and 3-D files, and steady
Darcy flow (`tensor`), are valid PDEBench files MPP cannot use: they raise `SkippedSource`.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from encoders.mpp.well import OPEN, PERIODIC, WALL, SkippedSource, axis_code, check_stored
from foundation.errors import DataError
from foundation.hdf5 import open_hdf5

CFD_KEYS = ("Vx", "Vy", "density", "pressure")
CFD_NAMES = ("velocity_x", "velocity_y", "density", "pressure")
CFD_3D_KEYS = ("Vz", "z-coordinate")
# The CFD generator's `bc` setting, as it appears in the merged file name, per axis end.
CFD_BOUNDARIES = {
    "periodic": ((PERIODIC, PERIODIC), (PERIODIC, PERIODIC)),
    "trans": ((OPEN, OPEN), (OPEN, OPEN)),
    "khi": ((PERIODIC, PERIODIC), (OPEN, OPEN)),
}
ZERO_GRADIENT = ((OPEN, OPEN), (OPEN, OPEN))
NO_SLIP = ((WALL, WALL), (WALL, WALL))


def _group_field_names(path: str, n_channels: int) -> list[str]:
    """Channel names of a per-sample-group file, from PDEBench's file naming."""
    name = Path(path).name.lower()
    if ("rdb" in name or "swe" in name or "shallow" in name) and n_channels == 1:
        return ["height"]
    if ("diff-react" in name or "diff_react" in name or "diffreact" in name) and n_channels == 2:
        return ["activator", "inhibitor"]
    return ["u"] if n_channels == 1 else [f"u{i}" for i in range(n_channels)]


def _cfd_parameters(f: h5py.File, path: str) -> dict[str, float]:
    """M, eta, zeta: root attributes (Data_Merge.py writes them), else parsed from the file name
    (`2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_128_Train.hdf5`)."""
    params = {}
    for key, label in (("M", "M"), ("Eta", "eta"), ("Zeta", "zeta")):
        value = np.asarray(f.attrs.get(label, np.nan))
        if value.size == 1 and value.dtype.kind in "fiu" and np.isfinite(value):
            params[label] = float(value.reshape(()))
            continue
        m = re.search(rf"_{key}([0-9.eE+-]+?)(?=_|\.h)", Path(path).name)
        if m:
            try:
                params[label] = float(m.group(1))
            except ValueError:
                pass
    return params


def _cfd_boundaries(path: str) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Boundary ends from the CFD file name (the generator records `bc` nowhere else)."""
    words = re.split(r"[_.\-]+", Path(path).name.lower())
    for bc in ("periodic", "trans", "khi"):
        if bc in words:
            return CFD_BOUNDARIES[bc]
    # The distributed test files name their configuration instead: KH_* (bc KHI), 2D_shock
    # (2D_ShockTube.yaml, bc trans), OTVortex (2D_TOV.yaml, bc periodic).
    named = {"kh": "khi", "shock": "trans", "otvortex": "periodic"}
    return next((CFD_BOUNDARIES[named[w]] for w in words if w in named), None)


class PDEBenchFile:
    """One PDEBench 2-D file: `window(trajectory, start, length)` → float32 (length, C, X, Y)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open_hdf5(self.path) as f:
            self._detect(f)

    def _err(self, what: str) -> DataError:
        return DataError(f"{self.path}: {what}")

    def _skip(self, name: str, reason: str) -> SkippedSource:
        return SkippedSource(self.path, name, reason)

    def _checked(self, f: h5py.File, key: str) -> h5py.Dataset:
        if isinstance(f.get(key, getlink=True), h5py.ExternalLink):
            raise self._err(f"{key!r} is a link to another file; copy its data into the file")
        ds = f.get(key)
        if not isinstance(ds, h5py.Dataset):
            raise self._err(f"{key!r} is not a dataset")
        check_stored(ds, f"{self.path}: {key}")
        return ds

    def _detect(self, f: h5py.File) -> None:
        self.params: dict[str, float] = {}
        self.grid_type = "cartesian"
        if "tensor" in f:
            raise self._skip(
                "pdebench_" + Path(self.path).stem.lower(),
                "PDEBench 'tensor' layout (1-D equations or steady Darcy flow), not a 2-D time series",
            )
        if "density" in f and "Vx" in f:
            self._detect_cfd(f)
        elif "velocity" in f:
            self._detect_ins(f)
        else:
            self._detect_groups(f)
        if self.n_steps < 2:
            raise self._err(f"only {self.n_steps} time step(s); need at least 2")
        self.bc = tuple(axis_code(lo, hi) for lo, hi in self.bc_ends)

    def _detect_cfd(self, f: h5py.File) -> None:
        self.layout = "cfd"
        self.dataset_name = "pdebench_compressible_ns"
        if any(k in f for k in CFD_3D_KEYS):
            raise self._skip(self.dataset_name + "_3d", "3-D compressible NS (Vz); MPP models 2-D only")
        if "Vy" not in f:
            raise self._skip(
                self.dataset_name + "_1d", "1-D compressible NS (no Vy); MPP models 2-D data only"
            )
        shapes = {k: self._checked(f, k).shape for k in CFD_KEYS}
        if len(set(shapes.values())) != 1 or len(shapes["Vx"]) != 4:
            raise self._err(f"CFD datasets must share one (N, T, X, Y) shape; got {shapes}")
        n, t, x, y = shapes["Vx"]
        self.field_names = list(CFD_NAMES)
        ends = _cfd_boundaries(self.path)
        if ends is None:
            raise self._skip(
                self.dataset_name,
                "boundary condition unknown: the file name names none of 'periodic', 'trans' or 'KH' "
                "(PDEBench records it only there); rename the file to say which",
            )
        self.bc_ends = ends
        self.params = _cfd_parameters(f, self.path)
        self._time_key = "t-coordinate" if "t-coordinate" in f else None
        self.n_trajectories, self.n_steps, self.shape = int(n), int(t), (int(x), int(y))

    def _detect_ins(self, f: h5py.File) -> None:
        self.layout = "ins"
        self.dataset_name = "pdebench_incompressible_ns"
        vel = self._checked(f, "velocity")
        if vel.ndim != 5 or vel.shape[-1] != 2:
            raise self._err(f"'velocity' must be (N, T, X, Y, 2); got {vel.shape}")
        n, t, x, y, _ = vel.shape
        self.field_names = ["velocity_x", "velocity_y"]
        self._has_particles = "particles" in f
        if self._has_particles:
            particles = self._checked(f, "particles")
            if particles.ndim != 5 or tuple(particles.shape[:4]) != (n, t, x, y):
                raise self._err(f"'particles' shape {particles.shape} does not match 'velocity' {vel.shape}")
            c = particles.shape[-1]
            self.field_names += ["particles"] if c == 1 else [f"particles_{i}" for i in range(c)]
        self._has_force = "force" in f
        if self._has_force:
            if tuple(self._checked(f, "force").shape) != (n, x, y, 2):
                raise self._err(f"'force' must be (N, X, Y, 2); got {f['force'].shape}")
            self.field_names += ["force_x", "force_y"]
        self._time_key = "t" if "t" in f and tuple(self._checked(f, "t").shape) == (n, t) else None
        self.bc_ends = NO_SLIP
        self.n_trajectories, self.n_steps, self.shape = int(n), int(t), (int(x), int(y))

    def _detect_groups(self, f: h5py.File) -> None:
        groups = sorted(k for k in f if isinstance(f.get(k), h5py.Group))
        if not groups:
            raise self._err(
                "not a recognised PDEBench layout: expected per-sample groups with 'data', "
                f"'Vx'/'Vy'/'density'/'pressure', or 'velocity'; found keys {sorted(f)[:8]}"
            )
        self.layout = "groups"
        self._groups = groups
        shape = None
        for g in groups:
            if "data" not in f[g] or not isinstance(f[g].get("data"), h5py.Dataset):
                raise self._err(f"missing 'data' in group {g!r} (per-sample PDEBench layout)")
            data = self._checked(f, f"{g}/data")
            if shape is None:
                shape = data.shape
                if len(shape) == 3:
                    raise self._skip(
                        "pdebench_" + Path(self.path).stem.lower(),
                        f"{g}/data has shape {shape}: a 1-D equation (T, X, C); MPP models 2-D data only",
                    )
                if len(shape) != 4:
                    raise self._err(f"{g}/data must be (T, X, Y, C); got shape {shape}")
            elif data.shape != shape:
                raise self._err(f"{g}/data has shape {data.shape}, but {groups[0]}/data has {shape}")
        t, x, y, c = shape
        self.field_names = _group_field_names(self.path, c)
        self.bc_ends = ZERO_GRADIENT
        lower = Path(self.path).stem.lower()
        self.dataset_name = (
            "pdebench_shallow_water"
            if self.field_names == ["height"]
            else "pdebench_diffusion_reaction"
            if "diff" in lower
            else f"pdebench_{re.sub(r'[^a-z0-9]+', '_', lower).strip('_')}"
        )
        self._time_key = "grid/t"
        self.n_trajectories, self.n_steps, self.shape = len(groups), int(t), (int(x), int(y))

    def parameters(self, trajectory: int) -> dict[str, float]:
        return dict(self.params)

    def times(self, trajectory: int, start: int, length: int) -> np.ndarray | None:
        """Times of steps [start, start+length), where the file stores one per step (the CFD
        `t-coordinate` holds one more, the end of the last interval)."""
        with h5py.File(self.path, "r") as f:
            key = (
                f"{self._groups[trajectory]}/{self._time_key}" if self.layout == "groups" else self._time_key
            )
            if key is None or key not in f or not isinstance(f[key], h5py.Dataset):
                return None
            t = f[key]
            if self.layout == "ins":
                values = t[trajectory, start : start + length]
            elif t.ndim == 1 and t.shape[0] in (self.n_steps, self.n_steps + 1) and t.dtype.kind in "fiu":
                values = t[start : start + length]
            else:
                return None
            return np.asarray(values, dtype=np.float64)

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
                if self._has_particles:
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
