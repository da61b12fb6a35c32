"""`foundation prepare` throughput and memory, 1 vs 2 worker processes, at two input sizes.

Inputs are written first, in their real layouts: AstroCLIP as Multimodal Universe legacysurvey
cutouts (4 x 160 x 160 image and inverse variance, one mask) and DESI spectra (7781 pixels), the
builders' layouts from tests/astroclip/mmu_layouts.py; MPP as The Well HDF5 files of 256 x 256
fields (4 channels), written by `encoders.mpp.well.write_simulation`; xVal as JSONL records of
text with numbers (~700 characters each). Each `prepare` runs as its
own `foundation` process; its process tree's resident memory (the command and its workers,
summed; RSS and PSS) is sampled every 20 ms for the peak. Reported: objects (samples) per second and shard
megabytes per second over the whole command (start-up included) and at the margin (the larger
run's extra samples over its extra time: start-up and fitting excluded), and the peak RSS at
both sizes — it must not grow with the input.

    python benchmarks/prepare.py            # AstroCLIP 120/240 objects, MPP 8/16 trajectories,
                                            # xVal 5000/10000 records
    python benchmarks/prepare.py --scale 2  # twice as many of each
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- inputs


def write_astroclip_inputs(root: Path, objects: int) -> list[str]:
    """MMU legacysurvey cutouts and DESI spectra of the same `objects` galaxies (one match each)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from tests.astroclip import mmu_layouts

    rng = np.random.default_rng(objects)
    side = int(np.ceil(np.sqrt(objects)))
    ra = 150.0 + (np.arange(objects) % side) * 0.01  # 36 arcsec apart: every match unique
    dec = 2.0 + (np.arange(objects) // side) * 0.01
    z = rng.uniform(0.05, 0.5, objects)
    mmu_layouts.legacysurvey(root / "legacysurvey", ra, dec, size=160)
    mmu_layouts.desi(root / "desi", ra, dec, z)
    return [
        "astroclip",
        "--images",
        str(root / "legacysurvey"),
        "--spectra",
        str(root / "desi"),
        "--bands",
        "g,r,i,z",
        "--samples-per-shard",
        "100",
        "--progress",
        "off",
    ]


def write_mpp_inputs(root: Path, trajectories: int, steps: int = 21, size: int = 256) -> list[str]:
    """One Well file per two trajectories: `size` x `size` fields, a tracer and a 2-vector + pressure."""
    import numpy as np

    from encoders.mpp.solvers import Simulation
    from encoders.mpp.well import write_simulation

    rng = np.random.default_rng(trajectories)
    for i in range(0, trajectories, 2):
        n = min(2, trajectories - i)
        sim = Simulation(
            name="bench",
            t0_fields={
                "tracer": rng.standard_normal((n, steps, size, size), dtype=np.float32),
                "pressure": rng.standard_normal((n, steps, size, size), dtype=np.float32),
            },
            t1_fields={"velocity": rng.standard_normal((n, steps, size, size, 2), dtype=np.float32)},
            time=np.arange(steps, dtype=np.float32),
            x=np.linspace(0, 1, size, dtype=np.float32),
            y=np.linspace(0, 1, size, dtype=np.float32),
            boundary={"x": "PERIODIC", "y": "PERIODIC"},
            parameters={"nu": rng.random(n).astype(np.float32)},
        )
        write_simulation(sim, root / "bench" / f"bench_{i:04d}.hdf5")
    return ["mpp", str(root / "bench"), "--samples-per-shard", "32", "--progress", "off"]


def write_xval_inputs(root: Path, records: int) -> list[str]:
    """One JSONL file of `records` texts, each with a few numbers (~700 characters)."""
    import json

    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(records)
    with open(root / "corpus.jsonl", "w") as handle:
        for i in range(records):
            ra, dec, mass = rng.normal(size=3)
            text = f"star {i} at ra {ra:.4f} dec {dec:.4f} has mass {mass:.3f}" + " and more words" * 40
            handle.write(json.dumps({"text": text}) + "\n")
    return ["xval", str(root / "corpus.jsonl"), "--vocab-size", "1000", "--samples-per-shard", "2000"]


# ----------------------------------------------------------------------------- measuring


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of a process and all its descendants, summed (Linux /proc). PSS counts a
    page shared by n processes as 1/n in each, so its sum is the tree's real memory."""
    rss = pss = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss, pss


def run_prepare(args: list[str], out: Path, workers: int) -> dict[str, float]:
    """One `foundation prepare` in its own process: wall seconds, peak tree RSS, samples, bytes."""
    import json

    command = [sys.executable, "-m", "foundation.cli", "prepare", *args]
    command += ["--out", str(out), "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = _tree_memory(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    samples = sum(s["samples"] for split in manifest["splits"].values() for s in split["shards"])
    size = sum(p.stat().st_size for p in out.glob("*.tar"))
    shutil.rmtree(out)
    return {"seconds": seconds, "peak_rss": peak_rss, "peak_pss": peak_pss, "samples": samples, "bytes": size}


def measure(name: str, write_inputs, sizes: tuple[int, int], tmp: Path) -> list[dict]:
    rows = []
    for size in sizes:
        inputs = tmp / f"{name}-{size}"
        args = write_inputs(inputs, size)
        for workers in (1, 2):
            result = run_prepare(args, tmp / "out", workers)
            rows.append({"family": name, "size": size, "workers": workers, **result})
            print(
                f"# {name} size {size} workers {workers}: {result['samples']} samples in "
                f"{result['seconds']:.1f} s, peak RSS {result['peak_rss'] / 2**20:.0f} MiB, "
                f"PSS {result['peak_pss'] / 2**20:.0f} MiB",
                file=sys.stderr,
            )
        shutil.rmtree(inputs)
    return rows


def _marginal(row: dict, rows: list[dict]) -> tuple[str, str]:
    """(samples/s, MB/s) of the larger input's extra samples over its extra time, at equal workers."""
    small = [r for r in rows if r["family"] == row["family"] and r["workers"] == row["workers"]]
    small = [r for r in small if r["size"] < row["size"] and r["seconds"] < row["seconds"]]
    if not small:
        return "", ""
    dt = row["seconds"] - small[0]["seconds"]
    return (
        f"{(row['samples'] - small[0]['samples']) / dt:.1f}",
        f"{(row['bytes'] - small[0]['bytes']) / dt / 1e6:.1f}",
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| family | input | workers | samples | wall s | samples/s | shard MB/s | marginal samples/s "
        "| marginal MB/s | peak RSS MiB | peak PSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row["family"],
            str(row["size"]),
            str(row["workers"]),
            str(row["samples"]),
            f"{row['seconds']:.1f}",
            f"{row['samples'] / row['seconds']:.1f}",
            f"{row['bytes'] / row['seconds'] / 1e6:.1f}",
            *_marginal(row, rows),
            f"{row['peak_rss'] / 2**20:.0f}",
            f"{row['peak_pss'] / 2**20:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="Multiply the input sizes.")
    parser.add_argument("--only", choices=("astroclip", "mpp", "xval"), help="Measure one family.")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        if args.only in (None, "astroclip"):
            sizes = (120 * args.scale, 240 * args.scale)
            rows += measure("astroclip (objects)", write_astroclip_inputs, sizes, Path(tmp))
        if args.only in (None, "mpp"):
            sizes = (8 * args.scale, 16 * args.scale)
            rows += measure("mpp (trajectories)", write_mpp_inputs, sizes, Path(tmp))
        if args.only in (None, "xval"):
            sizes = (5000 * args.scale, 10000 * args.scale)
            rows += measure("xval (records)", write_xval_inputs, sizes, Path(tmp))
    print(
        f"CPU: {_cpu_name()}, {os.cpu_count()} cores; load average at start {load:.2f}, at end "
        f"{os.getloadavg()[0]:.2f}; Python {platform.python_version()}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
