"""Small files in the layouts the builders of The Well and PDEBench write, key for key and dtype for
dtype. Each writer names the builder code it follows; arrays are returned so that tests can check
that values come back bit for bit."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

STR = h5py.string_dtype()


def _bool_flags(node, sample_varying: bool, time_varying: bool) -> None:
    node.attrs["sample_varying"] = sample_varying
    node.attrs["time_varying"] = time_varying


def _boundary(group, name, bc_type, dims, mask, sample_varying=False, time_varying=False):
    """One `boundary_conditions/<name>` group as the_well's docs/data_format.md specifies it."""
    g = group.create_group(name)
    g.attrs["bc_type"] = bc_type
    g.attrs["associated_dims"] = list(dims)
    g.attrs["associated_fields"] = []
    _bool_flags(g, sample_varying, time_varying)
    g.create_dataset("mask", data=mask)
    g.create_dataset("values", data=np.zeros(int(mask.sum()), dtype=np.float32))


def write_well(
    path: str | Path,
    *,
    n_traj: int = 2,
    steps: int = 6,
    nx: int = 8,
    ny: int = 4,
    dropped_axes: bool = True,
    per_trajectory_time: bool = False,
    grid_type: str = "cartesian",
    n_spatial_dims: int = 2,
    dataset_name: str = "layout_test",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A Well file with every kind of field docs/data_format.md lists (the_well,
    docs/data_format.md; scripts/check_thewell_formatting.py for the shapes it accepts):

    - `tracer` (t0): sample-, time- and space-varying, (N, T, X, Y);
    - `obstacle` (t0): constant (`time_varying=False`), (N, X, Y);
    - `inflow` (t0): varies along x only (`dim_varying=[True, False]`): (N, T, X) when
      `dropped_axes` (the checker's shape), (N, T, X, 1) otherwise (what WellDataset tiles);
    - `forcing` (t0): sample-invariant (`sample_varying=False`), (T, X, Y);
    - `velocity` (t1): (N, T, X, Y, 2); `stress` (t2, `symmetric` attrs): (N, T, X, Y, 2, 2);
    - scalars: a constant parameter `Re` (also a root attribute listed in `simulation_parameters`),
      a per-trajectory `amplitude` (N,) and a time-varying `energy` (T,);
    - boundaries: x periodic at both ends; y a wall at the low end and open at the high end (two
      groups whose masks differ), so the two ends of y differ.
    """
    rng = np.random.default_rng(seed)
    n, t = n_traj, steps
    inflow_shape = (n, t, nx) if dropped_axes else (n, t, nx, 1)
    arrays = {
        "tracer": rng.standard_normal((n, t, nx, ny)).astype(np.float32),
        "obstacle": (rng.random((n, nx, ny)) > 0.7).astype(np.float32),
        "inflow": rng.standard_normal(inflow_shape).astype(np.float32),
        "forcing": rng.standard_normal((t, nx, ny)).astype(np.float32),
        "velocity": rng.standard_normal((n, t, nx, ny, 2)).astype(np.float32),
        "stress": rng.standard_normal((n, t, nx, ny, 2, 2)).astype(np.float32),
        "amplitude": rng.random(n).astype(np.float32),
        "energy": rng.random(t).astype(np.float32),
        "time": (
            (0.1 * np.arange(t)[None] + np.arange(n)[:, None]).astype(np.float32)
            if per_trajectory_time
            else (0.1 * np.arange(t)).astype(np.float32)
        ),
    }
    with h5py.File(path, "w") as f:
        f.attrs["dataset_name"] = dataset_name
        f.attrs["grid_type"] = grid_type
        f.attrs["n_spatial_dims"] = n_spatial_dims
        f.attrs["n_trajectories"] = n
        f.attrs["simulation_parameters"] = ["Re"]
        f.attrs["Re"] = 100.0

        dims = f.create_group("dimensions")
        names = ["x", "y", "z"][:n_spatial_dims]
        dims.attrs["spatial_dims"] = names
        time = dims.create_dataset("time", data=arrays["time"])
        _bool_flags(time, per_trajectory_time, True)
        for name, size in zip(names, (nx, ny, 3), strict=False):
            _bool_flags(
                dims.create_dataset(name, data=np.linspace(0, 1, size, dtype=np.float32)), False, False
            )

        bcs = f.create_group("boundary_conditions")
        periodic = np.zeros(nx, bool)
        periodic[[0, -1]] = True
        _boundary(bcs, "x_periodic", "PERIODIC", ["x"], periodic)
        wall = np.zeros(ny, bool)
        wall[0] = True
        _boundary(bcs, "y_wall", "WALL", ["y"], wall)
        _boundary(bcs, "y_open", "OPEN", ["y"], wall[::-1].copy())

        scalars = f.create_group("scalars")
        scalars.attrs["field_names"] = ["Re", "amplitude", "energy"]
        _bool_flags(scalars.create_dataset("Re", data=np.float32(100.0)), False, False)
        _bool_flags(scalars.create_dataset("amplitude", data=arrays["amplitude"]), True, False)
        _bool_flags(scalars.create_dataset("energy", data=arrays["energy"]), False, True)

        spec = {  # name: (order, dim_varying, sample_varying, time_varying)
            "tracer": (0, [True, True], True, True),
            "obstacle": (0, [True, True], True, False),
            "inflow": (0, [True, False], True, True),
            "forcing": (0, [True, True], False, True),
            "velocity": (1, [True, True], True, True),
            "stress": (2, [True, True], True, True),
        }
        groups = {order: f.create_group(f"t{order}_fields") for order in range(3)}
        for order in range(3):
            groups[order].attrs["field_names"] = [k for k, v in spec.items() if v[0] == order]
        for name, (order, dim_varying, sample_varying, time_varying) in spec.items():
            d = groups[order].create_dataset(name, data=arrays[name])
            d.attrs["dim_varying"] = np.array(dim_varying)
            _bool_flags(d, sample_varying, time_varying)
            if order == 2:
                d.attrs["symmetric"] = False
                d.attrs["antisymmetric"] = False
    return arrays


def write_planetswe(
    path: str | Path, steps: int = 5, n_theta: int = 4, n_phi: int = 8
) -> dict[str, np.ndarray]:
    """An equiangular file exactly as the_well's datasets/planetswe/generation/
    interpolate_swe_data.py writes it: spatial dims (theta, phi), `time` with only
    `sample_varying`, empty `simulation_parameters` and scalars, a periodic group on phi named
    `x_periodic` and an open group on theta named `y_open` (no `values`), one trajectory."""
    rng = np.random.default_rng(1)
    height = rng.standard_normal((1, steps, n_theta, n_phi)).astype(np.float32)
    velocity = rng.standard_normal((1, steps, n_theta, n_phi, 2)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_group("dimensions").attrs["spatial_dims"] = ["phi", "theta"]
        f.attrs["dataset_name"] = "dataset"
        f.attrs["n_spatial_dims"] = 3
        f.attrs["simulation_parameters"] = []
        f.attrs["grid_type"] = "cartesian"
        for group in ("t0_fields", "t1_fields", "t2_fields", "scalars"):
            f.create_group(group).attrs["field_names"] = []
        f.attrs["dataset_name"] = "planetswe"
        f.attrs["n_spatial_dims"] = 2
        f.attrs["simulation_parameters"] = []
        f.attrs["grid_type"] = "equiangular"
        f.attrs["n_trajectories"] = 1
        f["scalars"].attrs["field_names"] = f.attrs["simulation_parameters"]
        f["dimensions"].attrs["spatial_dims"] = ["theta", "phi"]
        time = f["dimensions"].create_dataset("time", data=np.arange(steps, dtype=np.float64), dtype="f4")
        time.attrs["sample_varying"] = False
        for name, size in (("phi", n_phi), ("theta", n_theta)):
            d = f["dimensions"].create_dataset(name, data=np.linspace(0, 3, size), dtype="f4")
            d.attrs["time_varying"] = False
            d.attrs["sample_varying"] = False
        f["t0_fields"].attrs["field_names"] = ["height"]
        d = f["t0_fields"].create_dataset("height", data=height, dtype="f4")
        d.attrs.update(time_varying=True, sample_varying=True, dim_varying=[True, True])
        f["t1_fields"].attrs["field_names"] = ["velocity"]
        d = f["t1_fields"].create_dataset("velocity", data=velocity, dtype="f4")
        d.attrs.update(time_varying=True, sample_varying=True, dim_varying=[True, True])
        f["t2_fields"].attrs["field_names"] = []
        bcs = f.create_group("boundary_conditions")
        for name, dim, kind, size in (
            ("x_periodic", "phi", "PERIODIC", n_phi),
            ("y_open", "theta", "OPEN", n_theta),
        ):
            g = bcs.create_group(name)
            g.attrs["associated_dims"] = [dim]
            g.attrs["bc_type"] = kind
            g.attrs["associated_fields"] = []
            g.attrs["sample_varying"] = False
            g.attrs["time_varying"] = False
            mask = np.zeros(size, dtype=bool)
            mask[0] = mask[-1] = True
            g.create_dataset("mask", data=mask, dtype=bool)
    return {"height": height, "velocity": velocity}


def write_well_tree(
    base: str | Path, name: str, splits=("train", "valid", "test"), **kwargs
) -> dict[str, Path]:
    """`<base>/datasets/<name>/data/<split>/<name>_<split>.hdf5`, the layout the_well's download
    tool (`the-well-download --base-path`) creates."""
    out = {}
    for i, split in enumerate(splits):
        folder = Path(base) / "datasets" / name / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        out[split] = folder / f"{name}_{split}.hdf5"
        write_well(out[split], dataset_name=name, seed=i, **kwargs)
    return out


# ----------------------------------------------------------------------------- PDEBench


def write_rdb(path: str | Path, n: int = 3, steps: int = 6, nx: int = 8, ny: int = 8) -> np.ndarray:
    """Shallow water `2D_rdb_NA_NA.h5` as pdebench/data_gen/gen_radial_dam_break.py writes it with
    src/sim_radial_dam_break.py `save_state_to_disk`: per seed `"0000"`, `data` (T+1, X, Y, 1)
    stored as "f", `grid/x`, `grid/y` (cell centres), `grid/t` (T+1), and the group's `config`
    attribute (the Hydra config as YAML)."""
    rng = np.random.default_rng(2)
    data = (1 + rng.random((n, steps, nx, ny, 1))).astype(np.float64)  # the solver's float64 lists
    with h5py.File(path, "a") as f:
        for i in range(n):
            seed = str(i).zfill(4)
            f.create_dataset(f"{seed}/data", data=data[i], dtype="f")
            f.create_dataset(f"{seed}/grid/x", data=np.linspace(-2.5, 2.5, nx), dtype="f")
            f.create_dataset(f"{seed}/grid/y", data=np.linspace(-2.5, 2.5, ny), dtype="f")
            f.create_dataset(f"{seed}/grid/t", data=np.linspace(0.0, 1.0, steps), dtype="f")
            f[seed].attrs["config"] = f"sim:\n  seed: {i}\n  dam_radius: 0.5\n"
    return data.astype(np.float32)


def write_diff_react(path: str | Path, n: int = 2, steps: int = 6, nx: int = 8, ny: int = 8) -> np.ndarray:
    """Diffusion–reaction `2D_diff-react_NA_NA.h5` as pdebench/data_gen/gen_diff_react.py writes
    it: `<seed>/data` (T, Y, X, 2) float32 (src/sim_diff_react.py reshapes to (t, y, x)) and
    `<seed>/grid/{x,y,t}`, all lzf-compressed, plus the group's `config` attribute."""
    rng = np.random.default_rng(3)
    data = rng.standard_normal((n, steps, ny, nx, 2))
    with h5py.File(path, "a") as f:
        for i in range(n):
            seed = str(i).zfill(4)
            f.create_dataset(f"{seed}/data", data=data[i], dtype="float32", compression="lzf")
            f.create_dataset(
                f"{seed}/grid/x", data=np.linspace(-1, 1, nx), dtype="float32", compression="lzf"
            )
            f.create_dataset(
                f"{seed}/grid/y", data=np.linspace(-1, 1, ny), dtype="float32", compression="lzf"
            )
            f.create_dataset(
                f"{seed}/grid/t", data=np.linspace(0, 5, steps), dtype="float32", compression="lzf"
            )
            f[seed].attrs["config"] = f"sim:\n  seed: {i}\n"
    return data.astype(np.float32)


def write_cfd(
    path: str | Path, n: int = 2, steps: int = 5, nx: int = 8, ny: int = 8, vz: bool = False
) -> dict:
    """Compressible NS as pdebench/data_gen/data_gen_NLE/Data_Merge.py `merge` writes it:
    `density`, `pressure`, `Vx`, `Vy` (N, T, X, Y) float32, `y-coordinate`, `x-coordinate`,
    `t-coordinate` (T+1 entries, CFD_multi_Hydra.py's `tc`), root attributes `eta`, `zeta`, `M`;
    `vz` adds the 3-D keys."""
    rng = np.random.default_rng(4)
    arrays = {
        k: rng.standard_normal((n, steps, nx, ny)).astype(np.float32)
        for k in ("density", "pressure", "Vx", "Vy")
    }
    with h5py.File(path, "w") as f:
        for key in ("density", "pressure", "Vx", "Vy"):
            f.create_dataset(key, data=arrays[key])
        f.create_dataset("y-coordinate", data=np.linspace(0, 1, ny, dtype=np.float32))
        if vz:
            f.create_dataset("Vz", data=arrays["Vx"])
            f.create_dataset("z-coordinate", data=np.linspace(0, 1, 2, dtype=np.float32))
        f.create_dataset("x-coordinate", data=np.linspace(0, 1, nx, dtype=np.float32))
        f.create_dataset("t-coordinate", data=0.05 * np.arange(steps + 1, dtype=np.float32))
        f.attrs["eta"] = 0.01
        f.attrs["zeta"] = 0.01
        f.attrs["M"] = 0.1
    return arrays


def write_ins(path: str | Path, n: int = 2, steps: int = 5, nx: int = 8, ny: int = 8) -> dict:
    """Incompressible NS `ns_incom_inhom_2d_<n>-<seed>.h5` as pdebench/data_gen/src/data_io.py
    `h5_for` creates it (filled by sim_ns_incomp_2d.py): `velocity` (N, T, X, Y, 2), `particles`
    (N, T, X, Y, 1), `force` (N, X, Y, 2), `t` (N, T), all float32 with lzf, shuffle and chunks of
    (1, 1, ...); root attributes `config` and `latestIndex`."""
    rng = np.random.default_rng(5)
    spec = {
        "velocity": (n, steps, nx, ny, 2),
        "particles": (n, steps, nx, ny, 1),
        "force": (n, nx, ny, 2),
        "t": (n, steps),
    }
    arrays = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in spec.items()}
    arrays["t"] = np.tile(np.arange(steps, dtype=np.float32) * 0.005, (n, 1))
    with h5py.File(path, "a") as f:
        f.attrs["config"] = "sim_name: ns_sim_2d\nseed: 0\n"
        f.attrs["latestIndex"] = -1
        for name, shape in spec.items():
            ds = f.require_dataset(
                name, shape, "float32", compression="lzf", chunks=(1, 1, *shape[2:]), shuffle=True
            )
            ds[...] = arrays[name]
        f.attrs["latestIndex"] = steps - 1
    return arrays


def write_pdebench_1d(path: str | Path) -> None:
    """A 1-D PDEBench file as Data_Merge.py `transform` writes it: `tensor` (N, T, X),
    `x-coordinate`, `t-coordinate`, root attribute `beta` (advection)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("tensor", data=np.zeros((2, 5, 16), np.float32))
        f.create_dataset("x-coordinate", data=np.linspace(0, 1, 16, dtype=np.float32))
        f.create_dataset("t-coordinate", data=np.linspace(0, 1, 6, dtype=np.float32))
        f.attrs["beta"] = 0.1
