"""Native MPP files → shards: windows of `history + horizon` steps, one trajectory each.

Each shard sample is one window: `fields` (W, C, X, Y) float32 with the source's channels,
`bcs` (2,) int64 boundary codes per axis (WALL 0, OPEN 1, PERIODIC 2) and `meta` (JSON: data
set, field names, PDE parameters, source file, trajectory, first step, times, codes of both ends
of each axis). Files found under
a `train`/`valid`/`test` folder keep that split; other files (PDEBench) are split by whole
trajectories with a hash of (data set, file, trajectory), so no trajectory leaks across splits.
The manifest's `extra["mpp"]` holds the field vocabulary and per-data-set facts; its
`stats["fields"]` holds per-field mean/std/rms over the training windows, with the element count
they are over, so that `foundation shards merge` combines the statistics of parts exactly
(`merge_stats`). With `part=(I, N)` only part I of N of the input files is prepared
(`foundation.data.merge.files_of_part`).

Inputs MPP cannot use (3-D, spherical grids, grids `--resolution` cannot divide) leave their data
set out with the reason, and files shorter than the window are left out and counted; both are
returned in the summary and recorded in the manifest. Malformed files stop the run.

With `workers` > 1, worker processes read, block-average and check units of consecutive windows
(`foundation.data.parallel.ordered_map`); this process writes them in input order, so the shard
set is the same for any number of workers, and at most a few units are held in memory at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.mpp.sources import discover, open_source
from encoders.mpp.well import SkippedSource
from foundation.errors import DataError

DEFAULT_FRACTIONS = {"train": 0.8, "valid": 0.1, "test": 0.1}


@dataclass
class PrepareOptions:
    history: int = 4
    window: int | None = None
    stride: int | None = None
    resolution: int | None = None
    split_fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    samples_per_shard: int = 256
    max_windows_per_trajectory: int | None = None
    seed: int = 0
    overwrite: bool = False
    allow_degenerate: bool = False
    workers: int = 1
    part: tuple[int, int] | None = None  # (I, N): only part I of N of the input files

    def resolved(self) -> tuple[int, int]:
        window = self.window if self.window is not None else self.history + 1
        if self.history < 1:
            raise DataError(f"--history must be >= 1, got {self.history}")
        if window < self.history + 1:
            raise DataError(f"--window {window} must be >= history + 1 = {self.history + 1}")
        stride = self.stride if self.stride is not None else window
        if stride < 1:
            raise DataError(f"--stride must be >= 1, got {stride}")
        return window, stride


_SPLIT_RANK = {"train": 0, "valid": 1, "test": 2}


def source_order(path: str) -> tuple[int, str]:
    """Where a file stands in its data set's `sources`: files of a train, valid, test folder in
    that order (a Well layout's own order), then the rest, each by path — one order however the
    inputs were named and however the files were split into parts."""
    return _SPLIT_RANK.get(Path(path).parent.name, len(_SPLIT_RANK)), path


def _key(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(str(p) for p in parts))


def downsample(frames: np.ndarray, resolution: int, where: str) -> np.ndarray:
    """Block-average (T, C, X, Y) to (T, C, resolution, resolution); sizes must divide."""
    _, _, nx, ny = frames.shape
    if (nx, ny) == (resolution, resolution):
        return frames
    if nx % resolution or ny % resolution or nx < resolution or ny < resolution:
        raise DataError(
            f"{where}: grid {nx}x{ny} cannot be block-averaged to {resolution}x{resolution} "
            "(--resolution must divide both sizes)"
        )
    fx, fy = nx // resolution, ny // resolution
    t, c = frames.shape[:2]
    return (
        frames.reshape(t, c, resolution, fx, resolution, fy)
        .mean(axis=(3, 5), dtype=np.float64)
        .astype(np.float32)
    )


def channel_sums(frames: np.ndarray) -> list[tuple[int, float, float]]:
    """(count, sum, sum of squares) of each channel of one window, in float64 (one channel at a time,
    so that a worker holds one float64 channel, not the whole window)."""
    out = []
    for i in range(frames.shape[1]):
        channel = frames[:, i].astype(np.float64)
        out.append((channel.size, float(channel.sum()), float((channel**2).sum())))
    return out


class _FieldStats:
    """Per-field moments over the training windows, summed window by window in the order written
    (so they come out the same for any number of workers)."""

    def __init__(self) -> None:
        self.acc: dict[str, list[float]] = {}

    def add(self, names: Sequence[str], sums: Sequence[tuple[int, float, float]]) -> None:
        for name, (n, s1, s2) in zip(names, sums, strict=True):
            a = self.acc.setdefault(name, [0.0, 0.0, 0.0])
            a[0] += n
            a[1] += s1
            a[2] += s2

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, (n, s1, s2) in sorted(self.acc.items()):
            mean, ms = s1 / n, s2 / n
            out[name] = {
                "mean": mean,
                "std": float(np.sqrt(max(ms - mean**2, 0.0))),
                "rms": float(np.sqrt(ms)),
                "count": int(n),  # the elements summed: what `shards merge` weights parts by
            }
        return out

    @classmethod
    def from_result(cls, fields: dict[str, dict[str, Any]]) -> _FieldStats:
        """Sums back from stored mean/rms/count (`result()`'s output), to combine parts."""
        stats = cls()
        for name, entry in fields.items():
            n = entry["count"]
            stats.acc[name] = [float(n), entry["mean"] * n, entry["rms"] ** 2 * n]
        return stats


@dataclass
class PrepareSummary:
    """What `prepare` wrote and what it left out, and why."""

    samples: dict[str, dict[str, int]] = field(default_factory=dict)  # data set -> split -> windows
    skipped: dict[str, str] = field(default_factory=dict)  # data set -> reason
    short_files: list[str] = field(default_factory=list)  # files with fewer steps than the window


def _grid_problem(shape: tuple[int, int], resolution: int | None) -> str | None:
    """Why a grid cannot be block-averaged to `resolution` x `resolution` (None if it can)."""
    if resolution is None or shape == (resolution, resolution):
        return None
    if any(size < resolution or size % resolution for size in shape):
        return (
            f"grid {shape[0]}x{shape[1]} cannot be block-averaged to {resolution}x{resolution} "
            "(--resolution must divide both sizes)"
        )
    return None


def _open_sources(
    files: Sequence[tuple[Path, str | None]], window: int, resolution: int | None, summary: PrepareSummary
) -> list[tuple[Any, str | None]]:
    """Open every input; data sets MPP cannot use and files shorter than the window are recorded
    in `summary` and left out, anything malformed stops the run."""
    usable = []
    for path, split in files:
        try:
            src = open_source(path)
        except SkippedSource as exc:
            summary.skipped.setdefault(exc.dataset_name, exc.reason)
            continue
        problem = _grid_problem(tuple(src.shape), resolution)
        if problem:
            summary.skipped.setdefault(src.dataset_name, problem)
            continue
        if src.n_steps < window:
            summary.short_files.append(str(path))
            continue
        usable.append((src, split))
    # A data set with one unusable file is left out whole, so that it is never half-prepared.
    usable = [(src, split) for src, split in usable if src.dataset_name not in summary.skipped]
    if not usable:
        reasons = [f"{name}: {why}" for name, why in summary.skipped.items()]
        if summary.short_files:
            reasons.append(
                f"{len(summary.short_files)} file(s) with fewer steps than the window of {window} "
                "(lower --history/--window)"
            )
        raise DataError("nothing to prepare: " + "; ".join(reasons or ["no input files"]))
    return usable


#: Bytes of source data one unit of work reads at most (one window more if a window is larger).
UNIT_BYTES = 16 * 2**20


@dataclass(frozen=True)
class _Unit:
    """Consecutive windows of one trajectory: what one worker reads and checks at a time."""

    source: int  # index into _Reader.sources
    trajectory: int
    starts: tuple[int, ...]


@dataclass
class _Window:
    start: int
    frames: np.ndarray
    times: np.ndarray | None
    sums: list[tuple[int, float, float]]


@dataclass
class _Reader:
    """What every worker needs to read a unit: the opened sources (paths and metadata only)."""

    sources: list[Any]
    window: int
    resolution: int | None


def _read_unit(reader: _Reader, unit: _Unit) -> tuple[_Unit, list[_Window]]:
    """Read, block-average and check the windows of one unit (runs in a worker)."""
    src = reader.sources[unit.source]
    out = []
    for start in unit.starts:
        frames = src.window(unit.trajectory, start, reader.window)
        if reader.resolution:
            frames = downsample(frames, reader.resolution, str(src.path))
        if not np.isfinite(frames).all():
            raise DataError(
                f"{src.path}: trajectory {unit.trajectory} has non-finite values in steps "
                f"{start}..{start + reader.window - 1}"
            )
        out.append(
            _Window(start, frames, src.times(unit.trajectory, start, reader.window), channel_sums(frames))
        )
    return unit, out


def _units(sources: Sequence[Any], window: int, starts_of: Any) -> Iterator[_Unit]:
    """Every trajectory's windows, in input order, cut into units of at most UNIT_BYTES."""
    for index, src in enumerate(sources):
        window_bytes = window * len(src.field_names) * int(np.prod(src.shape)) * 4
        per_unit = max(1, UNIT_BYTES // max(window_bytes, 1))
        starts = list(starts_of(src))
        for traj in range(src.n_trajectories):
            for i in range(0, len(starts), per_unit):
                yield _Unit(index, traj, tuple(starts[i : i + per_unit]))


def prepare(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    options: PrepareOptions,
    command: str = "",
    progress: bool = False,
) -> PrepareSummary:
    """Write the shard set; returns what was written per data set and split, and what was skipped."""
    from tqdm import tqdm

    from foundation.data import ShardSetWriter, split_for_key
    from foundation.data.parallel import ordered_map

    window, stride = options.resolved()
    files = discover(inputs)
    provenance: dict[str, Any] = {}
    if options.part is not None:
        from foundation.data.merge import files_of_part, part_provenance

        files = files_of_part(files, *options.part, path=lambda f: f[0])
        provenance["part"] = part_provenance(*options.part, len(files))
    summary = PrepareSummary()
    sources = _open_sources(files, window, options.resolution, summary)
    fractions = options.split_fractions
    vocab = sorted({name for src, _ in sources for name in src.field_names})
    datasets: dict[str, dict[str, Any]] = {}
    stats = _FieldStats()
    shapes: dict[tuple[int, int], set[str]] = {}
    for src, _ in sources:
        shape = (options.resolution,) * 2 if options.resolution else tuple(src.shape)
        shapes.setdefault(shape, set()).add(src.dataset_name)
        info = datasets.setdefault(
            src.dataset_name,
            {
                "fields": list(src.field_names),
                "bc": list(src.bc),
                "bc_ends": [list(ends) for ends in src.bc_ends],
                "grid_type": src.grid_type,
                "shape": list(shape),
                "samples": {},
                "sources": [],
            },
        )
        if info["fields"] != list(src.field_names):
            raise DataError(
                f"{src.path}: data set {src.dataset_name!r} has fields {src.field_names} here but "
                f"{info['fields']} in another file"
            )
        info["sources"].append(str(src.path))
    for info in datasets.values():
        info["sources"].sort(key=source_order)
    if len(shapes) > 1:
        sizes = "; ".join(f"{x}x{y}: {', '.join(sorted(names))}" for (x, y), names in sorted(shapes.items()))
        raise DataError(
            f"the inputs have different grid sizes ({sizes}); a batch needs one size, so pass "
            "--resolution N (N dividing every size) to block-average them to N x N"
        )

    def starts_of(src) -> range:
        starts = range(0, src.n_steps - window + 1, stride)
        return starts[: options.max_windows_per_trajectory] if options.max_windows_per_trajectory else starts

    manifest_extra = {
        "mpp": {
            "fields": vocab,
            "history": options.history,
            "window": window,
            "resolution": list(next(iter(shapes))),
            "datasets": datasets,
            "skipped": dict(summary.skipped),
            "short_files": list(summary.short_files),
        }
    }
    schema = {
        "fields": {"description": "window of consecutive steps (steps, fields, x, y) in the source's units"},
        "bcs": {"description": "boundary code per axis (x, y): WALL 0, OPEN 1, PERIODIC 2"},
        "meta": {
            "description": "data set, field_names, params, source, trajectory, start, time, "
            "bc_ends (codes of the low and high end of each axis)"
        },
    }
    total = sum(src.n_trajectories * len(starts_of(src)) for src, _ in sources)
    with ShardSetWriter(
        out_dir,
        split_fractions=fractions,
        samples_per_shard=options.samples_per_shard,
        family="mpp",
        schema=schema,
        extra=manifest_extra,
        provenance={
            "sources": [str(p) for p, _ in files],
            "command": command,
            "seed": options.seed,
            **provenance,
        },
        seed=options.seed,
        overwrite=options.overwrite,
        allow_degenerate=options.allow_degenerate,
    ) as writer:
        bar = tqdm(total=total, desc="prepare mpp", unit="window", disable=not progress)
        reader = _Reader([src for src, _ in sources], window, options.resolution)
        for unit, windows in ordered_map(
            _read_unit, _units(reader.sources, window, starts_of), options.workers, context=reader
        ):
            src, split = sources[unit.source]
            stem = Path(src.path).stem
            traj = unit.trajectory
            traj_split = split or split_for_key(
                _key(src.dataset_name, stem, traj), fractions, salt=str(options.seed)
            )
            params = src.parameters(traj)
            counts = datasets[src.dataset_name]["samples"]
            for win in windows:
                meta = {
                    "dataset": src.dataset_name,
                    "field_names": list(src.field_names),
                    "params": params,
                    "source": Path(src.path).name,
                    "trajectory": traj,
                    "start": win.start,
                    "bc_ends": [list(ends) for ends in src.bc_ends],
                }
                if win.times is not None:
                    meta["time"] = [float(t) for t in win.times]
                key = _key(src.dataset_name, stem, f"t{traj:05d}", f"s{win.start:05d}")
                writer.write(
                    {
                        "__key__": key,
                        "fields": win.frames,
                        "bcs": np.asarray(src.bc, dtype=np.int64),
                        "meta": meta,
                    },
                    split=traj_split,
                    source=str(src.path),
                )
                counts[traj_split] = counts.get(traj_split, 0) + 1
                if traj_split == "train":
                    stats.add(src.field_names, win.sums)
                bar.update(1)
        bar.close()
        writer.stats["fields"] = stats.result()
    summary.samples = {name: info["samples"] for name, info in datasets.items()}
    return summary


def merge_stats(parts: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`shards merge` of mpp parts: what one prepare over all their inputs stores. `stats.fields`
    from each part's stored count, mean and rms (the sums back, added, divided again: equal to
    rounding); `extra.mpp` per data set: sample counts added, sources joined (sorted by path), the
    rest equal in every part; the field vocabulary and skipped inputs joined."""
    from foundation.data.merge import refuse_difference

    same = "parts of one set must be prepared with the same options"
    refuse_difference(parts, lambda m: _other(m.stats, "fields"), "stats", same)
    refuse_difference(parts, lambda m: _other(m.extra, "mpp"), "extra", same)
    for key in ("history", "window", "resolution"):
        refuse_difference(parts, lambda m, k=key: _mpp(m).get(k), f"extra.mpp.{key}", same)
    stats = dict(parts[0].manifest.stats)
    stats["fields"] = _merge_field_stats(parts)
    extra = dict(parts[0].manifest.extra)
    extra["mpp"] = _merge_mpp_extra(parts)
    return stats, extra


def _other(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


def _mpp(manifest: Any) -> dict[str, Any]:
    return manifest.extra.get("mpp") or {}


def _merge_field_stats(parts: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Each part's sums, back from its stored count, mean and rms; a part written before the count
    was stored has its sums recomputed from its training windows (`_field_stats_from_shards`)."""
    total = _FieldStats()
    for part in parts:
        fields = part.manifest.stats.get("fields") or {}
        counted = all(isinstance(e, dict) and isinstance(e.get("count"), int) for e in fields.values())
        sums = _FieldStats.from_result(fields) if counted else _field_stats_from_shards(part)
        for name, (n, s1, s2) in sums.acc.items():
            total.add([name], [(n, s1, s2)])
    return total.result()


def _field_stats_from_shards(part: Any) -> _FieldStats:
    """The per-field sums of a part's training windows, read back from its train shards one sample
    at a time (the windows prepare summed are the `fields` arrays it wrote, so this is exact to
    float64 rounding, in memory one window)."""
    from foundation.data import ShardReader

    info = part.manifest.splits.get("train")
    stats = _FieldStats()
    for shard in info.shards if info else []:
        reader = ShardReader(
            part.path / shard.name,
            part.manifest.schema,
            expected_bytes=shard.bytes,
            expected_samples=shard.samples,
        )
        try:
            for i in range(len(reader.keys)):
                sample = reader.sample(i, ["fields", "meta"])
                names = sample["meta"].get("field_names") if isinstance(sample["meta"], dict) else None
                frames = np.asarray(sample["fields"])
                if not isinstance(names, list) or frames.ndim != 4 or len(names) != frames.shape[1]:
                    raise DataError(
                        f"part {part.label}: {shard.name} sample {reader.keys[i]!r} has no field_names "
                        "matching its fields' channels; re-create that part"
                    )
                stats.add(names, channel_sums(frames))
        finally:
            reader.close()
    return stats


_DATASET_SAME = ("fields", "bc", "bc_ends", "grid_type", "shape")


def _merge_mpp_extra(parts: Sequence[Any]) -> dict[str, Any]:
    merged = dict(_mpp(parts[0].manifest))
    skipped: dict[str, str] = {}
    for part in parts:
        for name, reason in _mpp(part.manifest).get("skipped", {}).items():
            skipped.setdefault(name, reason)
    datasets: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}
    for part in parts:
        for name, info in _mpp(part.manifest).get("datasets", {}).items():
            if name in skipped:
                raise DataError(
                    f"part {part.label}: data set {name!r} is prepared here but another part left it out "
                    f"({skipped[name]}); one run leaves a data set with an unusable file out whole — "
                    "fix or remove that file, or prepare the data set in one part"
                )
            have = datasets.get(name)
            if have is None:
                datasets[name] = {**info, "samples": dict(info["samples"]), "sources": list(info["sources"])}
                owner[name] = part.label
                continue
            for key in _DATASET_SAME:
                if have[key] != info[key]:
                    raise DataError(
                        f"part {part.label}: extra.mpp.datasets.{name}.{key} is {info[key]!r} but "
                        f"{have[key]!r} in part {owner[name]}; the parts read different data sets of one name"
                    )
            for split, n in info["samples"].items():
                have["samples"][split] = have["samples"].get(split, 0) + n
            have["sources"].extend(info["sources"])
    for info in datasets.values():
        info["sources"] = sorted(info["sources"], key=source_order)
    merged["fields"] = sorted({f for p in parts for f in _mpp(p.manifest).get("fields", [])})
    merged["datasets"] = {name: datasets[name] for name in sorted(datasets)}
    merged["skipped"] = skipped
    merged["short_files"] = sorted(f for p in parts for f in _mpp(p.manifest).get("short_files", []))
    return merged
