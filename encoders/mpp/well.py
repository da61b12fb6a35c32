"""The Well's HDF5 schema: writer (for `synth mpp`), validating reader, and `stats.yaml`.

Schema (the_well 1.x, `WellDataset`): root attrs `dataset_name`, `grid_type`, `n_spatial_dims`,
`n_trajectories`, `simulation_parameters` (+ one attr per parameter); group `dimensions` (attr
`spatial_dims`) with `time` and one dataset per spatial axis, each with `sample_varying` /
`time_varying`; group `boundary_conditions/<name>` (attrs `bc_type`, `associated_dims`,
`associated_fields`, `sample_varying`, `time_varying`; datasets `mask`, `values`); group `scalars`
(attr `field_names`); groups `t0_fields`, `t1_fields`, `t2_fields` (attr `field_names`), each
field a float32 dataset `[N,] [T,] X, Y [, D [, D]]` with attrs `dim_varying`, `sample_varying`,
`time_varying`. A data set is laid out as `<name>/data/{train,valid,test}/*.hdf5` plus
`<name>/stats.yaml` (`mean`, `std`, `rms` and their `*_delta` per field).

The reader flattens tensor fields into named channels the way The Well does
(`velocity` → `velocity_x`, `velocity_y`; t2 `stress` → `stress_xx`, `stress_xy`, ...), keeps
time-invariant fields as channels constant in time, and turns boundary masks into codes for both
ends of each axis with WellDataset's convention (WALL=0, OPEN=1, PERIODIC=2), plus one code per
axis (PERIODIC only if both of its ends are). Every schema violation becomes a `DataError` naming
the file and the key; a valid file MPP cannot use (not 2-D, a spherical grid) a `SkippedSource`.
`equiangular` (latitude-longitude) grids are read as a plain 2-D image, as WellDataset does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from encoders.mpp.solvers import Simulation
from foundation.atomic import replacing, write_text
from foundation.errors import DataError
from foundation.hdf5 import check_storage, open_hdf5

WALL, OPEN, PERIODIC = 0, 1, 2
BC_CODES = {"WALL": WALL, "OPEN": OPEN, "PERIODIC": PERIODIC}
SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------- writing


def _str_array(values: Iterable[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=h5py.string_dtype())


def write_simulation(sim: Simulation, path: str | Path, dataset_name: str | None = None) -> Path:
    """Write `sim` as one Well HDF5 file at `path` (atomically: temporary name, then rename).

    Per-trajectory PDE parameters are `sample_varying` scalars; the root attribute of each
    parameter holds the (N,) array of per-trajectory values.
    """
    path = Path(path)
    if path.exists():
        raise DataError(
            f"{path} already exists; refusing to overwrite it (remove it or choose another --out)"
        )
    fields_t0 = sim.t0_fields
    fields_t1 = sim.t1_fields
    n_traj = next(iter({**fields_t0, **fields_t1}.values())).shape[0]
    with replacing(path, overwrite=False) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["dataset_name"] = dataset_name or sim.name
        f.attrs["grid_type"] = "cartesian"
        f.attrs["n_spatial_dims"] = 2
        f.attrs["n_trajectories"] = n_traj
        f.attrs["simulation_parameters"] = _str_array(sim.parameters)
        for name, values in sim.parameters.items():
            f.attrs[name] = np.asarray(values)

        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = _str_array(["x", "y"])
        for name, values, time_varying in (
            ("time", sim.time, True),
            ("x", sim.x, False),
            ("y", sim.y, False),
        ):
            d = dims.create_dataset(name, data=np.asarray(values, dtype=np.float32))
            d.attrs["sample_varying"] = False
            d.attrs["time_varying"] = time_varying

        bcs = f.create_group("boundary_conditions")
        for axis, coords in (("x", sim.x), ("y", sim.y)):
            bc_type = sim.boundary[axis].upper()
            g = bcs.create_group(f"{axis}_{bc_type.lower()}")
            g.attrs["bc_type"] = bc_type
            g.attrs["associated_dims"] = _str_array([axis])
            g.attrs["associated_fields"] = _str_array([])
            g.attrs["sample_varying"] = False
            g.attrs["time_varying"] = False
            mask = np.zeros(len(coords), dtype=bool)
            mask[[0, -1]] = True
            g.create_dataset("mask", data=mask)
            g.create_dataset("values", data=np.zeros(0, dtype=np.float32))

        scalars = f.create_group("scalars")
        scalars.attrs["field_names"] = _str_array(sim.parameters)
        for name, values in sim.parameters.items():
            d = scalars.create_dataset(name, data=np.asarray(values, dtype=np.float32))
            d.attrs["sample_varying"] = True
            d.attrs["time_varying"] = False

        for order, group_fields in ((0, fields_t0), (1, fields_t1), (2, {})):
            g = f.create_group(f"t{order}_fields")
            g.attrs["field_names"] = _str_array(group_fields)
            for name, values in group_fields.items():
                d = g.create_dataset(name, data=np.asarray(values, dtype=np.float32))
                d.attrs["dim_varying"] = np.array([True, True])
                d.attrs["sample_varying"] = True
                d.attrs["time_varying"] = True
    return path


def compute_stats(files: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """The Well's `stats.yaml` content for these files: per core field, over all samples and times,
    `mean`/`std`/`rms` and the same of one-step differences (`*_delta`). Vector fields get one
    value per component, like the published files."""
    sums: dict[str, dict[str, np.ndarray]] = {}
    for file in files:
        with h5py.File(file, "r") as f:
            for order in range(3):
                group = f[f"t{order}_fields"]
                for name in _names(group.attrs["field_names"]):
                    data = np.asarray(group[name][()], dtype=np.float64)
                    attrs = group[name].attrs
                    reduce_axes = tuple(range(data.ndim - order))
                    acc = sums.setdefault(name, {})
                    acc["n"] = acc.get("n", 0) + np.prod([data.shape[a] for a in reduce_axes])
                    acc["s1"] = acc.get("s1", 0) + data.sum(axis=reduce_axes)
                    acc["s2"] = acc.get("s2", 0) + (data**2).sum(axis=reduce_axes)
                    if bool(attrs["time_varying"]):
                        t_axis = 1 if bool(attrs["sample_varying"]) else 0
                        delta = np.diff(data, axis=t_axis)
                        acc["dn"] = acc.get("dn", 0) + np.prod([delta.shape[a] for a in reduce_axes])
                        acc["d1"] = acc.get("d1", 0) + delta.sum(axis=reduce_axes)
                        acc["d2"] = acc.get("d2", 0) + (delta**2).sum(axis=reduce_axes)
    stats: dict[str, dict[str, Any]] = {
        k: {} for k in ("mean", "std", "rms", "mean_delta", "std_delta", "rms_delta")
    }

    def plain(a: np.ndarray) -> Any:
        return float(a) if np.ndim(a) == 0 else np.asarray(a, dtype=float).tolist()

    for name, acc in sums.items():
        mean = acc["s1"] / acc["n"]
        ms = acc["s2"] / acc["n"]
        stats["mean"][name] = plain(mean)
        stats["std"][name] = plain(np.sqrt(np.maximum(ms - mean**2, 0)))
        stats["rms"][name] = plain(np.sqrt(ms))
        if "dn" in acc:
            dmean = acc["d1"] / acc["dn"]
            dms = acc["d2"] / acc["dn"]
            stats["mean_delta"][name] = plain(dmean)
            stats["std_delta"][name] = plain(np.sqrt(np.maximum(dms - dmean**2, 0)))
            stats["rms_delta"][name] = plain(np.sqrt(dms))
    return stats


def write_stats(stats: dict[str, Any], path: str | Path) -> None:
    write_text(path, yaml.safe_dump(stats, sort_keys=False))


# ----------------------------------------------------------------------------- reading

SUPPORTED_GRIDS = ("cartesian", "equiangular")
MAX_TRAJECTORIES = 10_000_000


class SkippedSource(DataError):
    """A valid file that MPP cannot use (not 2-D, a grid type it does not model); `prepare` skips
    its data set and says why instead of failing the run."""

    def __init__(self, path: str, dataset_name: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.dataset_name = dataset_name
        self.reason = reason


def check_stored(ds: h5py.Dataset, where: str) -> None:
    """Refuse a dataset whose values are not real numbers stored in this file: complex or
    non-numeric types (never cast silently), virtual or external storage (data outside the file),
    chunks too large to inflate, and declared shapes whose chunks or bytes are not all present
    (a sparse or truncated file would otherwise read as fill values, or allocate memory for data
    that does not exist)."""
    kind = ds.dtype.kind
    if kind == "c":
        raise DataError(
            f"{where}: complex values ({ds.dtype}); store the real and imaginary parts as two real "
            "fields (e.g. <name>_re and <name>_im, as The Well does) — they are never cast silently"
        )
    if kind not in "fiub":
        raise DataError(f"{where}: values of type {ds.dtype} are not real numbers")
    check_storage(ds, where)


def _names(raw: Any) -> list[str]:
    """An HDF5 string-list attribute (bytes, str, a scalar string or an array) as a list of str."""
    if isinstance(raw, bytes | str):
        raw = [raw]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(raw)]


def _bools(raw: Any, where: str, key: str) -> np.ndarray:
    """A boolean attribute (or list of them) as a bool array; strings such as "False" are refused
    rather than read as True."""
    values = np.atleast_1d(np.asarray(raw))
    if values.dtype.kind not in "biu" or values.size == 0:
        raise DataError(f"{where}: attribute {key!r} is {raw!r}, not a boolean (or list of booleans)")
    return values.astype(bool)


def _flag(attrs: h5py.AttributeManager, key: str, where: str, default: bool | None = None) -> bool:
    if key not in attrs:
        if default is not None:
            return default
        raise DataError(f"{where}: missing attribute {key!r} (required by The Well schema)")
    return bool(_bools(attrs[key], where, key).all())


def _int_attr(attrs: h5py.AttributeManager, key: str, where: str) -> int:
    value = np.asarray(attrs[key])
    if value.size != 1 or value.dtype.kind not in "iu":
        raise DataError(f"{where}: root attribute {key!r} is {attrs[key]!r}, not an integer")
    return int(value.reshape(()))


def _first_name(attrs: h5py.AttributeManager, key: str, where: str, default: str | None = None) -> str:
    names = _names(attrs[key]) if key in attrs else [default] if default is not None else []
    if len(names) != 1 or not names[0]:
        raise DataError(f"{where}: root attribute {key!r} is {attrs.get(key)!r}, not one non-empty string")
    return names[0]


def is_well_file(f: h5py.File) -> bool:
    """Whether an open file looks like a Well file (it has the schema's field groups)."""
    return "t0_fields" in f and "dimensions" in f and "n_spatial_dims" in f.attrs


@dataclass(frozen=True)
class _FieldSpec:
    group: str
    name: str
    order: int
    channels: tuple[str, ...]
    sample_varying: bool
    time_varying: bool
    dim_varying: tuple[bool, ...]
    singleton_axes: bool = False


def axis_code(lo: int, hi: int) -> int:
    """One code per axis from its two ends: PERIODIC only if both ends are, else WALL if either
    end is a wall, else OPEN."""
    return PERIODIC if lo == hi == PERIODIC else WALL if WALL in (lo, hi) else OPEN


class WellFile:
    """One Well HDF5 file, validated on open; hands out windows of trajectories as (T, C, X, Y)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open_hdf5(self.path) as f:
            self._read_schema(f)

    def _err(self, what: str) -> DataError:
        return DataError(f"{self.path}: {what}")

    def _require(self, node: h5py.Group, key: str, what: str = "", kind: type = h5py.Dataset) -> Any:
        """`node[key]`, which must exist and be a `kind` (dataset or group)."""
        where = node.name if node.name != "/" else "the root group"
        if key not in node:
            hint = f" ({what})" if what else ""
            raise self._err(f"missing {key!r} in {where}{hint}; not a valid Well file")
        if isinstance(node.get(key, getlink=True), h5py.ExternalLink):
            raise self._err(f"{key!r} in {where} is a link to another file; copy its data into the file")
        item = node.get(key)
        if not isinstance(item, kind):
            raise self._err(f"{key!r} in {where} is not a {'group' if kind is h5py.Group else 'dataset'}")
        return item

    def _read_schema(self, f: h5py.File) -> None:
        for key in ("dataset_name", "n_spatial_dims", "n_trajectories"):
            if key not in f.attrs:
                raise self._err(f"missing root attribute {key!r} (required by The Well schema)")
        self.dataset_name = _first_name(f.attrs, "dataset_name", self.path)
        self.grid_type = _first_name(f.attrs, "grid_type", self.path, default="cartesian")
        n_dims = _int_attr(f.attrs, "n_spatial_dims", self.path)
        if n_dims != 2:
            raise SkippedSource(
                self.path, self.dataset_name, f"n_spatial_dims is {n_dims}; MPP models 2-D data only"
            )
        if self.grid_type.lower() not in SUPPORTED_GRIDS:
            raise SkippedSource(
                self.path,
                self.dataset_name,
                f"grid_type {self.grid_type!r} is not one MPP can use ({', '.join(SUPPORTED_GRIDS)})",
            )
        self.n_trajectories = _int_attr(f.attrs, "n_trajectories", self.path)
        if not 1 <= self.n_trajectories <= MAX_TRAJECTORIES:
            raise self._err(f"n_trajectories is {self.n_trajectories}, outside 1..{MAX_TRAJECTORIES}")

        dims = self._require(f, "dimensions", kind=h5py.Group)
        if "spatial_dims" not in dims.attrs:
            raise self._err("missing attribute 'spatial_dims' on group 'dimensions'")
        self.spatial_dims = _names(dims.attrs["spatial_dims"])
        if len(self.spatial_dims) != 2:
            raise self._err(f"dimensions.spatial_dims is {self.spatial_dims}, expected 2 names")
        self._read_time(dims)
        coords = [self._require(dims, d, "a spatial coordinate") for d in self.spatial_dims]
        if any(c.ndim < 1 or c.shape[-1] < 1 for c in coords):
            raise self._err(f"spatial coordinates {self.spatial_dims} must be non-empty arrays")
        self.shape = tuple(int(c.shape[-1]) for c in coords)

        self.fields: list[_FieldSpec] = []
        for order in range(3):
            group_name = f"t{order}_fields"
            group = self._require(f, group_name, kind=h5py.Group)
            if "field_names" not in group.attrs:
                raise self._err(f"missing attribute 'field_names' on group {group_name!r}")
            for name in _names(group.attrs["field_names"]):
                self.fields.append(self._read_field(group, group_name, name, order))
        if not self.fields:
            raise self._err("no fields listed in t0_fields/t1_fields/t2_fields")
        self.field_names = [c for spec in self.fields for c in spec.channels]
        self.bc_ends = self._read_bcs(f)
        self.bc = tuple(axis_code(lo, hi) for lo, hi in self.bc_ends)
        self._scalars = self._read_scalars(f)

    def _read_time(self, dims: h5py.Group) -> None:
        """`time` is (T,) or, per trajectory, (N, T)."""
        time = self._require(dims, "time", "the time coordinate")
        where = f"{self.path}: dimensions/time"
        self._time_sample_varying = _flag(time.attrs, "sample_varying", where, False)
        expected_ndim = 2 if self._time_sample_varying else 1
        if time.ndim != expected_ndim or (self._time_sample_varying and time.shape[0] != self.n_trajectories):
            raise DataError(
                f"{where}: shape {time.shape} does not match sample_varying={self._time_sample_varying} "
                f"with {self.n_trajectories} trajectories"
            )
        check_stored(time, where)
        self.n_steps = int(time.shape[-1])

    def _read_field(self, group: h5py.Group, group_name: str, name: str, order: int) -> _FieldSpec:
        ds = self._require(group, name, f"listed in {group_name}.field_names")
        where = f"{self.path}: {group_name}/{name}"
        sample_varying = _flag(ds.attrs, "sample_varying", where)
        time_varying = _flag(ds.attrs, "time_varying", where)
        if "dim_varying" not in ds.attrs:
            raise DataError(f"{where}: missing attribute 'dim_varying'")
        dim_varying = tuple(bool(v) for v in _bools(ds.attrs["dim_varying"], where, "dim_varying"))
        if len(dim_varying) != 2:
            raise DataError(f"{where}: dim_varying has {len(dim_varying)} entries, expected 2")
        lead = ([self.n_trajectories] if sample_varying else []) + ([self.n_steps] if time_varying else [])
        # An axis a field does not vary along is stored either with size 1 (what WellDataset's
        # tiling expects) or left out (what the_well's format checker and xarray export expect).
        axes = list(zip(self.shape, dim_varying, strict=True))
        kept = lead + [s if used else 1 for s, used in axes] + [2] * order
        dropped = lead + [s for s, used in axes if used] + [2] * order
        if list(ds.shape) not in (kept, dropped):
            raise DataError(
                f"{where}: shape {tuple(ds.shape)} does not match the schema's {tuple(dropped)} "
                f"or {tuple(kept)} (sample_varying={sample_varying}, time_varying={time_varying}, "
                f"dim_varying={dim_varying})"
            )
        check_stored(ds, where)
        suffixes = ["".join(p) for p in itertools.product(self.spatial_dims, repeat=order)]
        return _FieldSpec(
            group=group_name,
            name=name,
            order=order,
            channels=tuple(f"{name}_{s}" if s else name for s in suffixes),
            sample_varying=sample_varying,
            time_varying=time_varying,
            dim_varying=dim_varying,
            singleton_axes=list(ds.shape) == kept and kept != dropped,
        )

    def _read_bcs(self, f: h5py.File) -> tuple[tuple[int, int], tuple[int, int]]:
        """Codes of both ends of each spatial axis, as WellDataset's `_padding_bcs` computes them: an
        end is of a group's type when its mask is set there (for WALL: everywhere along it), OPEN
        when no group covers it. Masks may carry leading sample/time axes; an end counts when the
        mask is set there in any sample and time (for WALL: in all)."""
        ends = {d: [OPEN, OPEN] for d in self.spatial_dims}
        group = self._require(f, "boundary_conditions", kind=h5py.Group)
        for name in group:
            bc = self._require(group, name, kind=h5py.Group)
            where = f"{self.path}: boundary_conditions/{name}"
            if "bc_type" not in bc.attrs or "associated_dims" not in bc.attrs:
                raise DataError(f"{where}: missing attribute 'bc_type' or 'associated_dims'")
            bc_type = _names(bc.attrs["bc_type"])[0].upper()
            if bc_type not in BC_CODES:
                raise DataError(f"{where}: bc_type {bc_type!r} is not one of {', '.join(BC_CODES)}")
            assoc = _names(bc.attrs["associated_dims"])
            mask = self._require(bc, "mask", "where the boundary condition applies")
            lead = int(_flag(bc.attrs, "sample_varying", where, False)) + int(
                _flag(bc.attrs, "time_varying", where, False)
            )
            if mask.ndim != lead + len(assoc):
                raise DataError(
                    f"{where}: mask has {mask.ndim} dimensions but associated_dims is {assoc} "
                    f"(plus {lead} sample/time axes)"
                )
            check_stored(mask, f"{where}/mask")
            aggregate = np.all if bc_type == "WALL" else np.any
            for i, dim in enumerate(assoc):
                if dim not in ends:
                    raise DataError(f"{where}: associated dim {dim!r} is not one of {self.spatial_dims}")
                axis = lead + i
                size = self.shape[self.spatial_dims.index(dim)]
                if mask.shape[axis] != size:
                    raise DataError(f"{where}: mask has {mask.shape[axis]} entries along {dim!r}, not {size}")
                for end, index in ((0, 0), (1, size - 1)):
                    sel = tuple(index if a == axis else slice(None) for a in range(mask.ndim))
                    if aggregate(np.asarray(mask[sel], dtype=bool)):
                        ends[dim][end] = BC_CODES[bc_type]
        return tuple((ends[d][0], ends[d][1]) for d in self.spatial_dims)

    def _read_scalars(self, f: h5py.File) -> dict[str, tuple[np.ndarray, bool]]:
        out: dict[str, tuple[np.ndarray, bool]] = {}
        if "scalars" not in f:
            return out
        group = self._require(f, "scalars", kind=h5py.Group)
        for name in _names(group.attrs.get("field_names", [])):
            ds = self._require(group, name, "listed in scalars.field_names")
            where = f"{self.path}: scalars/{name}"
            if _flag(ds.attrs, "time_varying", where, False):
                continue  # time-varying scalars are not model inputs here
            sample_varying = _flag(ds.attrs, "sample_varying", where, False)
            check_stored(ds, where)
            if ds.size > (self.n_trajectories if sample_varying else 1):
                raise DataError(f"{where}: shape {ds.shape} holds more than one value per trajectory")
            out[name] = (np.asarray(ds[()], dtype=np.float64), sample_varying)
        return out

    def parameters(self, trajectory: int) -> dict[str, float]:
        """Constant scalars (PDE parameters) of one trajectory."""
        params = {}
        for name, (values, sample_varying) in self._scalars.items():
            value = values.reshape(-1)[trajectory] if sample_varying and values.size > 1 else values
            if np.size(value) == 1:
                params[name] = float(np.asarray(value).reshape(()))
        return params

    def times(self, trajectory: int, start: int, length: int) -> np.ndarray:
        """Times of steps [start, start+length) of one trajectory (`time` may be per trajectory)."""
        with h5py.File(self.path, "r") as f:
            t = f["dimensions"]["time"]
            steps = slice(start, start + length)
            values = t[trajectory, steps] if self._time_sample_varying else t[steps]
            return np.asarray(values, dtype=np.float64)

    def window(self, trajectory: int, start: int, length: int) -> np.ndarray:
        """Steps [start, start+length) of one trajectory as float32 (length, C, X, Y)."""
        if not (0 <= trajectory < self.n_trajectories) or start < 0 or start + length > self.n_steps:
            raise IndexError(f"window ({trajectory}, {start}, {length}) outside {self.path}")
        out = np.empty((length, len(self.field_names), *self.shape), dtype=np.float32)
        channel = 0
        with h5py.File(self.path, "r") as f:
            for spec in self.fields:
                ds = f[spec.group][spec.name]
                index: tuple = ()
                if spec.sample_varying:
                    index += (trajectory,)
                if spec.time_varying:
                    index += (slice(start, start + length),)
                data = np.asarray(ds[index], dtype=np.float32)
                if not spec.time_varying:
                    data = data[None]
                # Re-insert spatial axes a field does not vary along (unless stored with size 1).
                for axis, used in enumerate(spec.dim_varying):
                    if not used and not spec.singleton_axes:
                        data = np.expand_dims(data, 1 + axis)
                data = np.broadcast_to(data, (length, *self.shape, *([2] * spec.order)))
                data = data.reshape(length, *self.shape, -1)  # flatten tensor components (row-major, as Well)
                n = len(spec.channels)
                out[:, channel : channel + n] = np.moveaxis(data, -1, 1)
                channel += n
        return out


def find_split_files(dataset_dir: str | Path) -> dict[str, list[Path]]:
    """`<dataset>/data/<split>/*.h5|*.hdf5` per split (only splits that exist)."""
    root = Path(dataset_dir) / "data"
    out = {}
    for split in SPLITS:
        d = root / split
        if d.is_dir():
            files = sorted([*d.glob("*.hdf5"), *d.glob("*.h5")])
            if files:
                out[split] = files
    return out
