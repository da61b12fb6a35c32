"""`foundation prepare` holds no input whole: for AstroCLIP and MPP, the peak resident memory of a
prepare of 4N objects is within a few MB of the prepare of N objects, although the 4N input is
larger by far more than that. Each prepare runs in a fresh process (one worker) that reports its
own peak RSS (`VmHWM`, which starts afresh at exec, unlike `ru_maxrss`, which a child inherits
from the forking test process), so the test process's memory does not count. Both sizes span
several of the units a prepare reads at a time, so the units in flight are the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.testkit import REPO, child_env

pytestmark = pytest.mark.slow

#: Allowed growth of the peak RSS from N to 4N objects (allocator noise, per-object indexes).
SLACK_MB = 6

_RUN = """
import json, sys
from pathlib import Path
from foundation.cli import main
code = main(sys.argv[1:])
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "peak_kb": peak}))
"""


def _peak_mb(args: list[str]) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _RUN, "prepare", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr[-2000:]
    return result["peak_kb"] / 1024


def _input_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _assert_flat(tmp_path: Path, write_inputs, sizes=(2, 8)) -> None:
    peaks, inputs = [], []
    for size in sizes:
        folder = tmp_path / f"in-{size}"
        args = write_inputs(folder, size)
        inputs.append(_input_mb(folder))
        peaks.append(_peak_mb([*args, "--out", str(tmp_path / f"out-{size}")]))
    print(f"{write_inputs.__name__}: peak RSS {peaks} MB for inputs of {inputs} MB")
    assert inputs[1] - inputs[0] > 4 * SLACK_MB, "the larger input must outgrow the slack by far"
    assert peaks[1] - peaks[0] < SLACK_MB, f"peak RSS {peaks} MB for inputs of {inputs} MB"


def _astroclip_inputs(folder: Path, size: int) -> list[str]:
    from tests.astroclip import mmu_layouts

    n = 36 * size  # from 72 objects on, two full chunks of 32 are in flight
    side = int(np.ceil(np.sqrt(n)))
    ra = 150.0 + (np.arange(n) % side) * 0.01
    dec = 2.0 + (np.arange(n) // side) * 0.01
    mmu_layouts.legacysurvey(folder / "legacysurvey", ra, dec, size=64)
    mmu_layouts.desi(folder / "desi", ra, dec, np.full(n, 0.1))
    images, spectra = str(folder / "legacysurvey"), str(folder / "desi")
    return [
        "astroclip",
        "--images",
        images,
        "--spectra",
        spectra,
        "--samples-per-shard",
        "8",
        "--progress",
        "off",
    ]


def _mpp_inputs(folder: Path, size: int) -> list[str]:
    from encoders.mpp.solvers import Simulation
    from encoders.mpp.well import write_simulation

    rng = np.random.default_rng(size)
    for i in range(2 * size):
        sim = Simulation(
            name="mem",
            t0_fields={"tracer": rng.standard_normal((2, 9, 128, 128), dtype=np.float32)},
            t1_fields={"velocity": rng.standard_normal((2, 9, 128, 128, 2), dtype=np.float32)},
            time=np.arange(9, dtype=np.float32),
            x=np.linspace(0, 1, 128, dtype=np.float32),
            y=np.linspace(0, 1, 128, dtype=np.float32),
            boundary={"x": "PERIODIC", "y": "PERIODIC"},
            parameters={"nu": rng.random(2).astype(np.float32)},
        )
        write_simulation(sim, folder / f"mem_{i:03d}.hdf5")
    return ["mpp", str(folder), "--history", "2", "--samples-per-shard", "4", "--progress", "off"]


def test_astroclip_prepare_memory_does_not_grow_with_the_input(tmp_path):
    _assert_flat(tmp_path, _astroclip_inputs)


def test_mpp_prepare_memory_does_not_grow_with_the_input(tmp_path):
    _assert_flat(tmp_path, _mpp_inputs)
