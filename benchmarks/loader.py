"""Loader throughput: foundation's ShardDataset vs webdataset vs a stdlib tarfile loop.

Writes the same shards once per sample size (one float32 array per sample, plus the key),
then reads them batched into tensors (batch 64) through a torch DataLoader with 0 and 2
workers. Each measurement runs in a fresh subprocess so peak RSS is its own; the page cache
is warmed first. Reports samples/s (wall clock) and CPU µs/sample (user+system time of the
process and its loader workers), which is less sensitive to other load on a shared machine.

    python benchmarks/loader.py            # 4 KiB, 64 KiB, 1 MiB; 0 and 2 workers
    python benchmarks/loader.py --quick    # fewer samples, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20}
QUICK_COUNTS = {"4KiB": 16384, "64KiB": 4096, "1MiB": 512}  # 64 MiB, 256 MiB, 512 MiB of samples
FULL_COUNTS = {"4KiB": 65536, "64KiB": 16384, "1MiB": 2048}  # 256 MiB, 1 GiB, 2 GiB
BATCH = 64


def write_shards(directory: Path, sample_bytes: int, samples: int) -> None:
    import numpy as np

    from foundation.data import ShardWriter

    per_shard = max(16, min(1000, (64 << 20) // sample_bytes))  # ~64 MiB shards, as is usual
    rng = np.random.default_rng(0)
    base = rng.normal(size=sample_bytes // 4).astype(np.float32)
    with ShardWriter(directory, split="train", samples_per_shard=per_shard, field_stats=False) as writer:
        for i in range(samples):
            writer.write({"__key__": f"s{i:08d}", "x": np.roll(base, i)})


# ----------------------------------------------------------------------------- loaders


def loader_foundation(directory: Path, workers: int):
    from torch.utils.data import DataLoader

    from foundation.data import ShardDataset

    ds = ShardDataset(directory, "train", batch_size=BATCH, seed=0, shuffle=True, drop_last=False)
    return DataLoader(ds, batch_size=None, num_workers=workers)


def loader_webdataset(directory: Path, workers: int):
    import numpy as np
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader

    urls = sorted(str(p) for p in directory.glob("train-*.tar"))

    def collate(samples):
        return {
            "__key__": [s["__key__"] for s in samples],
            "x": torch.from_numpy(np.stack([s["x.npy"] for s in samples])),
        }

    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode()
        .batched(BATCH, collation_fn=collate)
    )
    return DataLoader(ds, batch_size=None, num_workers=workers)


def loader_tarfile(directory: Path, workers: int):
    import io
    import tarfile

    import numpy as np
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    urls = sorted(str(p) for p in directory.glob("train-*.tar"))

    class TarLoop(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            mine = urls if info is None else urls[info.id :: info.num_workers]
            keys, arrays = [], []
            for url in mine:
                with tarfile.open(url) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        keys.append(member.name.split(".", 1)[0])
                        arrays.append(np.load(io.BytesIO(tar.extractfile(member).read())))
                        if len(keys) == BATCH:
                            yield {"__key__": keys, "x": torch.from_numpy(np.stack(arrays))}
                            keys, arrays = [], []
            if keys:
                yield {"__key__": keys, "x": torch.from_numpy(np.stack(arrays))}

    return DataLoader(TarLoop(), batch_size=None, num_workers=workers)


LOADERS = {"foundation": loader_foundation, "webdataset": loader_webdataset, "tarfile": loader_tarfile}


def measure_one(loader_name: str, directory: Path, workers: int) -> dict:
    """Runs in a subprocess: one full pass, returns numbers as JSON."""
    import gc

    loader = LOADERS[loader_name](directory, workers)
    t0 = time.perf_counter()
    r0s, r0c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    samples = 0
    checksum = 0.0
    it = iter(loader)
    for batch in it:
        samples += len(batch["__key__"])
        checksum += float(batch["x"][:, 0].sum())
    del it
    gc.collect()  # joins the workers, so their CPU time lands in RUSAGE_CHILDREN
    wall = time.perf_counter() - t0
    r1s, r1c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1s.ru_utime + r1s.ru_stime - r0s.ru_utime - r0s.ru_stime) + (
        r1c.ru_utime + r1c.ru_stime - r0c.ru_utime - r0c.ru_stime
    )
    return {
        "samples": samples,
        "wall": wall,
        "cpu": cpu,
        "rss_mib": max(r1s.ru_maxrss, r1c.ru_maxrss) / 1024,
        "checksum": checksum,
    }


def run_subprocess(loader_name: str, directory: Path, workers: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, __file__, "--one", loader_name, str(directory), str(workers)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_shards(directory: Path, samples: int) -> bool:
    from foundation.data import Manifest

    try:
        return Manifest.load(directory).split("train").samples == samples
    except Exception:
        return False


def warm(directory: Path) -> None:
    for path in directory.glob("*.tar"):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="Fewer samples per size (about a minute in all)."
    )
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help="Comma-separated subset of " + ", ".join(SIZES)
    )
    parser.add_argument("--workers", default="0,2", help="Comma-separated worker counts.")
    parser.add_argument("--loaders", default=",".join(LOADERS), help="Comma-separated subset of loaders.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per cell; the median is reported.")
    parser.add_argument(
        "--dir", help="Where to write shards (default: a temporary directory, removed after)."
    )
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, directory, workers = args.one
        print(json.dumps(measure_one(name, Path(directory), int(workers))))
        return

    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        rows = []
        for size_name in args.sizes.split(","):
            size = SIZES[size_name]
            samples = counts[size_name]
            directory = root / size_name
            if not _has_shards(directory, samples):
                shutil.rmtree(directory, ignore_errors=True)
                write_shards(directory, size, samples)
            warm(directory)
            for workers in [int(w) for w in args.workers.split(",")]:
                results = {}
                for name in args.loaders.split(","):
                    runs = sorted(
                        (run_subprocess(name, directory, workers) for _ in range(args.repeat)),
                        key=lambda r: r["samples"] / r["wall"],
                    )
                    results[name] = runs[len(runs) // 2]
                    assert results[name]["samples"] == samples, (name, results[name]["samples"], samples)
                for name, r in results.items():
                    rows.append(
                        (
                            size_name,
                            workers,
                            name,
                            r["samples"],
                            r["samples"] / r["wall"],
                            1e6 * r["cpu"] / r["samples"],
                            r["rss_mib"],
                            (r["samples"] / r["wall"])
                            / (results["webdataset"]["samples"] / results["webdataset"]["wall"])
                            if "webdataset" in results
                            else float("nan"),
                        )
                    )
                    print(
                        f"  {size_name:>6} w={workers} {name:<11} {rows[-1][4]:>9.0f} samples/s "
                        f"{rows[-1][5]:>8.1f} CPU µs/sample",
                        file=sys.stderr,
                    )
        print(f"\nbatch {BATCH}, batched into tensors; CPU = user+system of the process and its workers")
        print(f"{os.cpu_count()} CPUs, load average before the table: {os.getloadavg()[0]:.1f}\n")
        header = (
            "sample",
            "workers",
            "loader",
            "samples",
            "samples/s",
            "CPU µs/sample",
            "peak RSS MiB",
            "vs webdataset",
        )
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for size_name, workers, name, n, rate, cpu_us, rss, ratio in rows:
            print(
                f"| {size_name} | {workers} | {name} | {n} | {rate:,.0f} | {cpu_us:,.1f} | {rss:,.0f} "
                f"| {ratio:.2f}x |"
            )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
