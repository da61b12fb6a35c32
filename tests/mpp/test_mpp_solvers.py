"""The built-in compressible Navier–Stokes systems: the MPP paper's CNS columns at CPU scale."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.mpp.solvers import GAMMA, SYSTEMS
from encoders.mpp.synth import write_datasets
from encoders.mpp.well import PERIODIC, WellFile

CNS = {"compressible_ns_m1": 1.0, "compressible_ns_m01": 0.1}


@pytest.fixture(scope="module")
def runs():
    return {name: SYSTEMS[name](np.random.default_rng(3), 2, 16, 8) for name in CNS}


@pytest.mark.parametrize("name", sorted(CNS))
def test_cns_conserves_mass_and_momentum_and_stays_physical(runs, name):
    sim = runs[name]
    rho = sim.t0_fields["density"].astype(np.float64)
    p = sim.t0_fields["pressure"]
    velocity = sim.t1_fields["velocity"].astype(np.float64)
    assert all(np.isfinite(a).all() for a in (rho, p, velocity))
    assert rho.min() > 0 and p.min() > 0
    mass = rho.sum(axis=(2, 3))
    np.testing.assert_allclose(mass, mass[:, :1].repeat(mass.shape[1], 1), rtol=1e-6)
    momentum = (rho[..., None] * velocity).sum(axis=(2, 3))  # (N, T, 2)
    scale = (rho[..., None] * np.abs(velocity)).sum(axis=(2, 3)).max()
    assert np.abs(momentum - momentum[:, :1]).max() < 1e-5 * scale
    assert np.abs(np.diff(rho, axis=1)).mean() > 0  # it moves


@pytest.mark.parametrize("name", sorted(CNS))
def test_cns_starts_at_its_mach_number(runs, name):
    sim = runs[name]
    rho, p = sim.t0_fields["density"][:, 0], sim.t0_fields["pressure"][:, 0]
    speed2 = (sim.t1_fields["velocity"][:, 0] ** 2).sum(-1)
    mach = np.sqrt(speed2.mean(axis=(1, 2))) / np.sqrt(GAMMA)  # rms speed / mean-state sound speed
    np.testing.assert_allclose(mach, CNS[name], rtol=1e-4)
    assert (np.sqrt(GAMMA * p / rho) > 0).all()
    np.testing.assert_array_equal(sim.parameters["mach"], np.float32(CNS[name]))


def test_cns_is_deterministic_by_seed_and_differs_across_seeds():
    solve = SYSTEMS["compressible_ns_m01"]
    a, b = solve(np.random.default_rng(5), 1, 8, 3), solve(np.random.default_rng(5), 1, 8, 3)
    c = solve(np.random.default_rng(6), 1, 8, 3)
    np.testing.assert_array_equal(a.t0_fields["density"], b.t0_fields["density"])
    np.testing.assert_array_equal(a.t1_fields["velocity"], b.t1_fields["velocity"])
    assert not np.array_equal(a.t0_fields["density"], c.t0_fields["density"])


def test_synth_writes_cns_in_the_well_layout(tmp_path):
    write_datasets(tmp_path, ["compressible_ns_m1"], [1, 0, 1], resolution=8, steps=3, seed=2)
    root = tmp_path / "compressible_ns_m1"
    assert (root / "stats.yaml").is_file()
    well = WellFile(root / "data" / "train" / "compressible_ns_m1_train.hdf5")
    assert well.field_names == ["density", "pressure", "velocity_x", "velocity_y"]
    assert well.bc == (PERIODIC, PERIODIC)
    window = well.window(0, 0, 3)  # (T, C, X, Y)
    assert window.shape == (3, 4, 8, 8) and np.isfinite(window).all()
    again = tmp_path / "again"
    write_datasets(again, ["compressible_ns_m1"], [1, 0, 1], resolution=8, steps=3, seed=2)
    redo = WellFile(again / "compressible_ns_m1" / "data" / "train" / "compressible_ns_m1_train.hdf5")
    np.testing.assert_array_equal(redo.window(0, 0, 3), window)


def test_synth_cli_writes_every_system_by_default(tmp_path):
    from foundation.cli import main

    argv = [
        "synth",
        "mpp",
        "--out",
        str(tmp_path),
        "--resolution",
        "8",
        "--steps",
        "2",
        "--trajectories",
        "1,0,0",
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SYSTEMS)
    assert {"compressible_ns_m1", "compressible_ns_m01", "navier_stokes", "shallow_water"} <= set(SYSTEMS)
