"""Real Well and PDEBench layouts (fixtures in `layouts.py`, written as the builders write them):
values come back bit for bit, boundary ends are kept, unusable data sets are skipped with a reason,
and malformed or hostile files (complex values, sparse declared sizes) get one clear error."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from encoders.mpp.sources import open_source
from encoders.mpp.well import OPEN, PERIODIC, WALL, SkippedSource, WellFile
from foundation.cli import main
from foundation.errors import DataError
from tests.mpp import mpp_layouts as layouts


def _expected_well_window(arrays, traj, start, length, dropped_axes=True):
    """The (T, C, X, Y) window The Well's own broadcasting rules give for `layouts.write_well`."""
    steps = slice(start, start + length)
    inflow = arrays["inflow"][traj, steps]
    inflow = inflow[..., None] if dropped_axes else inflow
    nx, ny = arrays["tracer"].shape[2:]
    channels = [
        arrays["tracer"][traj, steps],
        np.broadcast_to(arrays["obstacle"][traj], (length, nx, ny)),
        np.broadcast_to(inflow, (length, nx, ny)),
        arrays["forcing"][steps],
        *(arrays["velocity"][traj, steps, ..., i] for i in range(2)),
        *(arrays["stress"][traj, steps, ..., i, j] for i in range(2) for j in range(2)),
    ]
    return np.stack(channels, axis=1)


CHANNELS = [
    "tracer",
    "obstacle",
    "inflow",
    "forcing",
    "velocity_x",
    "velocity_y",
    "stress_xx",
    "stress_xy",
    "stress_yx",
    "stress_yy",
]


@pytest.mark.parametrize("dropped_axes", [True, False])
@pytest.mark.parametrize("per_trajectory_time", [False, True])
def test_every_well_field_kind_reads_bit_for_bit(tmp_path, dropped_axes, per_trajectory_time):
    path = tmp_path / "a.hdf5"
    arrays = layouts.write_well(path, dropped_axes=dropped_axes, per_trajectory_time=per_trajectory_time)
    src = WellFile(path)
    assert src.field_names == CHANNELS and src.shape == (8, 4) and src.n_steps == 6
    assert src.bc_ends == ((PERIODIC, PERIODIC), (WALL, OPEN)) and src.bc == (PERIODIC, WALL)
    for traj, start in ((0, 0), (1, 2)):
        expected = _expected_well_window(arrays, traj, start, 4, dropped_axes)
        np.testing.assert_array_equal(src.window(traj, start, 4), expected, strict=True)
        time = arrays["time"][traj] if per_trajectory_time else arrays["time"]
        np.testing.assert_array_equal(src.times(traj, start, 4), time[start : start + 4].astype(np.float64))
    assert src.parameters(1) == {"Re": 100.0, "amplitude": float(arrays["amplitude"][1])}


def test_kept_singleton_axes_match_the_wells_dataset_class(tmp_path):
    from the_well.data import WellDataset

    folder = tmp_path / "layout_test" / "data" / "train"
    folder.mkdir(parents=True)
    layouts.write_well(folder / "a.hdf5", dropped_axes=False, per_trajectory_time=True)
    src = WellFile(folder / "a.hdf5")
    ds = WellDataset(
        path=str(tmp_path / "layout_test"), well_split_name="train", n_steps_input=2, n_steps_output=1
    )
    sample = ds[4 + 1]  # trajectory 1, start 1 (4 windows per trajectory)
    window = src.window(1, 1, 3)
    theirs = torch.cat([sample["input_fields"], sample["output_fields"]]).numpy().transpose(0, 3, 1, 2)
    names = [n for order in range(3) for n in ds.metadata.field_names[order]]
    for j, name in enumerate(names):
        np.testing.assert_array_equal(window[:, src.field_names.index(name)], theirs[:, j])
    constant = sample["constant_fields"].numpy()[..., 0]
    np.testing.assert_array_equal(window[0, src.field_names.index("obstacle")], constant)
    assert sample["boundary_conditions"].tolist() == [list(ends) for ends in src.bc_ends]


def _the_wells_checker():
    """the_well's scripts/check_thewell_formatting.py (not part of its package): set
    THE_WELL_CHECKER to its path to run this test."""
    path = os.environ.get("THE_WELL_CHECKER")
    if not path or not Path(path).is_file():
        pytest.skip("THE_WELL_CHECKER does not name the_well's scripts/check_thewell_formatting.py")
    spec = importlib.util.spec_from_file_location("check_thewell_formatting", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_hdf5_format


def test_fixtures_pass_the_wells_format_checker(tmp_path, capsys):
    check = _the_wells_checker()
    for per_trajectory_time in (False, True):
        path = tmp_path / f"dropped-{per_trajectory_time}.hdf5"
        layouts.write_well(path, dropped_axes=True, per_trajectory_time=per_trajectory_time)
        check(str(path))
    from encoders.mpp.solvers import SYSTEMS
    from encoders.mpp.well import write_simulation

    sim = SYSTEMS["shallow_water"](np.random.default_rng(0), 2, 8, 4)
    check(str(write_simulation(sim, tmp_path / "synth.hdf5")))  # what `synth mpp` writes
    kept = tmp_path / "kept.hdf5"
    layouts.write_well(kept, dropped_axes=False)
    with pytest.raises(AssertionError, match="inflow"):  # the checker wants the axis dropped
        check(str(kept))


def test_equiangular_planetswe_layout(tmp_path):
    from the_well.data import WellDataset

    folder = tmp_path / "planetswe" / "data" / "test"
    folder.mkdir(parents=True)
    arrays = layouts.write_planetswe(folder / "planetswe_IC40_0.h5")
    src = open_source(folder / "planetswe_IC40_0.h5")
    assert src.grid_type == "equiangular" and src.shape == (4, 8)
    assert src.field_names == ["height", "velocity_theta", "velocity_phi"]
    assert src.bc_ends == ((OPEN, OPEN), (PERIODIC, PERIODIC)) and src.parameters(0) == {}
    window = src.window(0, 1, 3)
    np.testing.assert_array_equal(window[:, 0], arrays["height"][0, 1:4])
    np.testing.assert_array_equal(window[:, 1:], arrays["velocity"][0, 1:4].transpose(0, 3, 1, 2))
    ds = WellDataset(
        path=str(tmp_path / "planetswe"), well_split_name="test", n_steps_input=2, n_steps_output=1
    )
    assert ds[0]["boundary_conditions"].tolist() == [[OPEN, OPEN], [PERIODIC, PERIODIC]]


def test_sample_and_time_varying_boundary_masks(tmp_path):
    path = tmp_path / "a.hdf5"
    layouts.write_well(path)
    with h5py.File(path, "a") as f:
        del f["boundary_conditions/y_open"]
        mask = np.zeros((2, 6, 4), bool)
        mask[1, 3, -1] = True  # open at the high y end in one sample and step
        g = f["boundary_conditions"].create_group("y_open")
        g.attrs.update(bc_type="OPEN", associated_dims=["y"], associated_fields=[], sample_varying=True)
        g.attrs["time_varying"] = True
        g.create_dataset("mask", data=mask)
        del f["boundary_conditions/y_wall"]
    assert WellFile(path).bc_ends == ((PERIODIC, PERIODIC), (OPEN, OPEN))


# ----------------------------------------------------------------------------- prepare on a Well base


@pytest.mark.slow
def test_prepare_a_well_base_folder_skips_what_it_cannot_use(tmp_path, capsys):
    from foundation.data import Manifest, ShardDataset

    base = tmp_path / "the_well"
    files = layouts.write_well_tree(base, "flow", per_trajectory_time=True)
    layouts.write_well_tree(base, "cube", n_spatial_dims=3)
    layouts.write_well_tree(base, "sphere", grid_type="spherical")
    short = layouts.write_well_tree(base, "brief", splits=("train",), steps=3)
    out = tmp_path / "shards"
    assert main(["prepare", "mpp", str(base), "--out", str(out), "--history", "3", "--stride", "2"]) == 0
    printed = capsys.readouterr().out
    assert "flow: test 4, train 4, valid 4" in printed  # 2 trajectories x 2 windows
    assert "skipped cube: n_spatial_dims is 3" in printed
    assert "skipped sphere: grid_type 'spherical'" in printed
    assert "skipped 1 file(s) with fewer steps than the window" in printed
    info = Manifest.load(out).extra["mpp"]
    assert set(info["skipped"]) == {"cube", "sphere"} and info["short_files"] == [str(short["train"])]
    flow = info["datasets"]["flow"]
    assert flow["samples"] == {"train": 4, "valid": 4, "test": 4}  # The Well's own folders
    assert flow["bc"] == [PERIODIC, WALL] and flow["bc_ends"] == [[PERIODIC, PERIODIC], [WALL, OPEN]]
    samples = [
        s
        for batch in ShardDataset(
            out, split="test", batch_size=4, shuffle=False, epochs=1, drop_last=False, collate_fn=list
        )
        for s in batch
    ]
    sample = next(s for s in samples if (s["meta"]["trajectory"], s["meta"]["start"]) == (1, 2))
    assert sample["meta"]["bc_ends"] == [[PERIODIC, PERIODIC], [WALL, OPEN]]
    assert sample["bcs"].tolist() == [PERIODIC, WALL]
    with h5py.File(files["test"]) as f:
        assert sample["meta"]["time"] == [float(t) for t in f["dimensions/time"][1, 2:6]]
        np.testing.assert_array_equal(sample["fields"][:, 0], f["t0_fields/tracer"][1, 2:6])


def test_prepare_stops_when_nothing_is_usable(tmp_path):
    layouts.write_well_tree(tmp_path / "w", "cube", splits=("train",), n_spatial_dims=3)
    with pytest.raises(DataError, match="nothing to prepare: cube: n_spatial_dims is 3"):
        main(["-v", "prepare", "mpp", str(tmp_path / "w"), "--out", str(tmp_path / "s")])


# ----------------------------------------------------------------------------- PDEBench


def test_pdebench_layouts_read_bit_for_bit(tmp_path):
    swe = layouts.write_rdb(tmp_path / "2D_rdb_NA_NA.h5")
    s = open_source(tmp_path / "2D_rdb_NA_NA.h5")
    assert s.dataset_name == "pdebench_shallow_water" and s.field_names == ["height"]
    assert s.bc_ends == ((OPEN, OPEN), (OPEN, OPEN)) and s.n_trajectories == 3  # pyclaw extrap
    np.testing.assert_array_equal(s.window(2, 1, 4), swe[2, 1:5].transpose(0, 3, 1, 2), strict=True)
    np.testing.assert_array_equal(s.times(2, 1, 4), np.linspace(0.0, 1.0, 6, dtype=np.float32)[1:5])

    dr = layouts.write_diff_react(tmp_path / "2D_diff-react_NA_NA.h5")
    d = open_source(tmp_path / "2D_diff-react_NA_NA.h5")
    assert d.field_names == ["activator", "inhibitor"] and d.bc == (OPEN, OPEN)  # zero-flux Neumann
    np.testing.assert_array_equal(d.window(1, 0, 6), dr[1].transpose(0, 3, 1, 2), strict=True)

    name = "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_8_Train.hdf5"
    cfd = layouts.write_cfd(tmp_path / name)
    c = open_source(tmp_path / name)
    assert c.field_names == ["velocity_x", "velocity_y", "density", "pressure"] and c.bc == (
        PERIODIC,
        PERIODIC,
    )
    assert c.parameters(0) == {"M": 0.1, "eta": 0.01, "zeta": 0.01}
    expected = np.stack([cfd[k][1, 2:5] for k in ("Vx", "Vy", "density", "pressure")], axis=1)
    np.testing.assert_array_equal(c.window(1, 2, 3), expected, strict=True)
    np.testing.assert_array_equal(c.times(0, 2, 3), (0.05 * np.arange(6, dtype=np.float32))[2:5])

    ins = layouts.write_ins(tmp_path / "ns_incom_inhom_2d_8-0.h5")
    i = open_source(tmp_path / "ns_incom_inhom_2d_8-0.h5")
    assert i.field_names == ["velocity_x", "velocity_y", "particles", "force_x", "force_y"]
    assert i.bc_ends == ((WALL, WALL), (WALL, WALL))  # phiflow ZERO velocity: no-slip box
    w = i.window(1, 1, 3)
    np.testing.assert_array_equal(w[:, :2], ins["velocity"][1, 1:4].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(w[:, 2], ins["particles"][1, 1:4, ..., 0])
    np.testing.assert_array_equal(w[2, 3:], ins["force"][1].transpose(2, 0, 1))
    np.testing.assert_array_equal(i.times(1, 1, 3), ins["t"][1, 1:4])


@pytest.mark.parametrize(
    "name, ends",
    [
        ("2D_CFD_Rand_M1.0_Eta0.1_Zeta0.1_trans_8_Train.hdf5", ((OPEN, OPEN), (OPEN, OPEN))),
        ("KH_M01_dk1_Re1e3.hdf5", ((PERIODIC, PERIODIC), (OPEN, OPEN))),
        ("2D_shock.hdf5", ((OPEN, OPEN), (OPEN, OPEN))),
        ("OTVortex.hdf5", ((PERIODIC, PERIODIC), (PERIODIC, PERIODIC))),
    ],
)
def test_cfd_boundaries_follow_the_generators_bc(tmp_path, name, ends):
    layouts.write_cfd(tmp_path / name)
    assert open_source(tmp_path / name).bc_ends == ends


def test_pdebench_files_mpp_cannot_use_are_skipped_with_a_reason(tmp_path):
    layouts.write_cfd(tmp_path / "3D_CFD_Rand_M1.0_Eta1e-08_Zeta1e-08_periodic_Train.hdf5", vz=True)
    layouts.write_pdebench_1d(tmp_path / "1D_Advection_Sols_beta0.1.hdf5")
    layouts.write_cfd(tmp_path / "2D_CFD_mystery.hdf5")
    reasons = {}
    for path in sorted(tmp_path.iterdir()):
        with pytest.raises(SkippedSource) as info:
            open_source(path)
        reasons[path.name] = info.value.reason
    assert "3-D" in reasons["3D_CFD_Rand_M1.0_Eta1e-08_Zeta1e-08_periodic_Train.hdf5"]
    assert "1-D" in reasons["1D_Advection_Sols_beta0.1.hdf5"]
    assert "boundary condition unknown" in reasons["2D_CFD_mystery.hdf5"]


# ----------------------------------------------------------------------------- hostile files


def test_complex_fields_are_refused_not_cast(tmp_path):
    path = tmp_path / "a.hdf5"
    layouts.write_well(path)
    with h5py.File(path, "a") as f:
        old = f["t0_fields/tracer"]
        attrs = dict(old.attrs)
        data = old[()] + 1j
        del f["t0_fields/tracer"]
        f["t0_fields"].create_dataset("tracer", data=data).attrs.update(attrs)
    with pytest.raises(DataError, match=r"t0_fields/tracer: complex values.*_re and <name>_im"):
        WellFile(path)
    cfd = tmp_path / "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_8_Train.hdf5"
    layouts.write_cfd(cfd)
    with h5py.File(cfd, "a") as f:
        data = f["pressure"][()].astype(np.complex64)
        del f["pressure"]
        f["pressure"] = data
    with pytest.raises(DataError, match="pressure: complex values"):
        open_source(cfd)


def _sparse_well(path, steps):
    """A Well file whose `time` and fields declare `steps` steps in chunks that are never written."""
    layouts.write_well(path, n_traj=1, steps=6)
    with h5py.File(path, "a") as f:
        for key in ("dimensions/time", "t0_fields/tracer"):
            old = f[key]
            attrs, shape = dict(old.attrs), old.shape
            del f[key]
            new_shape = (steps,) if old.ndim == 1 else (1, steps, *shape[2:])
            chunks = (1024,) if old.ndim == 1 else (1, 1, *shape[2:])
            f.create_dataset(key, shape=new_shape, dtype="f4", chunks=chunks).attrs.update(attrs)
        for group in ("t0_fields", "t1_fields", "t2_fields"):
            f[group].attrs["field_names"] = ["tracer"] if group == "t0_fields" else []
        f["scalars"].attrs["field_names"] = ["Re"]


@pytest.mark.slow
def test_sparse_declared_steps_are_refused_within_a_memory_bound(tmp_path):
    path = tmp_path / "bomb" / "data" / "train" / "bomb.hdf5"
    path.parent.mkdir(parents=True)
    _sparse_well(path, 2**31)
    assert path.stat().st_size < 100_000
    with pytest.raises(
        DataError, match=r"dimensions/time: declares shape \(2147483648,\).*chunks are stored"
    ):
        WellFile(path)
    child = textwrap.dedent(
        f"""
        import resource, sys
        from foundation.cli import main
        import encoders.mpp.prepare, foundation.data
        vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
        limit = vm * 1024 + (1 << 30)  # 1 GiB above what the imports took
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.exit(main(["prepare", "mpp", {str(path.parents[2])!r}, "--out", {str(tmp_path / "s")!r}]))
        """
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "chunks are stored" in done.stderr
    assert not (tmp_path / "s").exists()


def test_unwritten_contiguous_fields_are_refused(tmp_path):
    path = tmp_path / "a.hdf5"
    layouts.write_well(path)
    with h5py.File(path, "a") as f:
        attrs = dict(f["t1_fields/velocity"].attrs)
        shape = f["t1_fields/velocity"].shape
        del f["t1_fields/velocity"]
        f["t1_fields"].create_dataset("velocity", shape=shape, dtype="f4").attrs.update(attrs)
    with pytest.raises(DataError, match="t1_fields/velocity: declares shape .* stores only 0 bytes"):
        WellFile(path)


def _replace(f, key, **kwargs):
    attrs = dict(f[key].attrs)
    del f[key]
    f.create_dataset(key, **kwargs).attrs.update(attrs)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.attrs.__setitem__("n_spatial_dims", "two"),
        lambda f: f.attrs.__setitem__("n_trajectories", [1, 2]),
        lambda f: f.attrs.__setitem__("dataset_name", []),
        lambda f: f["t0_fields/tracer"].attrs.__setitem__("sample_varying", "False"),
        lambda f: f["t0_fields/inflow"].attrs.__setitem__("dim_varying", "yes"),
        lambda f: (f.__delitem__("t2_fields"), f.create_dataset("t2_fields", data=[1.0])),
        lambda f: (
            f.__delitem__("boundary_conditions/y_wall/mask"),
            f.create_group("boundary_conditions/y_wall/mask"),
        ),
        lambda f: (
            f.__delitem__("t0_fields/tracer"),
            f.__setitem__("t0_fields/tracer", h5py.SoftLink("/nowhere")),
        ),
        lambda f: _replace(f, "dimensions/y", data=np.zeros(0, np.float32)),
        lambda f: _replace(f, "scalars/amplitude", data=np.array([b"a", b"b"])),
        lambda f: _replace(f, "boundary_conditions/y_wall/mask", data=np.zeros(3, bool)),
    ],
)
def test_hostile_well_attributes_get_one_line_errors(tmp_path, capsys, mutate):
    path = tmp_path / "w" / "data" / "train" / "a.hdf5"
    path.parent.mkdir(parents=True)
    layouts.write_well(path)
    with h5py.File(path, "a") as f:
        mutate(f)
    assert main(["prepare", "mpp", str(tmp_path / "w"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and err.count("\n") == 1, err


def test_sparse_pdebench_datasets_are_refused(tmp_path):
    name = "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_8_Train.hdf5"
    layouts.write_cfd(tmp_path / name)
    with h5py.File(tmp_path / name, "a") as f:
        del f["Vy"]
        f.create_dataset("Vy", shape=(2, 5, 8, 8), dtype="f4", chunks=(1, 1, 8, 8))  # never written
    with pytest.raises(DataError, match="Vy: declares shape .* only 0 of its 10 chunks"):
        open_source(tmp_path / name)
