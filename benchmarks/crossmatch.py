"""Sky cross-match benchmark: the global `match_unique` vs `match_unique_partitioned`.

    python benchmarks/crossmatch.py [--sizes 1e5,1e6] [--radius 1.0] [--pairs 0.5]
        [--group-sizes 131072,16384] [--global-max 1e6] [--repeat 1] [--seed 0]

For each N, two catalogues of N objects uniform on the sphere: a fraction --pairs of A's objects
have a B counterpart scattered by ~radius/4 (a few of them two, so ambiguous pairs exist), the rest
of B is unrelated. Each matcher runs in a fresh process on the same saved arrays, so its peak
RSS (`ru_maxrss`) is its own; `RSS above inputs` is that peak minus the peak just after the inputs
were loaded (the matcher's own working memory), `traced` the peak of Python and numpy
allocations during the match (tracemalloc; the KD-tree's C++ memory is not traced).
`same` says whether the result equals the global match's exactly (pairs, separations, counts);
above --global-max objects per catalogue the global match is not run (its memory, ~300 bytes an
object, may not fit) and `same` is `-`.
With --repeat R the matchers run R times, interleaved, and each cell is the fastest run (the
least disturbed on a shared machine; memory is the largest). Times are wall-clock: compare rows of
one run, not runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def uniform_sky(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))


def offset(rng, ra, dec, sigma_deg):
    """Small random offsets (flat-sky approximation, fine away from the poles for a benchmark)."""
    cos_dec = np.maximum(np.cos(np.radians(dec)), 1e-6)
    ra = (ra + rng.normal(0, sigma_deg, len(ra)) / cos_dec) % 360
    return ra, np.clip(dec + rng.normal(0, sigma_deg, len(dec)), -90, 90)


def write_catalogues(folder: Path, n: int, radius_arcsec: float, pairs: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ra_a, dec_a = uniform_sky(rng, n)
    true = rng.permutation(n)[: int(pairs * n)]
    twins = true[: len(true) // 50]  # 2 % of the true pairs get a second counterpart: ambiguous
    sigma = radius_arcsec / 4 / 3600
    ra_p, dec_p = offset(
        rng, np.concatenate([ra_a[true], ra_a[twins]]), np.concatenate([dec_a[true], dec_a[twins]]), sigma
    )
    ra_u, dec_u = uniform_sky(rng, n - len(ra_p))
    order = rng.permutation(n)
    ra_b, dec_b = np.concatenate([ra_p, ra_u])[order], np.concatenate([dec_p, dec_u])[order]
    for name, values in {"ra_a": ra_a, "dec_a": dec_a, "ra_b": ra_b, "dec_b": dec_b}.items():
        np.save(folder / f"{name}.npy", values)


def run_one(folder: Path, method: str, radius_arcsec: float, group_size: int) -> dict:
    """Child process: load the catalogues, match once, report time, memory and a result digest."""
    from encoders.astroclip.crossmatch import match_unique, match_unique_partitioned

    arrays = [np.load(folder / f"{name}.npy") for name in ("ra_a", "dec_a", "ra_b", "dec_b")]
    match_unique(*(x[:10] for x in arrays), radius_arcsec)  # imports (scipy.spatial) before measuring
    inputs_mib = peak_rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    if method == "global":
        result = match_unique(*arrays, radius_arcsec)
    else:
        result = match_unique_partitioned(*arrays, radius_arcsec, group_size=group_size)
    seconds = time.perf_counter() - start
    traced_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    digest = hashlib.sha256()
    for values in (result.index_a, result.index_b, result.separation_arcsec):
        digest.update(np.ascontiguousarray(values).tobytes())
    digest.update(json.dumps(result.to_dict(), sort_keys=True).encode())
    return {
        "seconds": seconds,
        "peak_mib": peak_rss_mib(),
        "above_mib": peak_rss_mib() - inputs_mib,
        "traced_mib": traced_mib,
        "matched": result.matched,
        "digest": digest.hexdigest(),
    }


def measure(folder: Path, method: str, radius_arcsec: float, group_size: int) -> dict:
    command = [sys.executable, __file__, "--child", str(folder), method, str(radius_arcsec), str(group_size)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def best_of(repeats: list[dict]) -> dict:
    """The fastest time, the largest memory, and a digest only if every repeat agreed."""
    digests = {r["digest"] for r in repeats}
    return {
        **repeats[0],
        "seconds": min(r["seconds"] for r in repeats),
        "peak_mib": max(r["peak_mib"] for r in repeats),
        "above_mib": max(r["above_mib"] for r in repeats),
        "traced_mib": max(r["traced_mib"] for r in repeats),
        "digest": digests.pop() if len(digests) == 1 else "differs between repeats",
    }


def table_row(n: int, method: str, group_size: int, r: dict, same: bool | None) -> str:
    cells = [
        f"{n:,}",
        method,
        f"{group_size:,}" if group_size else "-",
        f"{r['matched']:,}",
        f"{r['seconds']:.1f}",
        f"{r['peak_mib']:,.0f}",
        f"{r['above_mib']:,.0f}",
        f"{r['traced_mib']:,.0f}",
        "-" if same is None else "yes" if same else "NO",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        folder, method, radius, group_size = sys.argv[2:6]
        print(json.dumps(run_one(Path(folder), method, float(radius), int(group_size))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6")
    parser.add_argument("--radius", type=float, default=1.0, help="match radius, arcsec")
    parser.add_argument("--pairs", type=float, default=0.5, help="fraction of A with a true counterpart")
    parser.add_argument("--group-sizes", default="131072,16384")
    parser.add_argument("--global-max", type=float, default=1e6, help="largest N the global match runs at")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    group_sizes = [int(g) for g in args.group_sizes.split(",")]
    print(f'CPU: {cpu_model()}; radius {args.radius}"; {args.pairs:.0%} of A with a true counterpart\n')
    columns = "N (A = B)|matcher|group size|matched|seconds|peak RSS MiB|RSS above inputs MiB|traced MiB|same"
    print("| " + columns.replace("|", " | ") + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_catalogues(folder, n, args.radius, args.pairs, args.seed)
            with_global = n <= args.global_max
            runs = [("global", 0)] * with_global + [("partitioned", g) for g in group_sizes]
            results = [[measure(folder, m, args.radius, g) for m, g in runs] for _ in range(args.repeat)]
            reference = results[0][0]["digest"] if with_global else None
            for i, (method, group_size) in enumerate(runs):
                r = best_of([rep[i] for rep in results])
                print(table_row(n, method, group_size, r, reference and r["digest"] == reference), flush=True)


if __name__ == "__main__":
    main()
