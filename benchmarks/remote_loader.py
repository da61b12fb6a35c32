"""Loader throughput from object storage: local disk vs a local HTTP server vs a local S3 server.

Writes one shard set of 64 KiB samples (one float32 array each, 16 MiB shards), serves the folder
with `python -m http.server` and uploads it to a moto S3 server (`moto_server`), both separate
processes on 127.0.0.1, then reads it through `ShardDataset` (batch 64, no loader workers):
from the folder, and from each URL twice, with an empty shard cache (cold: every shard is fetched
and checked) and again with the cache filled (warm: the cached files are read). Reports
samples/s and MB/s of sample payload (wall clock, best of --repeat).

    python benchmarks/remote_loader.py            # 2048 samples (128 MiB)
    python benchmarks/remote_loader.py --quick    # 512 samples (32 MiB)

Needs the `remote` and `dev` extras (s3fs, aiohttp, moto[server]).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_BYTES = 64 << 10
SAMPLES_PER_SHARD = 256  # 16 MiB shards
BATCH = 64


def write_shards(directory: Path, samples: int) -> None:
    import numpy as np

    from foundation.data import ShardWriter

    base = np.random.default_rng(0).normal(size=SAMPLE_BYTES // 4).astype(np.float32)
    with ShardWriter(directory, split="train", samples_per_shard=SAMPLES_PER_SHARD, field_stats=False) as w:
        for i in range(samples):
            w.write({"__key__": f"s{i:08d}", "x": np.roll(base, i)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"no server came up on port {port}")


def start_http(directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=directory.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(port)
    return server, f"http://127.0.0.1:{port}/{directory.name}"


def start_s3(directory: Path) -> tuple[subprocess.Popen, str]:
    """A moto server with the set uploaded to s3://bench/<name>; the endpoint goes in the
    environment the standard way (AWS_ENDPOINT_URL), as for MinIO or Ceph."""
    import s3fs

    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    server = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(port)
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        fs.put_file(str(path), f"bench/{directory.name}/{path.name}")
    return server, f"s3://bench/{directory.name}"


def one_pass(source, cache: Path | None) -> tuple[int, float]:
    """(samples, seconds) of one epoch through ShardDataset."""
    from foundation.data import ShardDataset
    from foundation.data.remote import RemoteShardSet

    t0 = time.perf_counter()
    data = source if cache is None else RemoteShardSet(source, cache)
    ds = ShardDataset(data, "train", batch_size=BATCH, seed=0, shuffle=True, drop_last=False)
    samples = sum(len(batch["__key__"]) for batch in ds)
    return samples, time.perf_counter() - t0


def measure(source, cache: Path | None, repeat: int, cold: bool) -> tuple[int, float]:
    best = float("inf")
    samples = 0
    for _ in range(repeat):
        if cold and cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        samples, seconds = one_pass(source, cache)
        best = min(best, seconds)
    return samples, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 samples instead of 2048")
    parser.add_argument("--repeat", type=int, default=2, help="passes per measurement (best is kept)")
    args = parser.parse_args()
    samples = 512 if args.quick else 2048
    rows = []
    with tempfile.TemporaryDirectory(prefix="remote-loader-") as tmp:
        root = Path(tmp)
        directory = root / "set"
        write_shards(directory, samples)
        one_pass(directory, None)  # page cache warm
        rows.append(("local disk", "-", *measure(directory, None, args.repeat, cold=False)))
        for name, start in (("HTTP", start_http), ("S3 (moto)", start_s3)):
            server, url = start(directory)
            try:
                cache = root / f"cache-{name.split()[0].lower()}"
                rows.append((name, "cold", *measure(url, cache, args.repeat, cold=True)))
                rows.append((name, "warm", *measure(url, cache, args.repeat, cold=False)))
            finally:
                server.terminate()
                server.wait()
    print(f"{samples} samples of {SAMPLE_BYTES >> 10} KiB, shards of {SAMPLES_PER_SHARD}, batch {BATCH}\n")
    print("| source | shard cache | samples | samples/s | MB/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for source, cache, n, seconds in rows:
        print(f"| {source} | {cache} | {n} | {n / seconds:,.0f} | {n * SAMPLE_BYTES / seconds / 1e6:,.1f} |")


if __name__ == "__main__":
    main()
