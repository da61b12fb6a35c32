"""MPP data: Well writer/reader round trips and interop with `the_well`, PDEBench layouts,
clear errors on malformed files, and `prepare mpp` shards."""

import json

import h5py
import numpy as np
import pytest
import torch

from encoders.mpp import pdebench
from encoders.mpp.solvers import SYSTEMS, Simulation
from encoders.mpp.sources import open_source
from encoders.mpp.well import OPEN, PERIODIC, WALL, WellFile, write_simulation
from foundation.cli import main
from foundation.errors import DataError
from tests.mpp import mpp_layouts


def _sim(n_traj=2, steps=6, n=8, seed=0) -> Simulation:
    rng = np.random.default_rng(seed)
    return Simulation(
        name="toy",
        t0_fields={"tracer": rng.standard_normal((n_traj, steps, n, n)).astype(np.float32)},
        t1_fields={"velocity": rng.standard_normal((n_traj, steps, n, n, 2)).astype(np.float32)},
        time=np.arange(steps, dtype=np.float32),
        x=np.linspace(0, 1, n, dtype=np.float32),
        y=np.linspace(0, 1, n, dtype=np.float32),
        boundary={"x": "PERIODIC", "y": "WALL"},
        parameters={"nu": rng.random(n_traj).astype(np.float32)},
    )


# ----------------------------------------------------------------------------- The Well


def test_well_writer_reader_round_trip(tmp_path):
    sim = _sim()
    path = write_simulation(sim, tmp_path / "toy" / "data" / "train" / "toy.hdf5")
    src = open_source(path)
    assert isinstance(src, WellFile)
    assert src.field_names == ["tracer", "velocity_x", "velocity_y"]
    assert src.bc == (PERIODIC, WALL) and src.shape == (8, 8) and src.n_steps == 6
    w = src.window(1, 2, 3)
    np.testing.assert_array_equal(w[:, 0], sim.t0_fields["tracer"][1, 2:5])
    np.testing.assert_array_equal(w[:, 1], sim.t1_fields["velocity"][1, 2:5, ..., 0])
    np.testing.assert_array_equal(w[:, 2], sim.t1_fields["velocity"][1, 2:5, ..., 1])
    assert src.parameters(1) == {"nu": pytest.approx(float(sim.parameters["nu"][1]))}
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_simulation(sim, path)


def test_synth_mpp_files_open_in_the_well_with_the_same_values(tmp_path):
    from the_well.data import WellDataset

    out = tmp_path / "well"
    assert (
        main(
            [
                "synth",
                "mpp",
                "--out",
                str(out),
                "--systems",
                "navier_stokes,shallow_water",
                "--resolution",
                "16",
                "--steps",
                "8",
                "--trajectories",
                "2,1,1",
            ]
        )
        == 0
    )
    for system, bc in (("navier_stokes", 2), ("shallow_water", 0)):
        assert (out / system / "stats.yaml").is_file()
        ds = WellDataset(path=str(out / system), well_split_name="train", n_steps_input=3, n_steps_output=2)
        ours = WellFile(next((out / system / "data" / "train").glob("*.hdf5")))
        names = [n for order in range(3) for n in ds.metadata.field_names[order]]
        assert names == ours.field_names
        assert len(ds) == 2 * (8 - 5 + 1)
        for index in (0, 5):
            sample = ds[index]
            traj, start = divmod(index, 8 - 5 + 1)
            window = ours.window(traj, start, 5)  # (T, C, X, Y)
            theirs = torch.cat([sample["input_fields"], sample["output_fields"]]).numpy()  # (T, X, Y, C)
            np.testing.assert_array_equal(window, theirs.transpose(0, 3, 1, 2))
            assert (sample["boundary_conditions"] == bc).all()
            assert ours.bc == (bc, bc)
        # The normalisation stats load into The Well's own normaliser.
        from the_well.data.normalization import ZScoreNormalization

        normed = WellDataset(
            path=str(out / system),
            well_split_name="train",
            n_steps_input=3,
            n_steps_output=2,
            use_normalization=True,
            normalization_type=ZScoreNormalization,
        )
        assert torch.isfinite(normed[0]["input_fields"]).all()


def test_reader_handles_files_written_by_the_wells_own_tools(tmp_path):
    from the_well.data import WellDataset
    from the_well.utils.dummy_data import write_dummy_data

    folder = tmp_path / "dummy" / "data" / "train"
    folder.mkdir(parents=True)
    np.random.seed(3)
    write_dummy_data(str(folder / "dummy.hdf5"))
    src = open_source(folder / "dummy.hdf5")
    assert src.field_names == ["constant_field", "field_x", "field_y"]
    assert src.bc == (OPEN, OPEN)  # its periodic masks are all False: WellDataset also says OPEN
    ds = WellDataset(path=str(tmp_path / "dummy"), well_split_name="train", n_steps_input=2, n_steps_output=1)
    sample = ds[3]  # trajectory 0, start 3
    window = src.window(0, 3, 3)
    theirs = torch.cat([sample["input_fields"], sample["output_fields"]]).numpy().transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(window[:, 1:], theirs)
    constant = sample["constant_fields"].numpy()[..., 0]
    for t in range(3):  # constant fields are kept as channels, repeated in time
        np.testing.assert_array_equal(window[t, 0], constant)
    assert (sample["boundary_conditions"] == OPEN).all()


def _hand_written_well(path, singleton=True, **overrides):
    """A Well file with a t2 field, a field constant along y (stored with a size-1 y axis, as
    WellDataset expects, or without it, as the_well's xarray export expects), and a field that is
    neither sample- nor time-varying."""
    n, t, nx, ny = 2, 5, 6, 4
    rng = np.random.default_rng(0)
    arrays = {
        "stress": rng.standard_normal((n, t, nx, ny, 2, 2)).astype(np.float32),
        "profile": rng.standard_normal((n, t, nx, 1) if singleton else (n, t, nx)).astype(np.float32),
        "mask": (rng.random((nx, ny)) > 0.5).astype(np.float32),
    }
    with h5py.File(path, "w") as f:
        f.attrs.update(
            dataset_name="hand",
            grid_type="cartesian",
            n_spatial_dims=2,
            n_trajectories=n,
            simulation_parameters=["Re"],
            Re=100.0,
        )
        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = ["x", "y"]
        for name, size in (("time", t), ("x", nx), ("y", ny)):
            d = dims.create_dataset(name, data=np.arange(size, dtype=np.float32))
            d.attrs.update(sample_varying=False, time_varying=name == "time")
        bcs = f.create_group("boundary_conditions")
        for name, dim, kind, size in (("x_periodic", "x", "PERIODIC", nx), ("y_wall", "y", "WALL", ny)):
            g = bcs.create_group(name)
            g.attrs.update(
                bc_type=kind,
                associated_dims=[dim],
                associated_fields=[],
                sample_varying=False,
                time_varying=False,
            )
            mask = np.zeros(size, bool)
            mask[[0, -1]] = True
            g.create_dataset("mask", data=mask)
        s = f.create_group("scalars")
        s.attrs["field_names"] = ["Re"]
        s.create_dataset("Re", data=100.0).attrs.update(sample_varying=False, time_varying=False)
        groups = {order: f.create_group(f"t{order}_fields") for order in range(3)}
        groups[0].attrs["field_names"] = ["profile", "mask"]
        groups[1].attrs["field_names"] = []
        groups[2].attrs["field_names"] = ["stress"]
        spec = {
            "profile": (0, [True, False], True, True),
            "mask": (0, [True, True], False, False),
            "stress": (2, [True, True], True, True),
        }
        for name, (order, dim_varying, sample_varying, time_varying) in spec.items():
            d = groups[order].create_dataset(name, data=arrays[name])
            d.attrs.update(dim_varying=dim_varying, sample_varying=sample_varying, time_varying=time_varying)
        for break_it in overrides.values():
            break_it(f)
    return arrays


def test_reader_matches_well_dataset_on_tensor_and_broadcast_fields(tmp_path):
    from the_well.data import WellDataset

    folder = tmp_path / "hand" / "data" / "valid"
    folder.mkdir(parents=True)
    arrays = _hand_written_well(folder / "hand.hdf5")
    src = open_source(folder / "hand.hdf5")
    assert src.field_names == ["profile", "mask", "stress_xx", "stress_xy", "stress_yx", "stress_yy"]
    assert src.bc == (PERIODIC, WALL) and src.parameters(1) == {"Re": 100.0}
    ds = WellDataset(path=str(tmp_path / "hand"), well_split_name="valid", n_steps_input=2, n_steps_output=1)
    sample = ds[2 + 1]  # trajectory 1, start 0 (3 windows per trajectory)
    window = src.window(1, 0, 3)
    variable = torch.cat([sample["input_fields"], sample["output_fields"]]).numpy().transpose(0, 3, 1, 2)
    names = [n for order in range(3) for n in ds.metadata.field_names[order]]
    for j, name in enumerate(names):
        np.testing.assert_array_equal(window[:, src.field_names.index(name)], variable[:, j])
    np.testing.assert_array_equal(window[2, 1], arrays["mask"])
    np.testing.assert_array_equal(window[0, 0], np.repeat(arrays["profile"][1, 0].reshape(6, 1), 4, axis=1))
    assert sample["boundary_conditions"].tolist() == [[PERIODIC, PERIODIC], [WALL, WALL]]
    # The same field stored without its constant axis reads the same.
    _hand_written_well(tmp_path / "dropped.hdf5", singleton=False)
    np.testing.assert_array_equal(open_source(tmp_path / "dropped.hdf5").window(1, 0, 3), window)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda f: f.__delitem__("t0_fields"), "'t0_fields'"),
        (
            lambda f: f["t2_fields"]["stress"].attrs.__delitem__("time_varying"),
            "t2_fields/stress.*'time_varying'",
        ),
        (lambda f: f["t0_fields"].attrs.__setitem__("field_names", ["profile", "mask", "ghost"]), "'ghost'"),
        (lambda f: f.attrs.__delitem__("n_trajectories"), "'n_trajectories'"),
        (lambda f: f["boundary_conditions"]["y_wall"].attrs.__setitem__("bc_type", "SLIPPERY"), "SLIPPERY"),
        (lambda f: f["dimensions"].__delitem__("time"), "'time'"),
        (lambda f: f.attrs.__setitem__("n_spatial_dims", 3), "2-D"),
    ],
)
def test_malformed_well_files_get_clear_errors(tmp_path, break_it, message):
    path = tmp_path / "broken.hdf5"
    _hand_written_well(path, broken=break_it)
    with pytest.raises(DataError, match=message) as info:
        WellFile(path)
    assert str(path) in str(info.value)


def test_shape_mismatch_and_non_hdf5_are_data_errors(tmp_path):
    path = tmp_path / "wrong.hdf5"

    def reshape(f):
        del f["t0_fields"]["profile"]
        f["t0_fields"].create_dataset("profile", data=np.zeros((2, 5, 3, 1), np.float32)).attrs.update(
            dim_varying=[True, False], sample_varying=True, time_varying=True
        )

    _hand_written_well(path, broken=reshape)
    with pytest.raises(DataError, match=r"t0_fields/profile: shape \(2, 5, 3, 1\).*\(2, 5, 6, 1\)"):
        WellFile(path)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(DataError, match="cannot open as HDF5"):
        open_source(text)
    assert main(["prepare", "mpp", str(text), "--out", str(tmp_path / "s")]) == 2


def test_a_field_linked_to_another_file_is_refused(tmp_path):
    """An external link would read data from wherever it points (not the file named), unchecked."""
    path, elsewhere = tmp_path / "linked.hdf5", tmp_path / "elsewhere.hdf5"

    def link_out(f):
        with h5py.File(elsewhere, "w") as other:
            f.copy(f["t0_fields"]["profile"], other, "profile")
        del f["t0_fields"]["profile"]
        f["t0_fields"]["profile"] = h5py.ExternalLink(str(elsewhere), "profile")

    _hand_written_well(path, broken=link_out)
    with pytest.raises(DataError, match="'profile' in /t0_fields is a link to another file"):
        WellFile(path)
    pde = tmp_path / "2D_diff-react_NA_NA.h5"
    with h5py.File(pde, "w") as f:
        f.create_group("0000")["data"] = h5py.ExternalLink(str(elsewhere), "profile")
    with pytest.raises(DataError, match="is a link to another file"):
        open_source(pde)


# ----------------------------------------------------------------------------- PDEBench


def test_malformed_pdebench_files_get_clear_errors(tmp_path):
    path = tmp_path / "2D_rdb_NA_NA.h5"
    with h5py.File(path, "w") as f:
        f.create_group("0000").create_dataset("data", data=np.zeros((4, 8, 8, 1), np.float32))
        f.create_group("0001").create_dataset("grid_only", data=np.zeros(3))
    with pytest.raises(DataError, match="missing 'data' in group '0001'"):
        open_source(path)
    cfd = tmp_path / "2D_CFD_bad.hdf5"
    with h5py.File(cfd, "w") as f:
        for key, shape in zip(pdebench.CFD_KEYS, [(2, 5, 8, 8)] * 3 + [(2, 5, 8, 4)], strict=True):
            f.create_dataset(key, data=np.zeros(shape, np.float32))
    with pytest.raises(DataError, match="share one"):
        open_source(cfd)
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f.create_dataset("stuff", data=np.zeros(3))
    with pytest.raises(DataError, match="not a recognised PDEBench layout"):
        open_source(empty)


# ----------------------------------------------------------------------------- prepare


def test_prepare_splits_pdebench_by_trajectory_and_records_vocabulary(tmp_path):
    from foundation.data import Manifest, ShardDataset

    (tmp_path / "src").mkdir()
    mpp_layouts.write_rdb(tmp_path / "src" / "2D_rdb_NA_NA.h5", n=12, steps=9)
    sim = _sim(n_traj=2, steps=9, n=16)
    write_simulation(sim, tmp_path / "src" / "toy" / "data" / "test" / "toy_test.hdf5")
    out = tmp_path / "shards"
    code = main(
        [
            "prepare",
            "mpp",
            str(tmp_path / "src"),
            "--out",
            str(out),
            "--history",
            "2",
            "--window",
            "4",
            "--stride",
            "2",
            "--resolution",
            "8",
            "--split-fractions",
            "train=0.5,valid=0.25,test=0.25",
        ]
    )
    assert code == 0
    m = Manifest.load(out)
    info = m.extra["mpp"]
    assert info["fields"] == sorted(["height", "tracer", "velocity_x", "velocity_y"])
    assert info["resolution"] == [8, 8] and info["window"] == 4
    assert info["datasets"]["toy"]["samples"] == {"test": 2 * 3}  # folder split kept
    assert set(m.stats["fields"]) == {"height"}  # training windows only (toy is test-only)
    seen: dict[int, set] = {}
    for split in m.splits:
        for batch in ShardDataset(
            out,
            split=split,
            batch_size=4,
            shuffle=False,
            epochs=1,
            drop_last=False,
            collate_fn=lambda samples: samples,
        ):
            for s in batch:
                assert s["fields"].shape[0] == 4 and s["fields"].shape[2:] == (8, 8)
                if s["meta"]["dataset"] == "pdebench_shallow_water":
                    seen.setdefault(s["meta"]["trajectory"], set()).add(split)
                else:
                    assert split == "test"
                    # block-averaged 16 -> 8
                    src = sim.t0_fields["tracer"][s["meta"]["trajectory"], s["meta"]["start"]]
                    np.testing.assert_allclose(
                        s["fields"][0, 0], src.reshape(8, 2, 8, 2).mean((1, 3)), rtol=1e-5, atol=1e-6
                    )
    assert len(seen) == 12 and all(len(splits) == 1 for splits in seen.values())
    assert len({next(iter(v)) for v in seen.values()}) >= 2  # trajectories spread over splits


def test_prepare_takes_either_split_fractions_spelling_and_records_it_as_typed(tmp_path):
    from foundation.data import Manifest

    write_simulation(_sim(steps=4), tmp_path / "w" / "toy" / "data" / "train" / "a.hdf5")
    for spelling in ("--split-fractions", "--splits"):
        out = tmp_path / spelling
        args = ["prepare", "mpp", str(tmp_path / "w"), "--out", str(out), "--history", "2"]
        assert main([*args, spelling, "train=0.5,valid=0.5"]) == 0
        command = Manifest.load(out).provenance["command"]
        assert "--split-fractions train=0.5,valid=0.5 " in command


def test_prepare_rejects_bad_requests(tmp_path):
    write_simulation(_sim(steps=4), tmp_path / "w" / "toy" / "data" / "train" / "a.hdf5")
    (tmp_path / "big").mkdir()
    mpp_layouts.write_rdb(tmp_path / "big" / "2D_rdb_NA_NA.h5", n=1, steps=4, nx=16, ny=16)
    with pytest.raises(DataError, match=r"different grid sizes.*--resolution"):
        main(
            [
                "-v",
                "prepare",
                "mpp",
                str(tmp_path / "w"),
                str(tmp_path / "big"),
                "--out",
                str(tmp_path / "s"),
                "--history",
                "2",
            ]
        )
    assert main(["prepare", "mpp", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    with pytest.raises(DataError, match="nothing to prepare: 1 file.* fewer steps than the window of 5"):
        main(["-v", "prepare", "mpp", str(tmp_path / "w"), "--out", str(tmp_path / "s"), "--history", "4"])
    with pytest.raises(DataError, match="nothing to prepare: toy: grid 8x8 cannot be block-averaged"):
        main(
            [
                "-v",
                "prepare",
                "mpp",
                str(tmp_path / "w"),
                "--out",
                str(tmp_path / "s"),
                "--history",
                "2",
                "--resolution",
                "3",
            ]
        )


def test_synth_refuses_bad_requests_before_writing_anything(tmp_path):
    from encoders.mpp.synth import write_datasets

    (tmp_path / "burgers").mkdir()
    for systems, counts, message in (
        (["nope"], [1, 0, 0], "unknown system"),
        (["gray_scott"], [0, 1, 1], r"train >= 1"),
        (["gray_scott"], [1, 1], r"three counts"),
        (["gray_scott", "burgers"], [1, 0, 0], "burgers already exists"),
    ):
        with pytest.raises(DataError, match=message):
            write_datasets(tmp_path, systems, counts, resolution=8, steps=2)
    assert [p.name for p in tmp_path.iterdir()] == ["burgers"]


def test_solvers_are_deterministic_finite_and_evolve():
    for name, solve in SYSTEMS.items():
        a = solve(np.random.default_rng(7), 2, 16, 6)
        b = solve(np.random.default_rng(7), 2, 16, 6)
        fields = {**a.t0_fields, **a.t1_fields}
        for key, value in fields.items():
            assert value.dtype == np.float32 and np.isfinite(value).all(), (name, key)
            np.testing.assert_array_equal(value, {**b.t0_fields, **b.t1_fields}[key])
            assert np.abs(np.diff(value, axis=1)).mean() > 0, (name, key)  # it moves
        assert all(v.shape == (2,) for v in a.parameters.values())
    assert json.dumps(sorted(SYSTEMS))  # names are plain strings
