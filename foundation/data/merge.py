"""`foundation shards merge PARTS... --out SHARDS`: join partial shard sets into one.

Each task of a SLURM array (one per input partition) writes a partial shard set; this joins them
so that downstream nothing differs from a set written in one go: the same keys in the same
splits, the same sample bytes, the same `field_stats` (to float rounding) and family statistics.
The contract (what must agree, what is combined, what is refused) is in docs/shards.md,
"Merging partial shard sets".

Order: parts are sorted by folder name (then full path), so the merged set does not depend on
the order they are given in; within a split, the shards of the first part come first, each
part's shards in their own order, renumbered `<split>-000000.tar` onwards.

Nothing half-written: everything goes into a hidden folder beside `--out` (shards hard-linked
when on the same file system, else copied; each shard's sha256 and size re-checked against its
part's manifest), the manifest is written last, and the folder is renamed into place, all under
`--out`'s `FolderLock`.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from foundation import atomic
from foundation.data.manifest import FileInfo, Manifest, ShardInfo, SplitInfo, shard_name
from foundation.data.reader import ShardReader, file_sha256
from foundation.data.schema import FieldSpec
from foundation.data.summary import (
    DegenerateDataError,
    degenerate_reason,
    merged_field_stats,
)
from foundation.data.verify import duplicate_keys, key_hashes
from foundation.errors import DataError
from foundation.lock import FolderLock, command_line

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


@dataclass(frozen=True)
class Part:
    """One partial shard set: its folder as given, and its validated manifest."""

    label: str
    manifest: Manifest

    @property
    def path(self) -> Path:
        assert self.manifest.path is not None
        return self.manifest.path


def load_parts(paths: Sequence[str | os.PathLike]) -> list[Part]:
    """The parts' manifests, sorted by folder name (then full path): the merge order."""
    if not paths:
        raise DataError("shards merge needs at least one part (a shard-set folder)")
    parts = [Part(str(p), Manifest.load(p)) for p in paths]
    parts.sort(key=lambda part: (part.path.name, str(part.path)))
    seen: dict[Path, str] = {}
    for part in parts:
        real = part.path.resolve()
        if real in seen:
            raise DataError(f"part {part.label} is given twice (also as {seen[real]}); give each part once")
        seen[real] = part.label
    return parts


PART_RULE = "input files sorted by path; file i goes to part i mod N"


def files_of_part(
    files: Sequence[Any], index: int, count: int, path: Callable[[Any], Any] = lambda f: f
) -> list:
    """`prepare --part I/N`: this part's share of the input `files` (PART_RULE: sorted by
    `path(file)` as a string, file i to part i mod N), in their given order. Every part of a
    deterministic partition is non-empty, so a part cannot silently write nothing."""
    if not 0 <= index < count:
        raise DataError(f"--part {index}/{count}: the part index must be between 0 and {count - 1}")
    ranked = sorted(range(len(files)), key=lambda i: str(path(files[i])))
    mine = set(ranked[index::count])
    if not mine:
        raise DataError(
            f"--part {index}/{count}: there are only {len(files)} input file(s), so part {index} has none; "
            f"use at most {len(files)} parts"
        )
    return [f for i, f in enumerate(files) if i in mine]


def part_provenance(index: int, count: int, files: int) -> dict[str, Any]:
    """What a partial prepare records in its manifest's provenance (`part`)."""
    return {"index": index, "count": count, "rule": PART_RULE, "files": files}


# ----------------------------------------------------------------------------- compatibility


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    """The dotted key where two JSON values first differ (None if equal)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}.{key}"
            found = _first_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    return None if a == b else where


def refuse_difference(parts: Sequence[Part], get: Callable[[Manifest], Any], what: str, why: str) -> None:
    """Every part must give the same value as the first one; else a one-line error naming both."""
    first = parts[0]
    for part in parts[1:]:
        where = _first_difference(get(first.manifest), get(part.manifest), what)
        if where is not None:
            raise DataError(f"part {part.label}: {where} differs from part {first.label}'s; {why}")


def check_part_coverage(parts: Sequence[Part]) -> None:
    """Parts written with `prepare --part I/N` must be all N of one partition, each once: a
    missing part would make a set that silently lacks its files."""
    records = [(p, p.manifest.provenance.get("part")) for p in parts]
    marked = [(p, r) for p, r in records if isinstance(r, Mapping)]
    if not marked:
        return
    if len(marked) < len(records):
        plain = next(p for p, r in records if not isinstance(r, Mapping))
        raise DataError(
            f"part {plain.label} was prepared from all its inputs but part {marked[0][0].label} with "
            "--part; merge the N parts of one partition only"
        )
    first, record = marked[0]
    count = record.get("count")
    seen: dict[Any, str] = {}
    for part, mine in marked:
        if mine.get("count") != count:
            raise DataError(
                f"part {part.label} is part of {mine.get('count')} but part {first.label} of {count}; "
                "merge the parts of one partition"
            )
        index = mine.get("index")
        if index in seen:
            raise DataError(f"parts {seen[index]} and {part.label} are both part {index}; give each once")
        seen[index] = part.label
    missing = [i for i in range(count) if i not in seen] if isinstance(count, int) else []
    if missing:
        raise DataError(
            f"part(s) {missing} of {count} are missing (provenance.part of the parts given); prepare and "
            "give every part (`prepare ... --part I/N`)"
        )


def merged_schema(parts: Sequence[Part]) -> dict[str, FieldSpec]:
    """The schema one writer over all samples would infer: same fields, kinds, dtypes and
    annotations; an array dimension that differs between parts becomes null (varies)."""
    first = parts[0]
    schema = dict(first.manifest.schema)
    for part in parts[1:]:
        mine = part.manifest.schema
        if set(mine) != set(schema):
            odd = sorted(set(mine) ^ set(schema))
            raise DataError(
                f"part {part.label}: schema fields differ from part {first.label}'s (field(s) {odd}); "
                "parts of one set must be prepared with the same options"
            )
        for name, spec in mine.items():
            schema[name] = _merge_field(schema[name], spec, name, part, first)
    return schema


def _merge_field(have: FieldSpec, spec: FieldSpec, name: str, part: Part, first: Part) -> FieldSpec:
    for key in ("kind", "dtype", "unit", "description", "optional"):
        if getattr(have, key) != getattr(spec, key):
            raise DataError(
                f"part {part.label}: schema.{name}.{key} is {getattr(spec, key)!r} but "
                f"{getattr(have, key)!r} in part {first.label}; parts must be prepared with the same options"
            )
    if have.shape is None or spec.shape is None or have.shape == spec.shape:
        return have
    if len(have.shape) != len(spec.shape):
        raise DataError(
            f"part {part.label}: schema.{name}.shape has {len(spec.shape)} dimensions but "
            f"{len(have.shape)} in part {first.label}"
        )
    shape = tuple(a if a == b else None for a, b in zip(have.shape, spec.shape, strict=True))
    return replace(have, shape=shape)


#: Extra files named so belong to one part only (values a family's `merge_stats` pools): they are
#: neither compared between parts nor copied into the merged set.
PART_FILE_PREFIX = "part-"


def shared_files(manifest: Manifest) -> dict[str, FileInfo]:
    """The extra files every part must hold alike (all but the per-part ones)."""
    return {name: info for name, info in manifest.files.items() if not name.startswith(PART_FILE_PREFIX)}


def load_part_array(part: Part, name: str) -> np.ndarray:
    """A per-part .npy file the part's manifest lists, checked against the size and sha256 it
    records, loaded without unpickling."""
    info = part.manifest.files.get(name)
    if info is None:
        raise DataError(
            f"part {part.label}: its manifest lists no file {name!r}; prepare the part again with "
            "`prepare ... --part I/N` of this version"
        )
    path = part.path / name
    if not path.is_file() or path.stat().st_size != info.bytes or file_sha256(path) != info.sha256:
        raise DataError(
            f"part {part.label}: file {name} is missing or does not match its manifest (size, sha256); "
            "re-create that part"
        )
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataError(f"part {part.label}: file {name} is not a plain .npy array ({err})") from None


def check_compatible(parts: Sequence[Part]) -> None:
    """Family, split rule, seed and extra files must agree (the schema: `merged_schema`)."""
    same = "parts of one set must be prepared with the same options"
    check_part_coverage(parts)
    refuse_difference(parts, lambda m: m.family, "family", same)
    refuse_difference(
        parts, lambda m: m.split_rule, "split_rule", "the parts routed samples to splits differently; " + same
    )
    refuse_difference(parts, lambda m: m.provenance.get("seed"), "provenance.seed", same)
    refuse_difference(
        parts,
        lambda m: {name: (f.bytes, f.sha256) for name, f in shared_files(m).items()},
        "files",
        "an extra file (e.g. a tokenizer) fitted per part cannot stand for the merged set; prepare "
        "every part with the same one (xval: --vocab-from SHARDS)",
    )


# ----------------------------------------------------------------------------- family statistics


NOT_COMBINABLE = (
    "family statistics and extra metadata are copied only when every part holds the same; "
    "merge cannot recompute them — prepare the parts with shared statistics, or in one run"
)


def require_equal_family_data(parts: Sequence[Part], why: str = NOT_COMBINABLE) -> tuple[dict, dict]:
    """The rule for families whose `stats`/`extra` cannot be combined: equal in every part."""
    refuse_difference(parts, lambda m: m.stats, "stats", why)
    refuse_difference(parts, lambda m: m.extra, "extra", why)
    return dict(parts[0].manifest.stats), dict(parts[0].manifest.extra)


def merge_family_data(parts: Sequence[Part]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The merged set's `stats` and `extra`, by the family's `merge_stats` rule (its registry
    entry), else equal in every part (docs/shards.md)."""
    from foundation import registry
    from foundation.errors import ConfigError

    name = parts[0].manifest.family
    try:
        family = registry.get(name) if name else None
    except ConfigError:  # a family this installation does not have: its data must simply agree
        family = None
    if family is None or family.merge_stats is None:
        return require_equal_family_data(parts)
    return family.merge_stats(parts)


# ----------------------------------------------------------------------------- field statistics


def merge_split_field_stats(parts: Sequence[Part], split: str) -> dict[str, dict[str, Any]]:
    """A split's `field_stats` over all parts: counts and min/max exactly, mean/std by the pairwise
    (Chan) update from each part's count, mean and std — what one writer would give, to rounding."""
    _refuse_missing_field_stats(parts, split)
    per_part = [info.field_stats if (info := part.manifest.splits.get(split)) else {} for part in parts]
    masks: dict[str, str] = {}
    for part, field_stats in zip(parts, per_part, strict=True):
        for name, data in sorted(field_stats.items()):
            mask = data.get("mask") if isinstance(data, Mapping) else None
            if mask is not None and masks.setdefault(name, mask) != mask:
                raise DataError(
                    f"part {part.label}: splits.{split}.field_stats.{name}.mask is {mask!r} but "
                    f"{masks[name]!r} in another part; parts must use the same masks"
                )
    return merged_field_stats(per_part)


def _refuse_missing_field_stats(parts: Sequence[Part], split: str) -> None:
    """A part with samples in `split` but no statistics of a (non-optional) field another part has
    (written with field_stats=False) would leave the merged numbers silently partial."""
    infos = [(p, p.manifest.splits.get(split)) for p in parts]
    infos = [(p, info) for p, info in infos if info is not None and info.samples]
    have = {name for _, info in infos for name in info.field_stats}
    for part, info in infos:
        missing = sorted(n for n in have - set(info.field_stats) if not part.manifest.schema[n].optional)
        if missing:
            raise DataError(
                f"part {part.label}: splits.{split}.field_stats lacks field(s) {missing} that other parts "
                "have (written with field_stats=False?); re-create that part with statistics"
            )


def check_degenerate(
    splits: Mapping[str, SplitInfo], schema: Mapping[str, FieldSpec], out: Path, allow: bool
) -> dict[str, str]:
    """The writer's degenerate-field rules over the merged set (all splits); {field: what} when
    allowed, DegenerateDataError otherwise."""
    stats = merged_field_stats(info.field_stats for info in splits.values())
    found = {}
    for name, entry in stats.items():
        reason = degenerate_reason(entry, schema[name]) if name in schema else None
        if reason is not None:
            found[name] = reason[1]
    if found and not allow:
        listed = "; ".join(f"field {name!r} {what}" for name, what in found.items())
        raise DegenerateDataError(
            f"{out}: the merged data are degenerate, so nothing was written: {listed}. Check the parts "
            "(`foundation shards info PART`), or pass --allow-degenerate to merge them anyway"
        )
    return found


# ----------------------------------------------------------------------------- shards


@dataclass
class _Progress:
    """A byte counter for the progress bar (tqdm, created only when asked for)."""

    bar: Any = None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


def _hard_link(source: Path, target: Path) -> bool:
    """Link `target` to `source`; False where the file system refuses (then it is copied)."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _hash(path: Path, bar: _Progress) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            sha.update(chunk)
            bar.update(len(chunk))
    return sha.hexdigest()


def _copy(source: Path, target: Path, bar: _Progress) -> str:
    """Copy, hashing the bytes written (publishing flushes them to disk)."""
    sha = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            sha.update(chunk)
            dst.write(chunk)
            bar.update(len(chunk))
    return sha.hexdigest()


def place_shard(source: Path, target: Path, info: ShardInfo, part: Part, link: bool, bar: _Progress) -> None:
    """Put one shard at `target` (hard link or copy), after checking that the bytes there have
    the size and sha256 its part's manifest records."""
    try:
        size = source.stat().st_size
    except FileNotFoundError:
        raise DataError(
            f"part {part.label}: shard {info.name} is listed in its manifest but missing"
        ) from None
    if size != info.bytes:
        raise DataError(
            f"part {part.label}: shard {info.name} has {size} bytes, its manifest records {info.bytes} "
            "(truncated or replaced); re-create that part"
        )
    digest = _hash(target, bar) if link and _hard_link(source, target) else _copy(source, target, bar)
    if digest != info.sha256:
        raise DataError(
            f"part {part.label}: shard {info.name}: sha256 does not match its manifest (damaged or "
            "replaced); re-create that part (`foundation shards verify` names the damaged member)"
        )


@dataclass
class _Placed:
    """A shard of the merged set: where it came from and its keys' hashes."""

    part: Part
    source: ShardInfo
    target: ShardInfo
    hashes: np.ndarray


def place_split(
    parts: Sequence[Part],
    split: str,
    folder: Path,
    schema: Mapping[str, FieldSpec],
    link: bool,
    bar: _Progress,
) -> list[_Placed]:
    """Every part's shards of `split` in merge order, renumbered into `folder`."""
    placed = []
    for part in parts:
        info = part.manifest.splits.get(split)
        for shard in info.shards if info else []:
            name = shard_name(split, len(placed))
            target = folder / name
            place_shard(part.path / shard.name, target, shard, part, link, bar)
            reader = ShardReader(target, schema, expected_samples=shard.samples)
            try:
                hashes = key_hashes(reader.keys)
            finally:
                reader.close()
            placed.append(
                _Placed(part, shard, ShardInfo(name, shard.samples, shard.bytes, shard.sha256), hashes)
            )
    return placed


def refuse_overlapping_keys(placed: Sequence[_Placed], folder: Path, schema: Mapping[str, FieldSpec]) -> None:
    """A key in two parts (in any splits) would be one sample twice: refuse, naming both parts."""
    for (a, i), (b, j) in duplicate_keys([p.hashes for p in placed], limit=1000):
        keys = [_key_at(folder / placed[s].target.name, schema, k) for s, k in ((a, i), (b, j))]
        if keys[0] != keys[1]:
            continue  # a 64-bit hash collision, not the same key
        first, second = placed[a], placed[b]
        if first.part is second.part:
            raise DataError(
                f"part {first.part.label}: sample key {keys[0]!r} appears twice (shards "
                f"{first.source.name} and {second.source.name}); run `foundation shards verify` on it"
            )
        raise DataError(
            f"sample key {keys[0]!r} is in both part {first.part.label} ({first.source.name}) and part "
            f"{second.part.label} ({second.source.name}); the parts overlap — partition the inputs so "
            "that each sample is written by one task"
        )


def _key_at(path: Path, schema: Mapping[str, FieldSpec], index: int) -> str:
    reader = ShardReader(path, schema)
    try:
        return reader.keys[index]
    finally:
        reader.close()


# ----------------------------------------------------------------------------- provenance


def merged_provenance(parts: Sequence[Part], degenerate: Mapping[str, str]) -> dict[str, Any]:
    """This merge's own run record, the parts' sources in merge order, and each part's provenance."""
    from foundation import __version__

    out: dict[str, Any] = {
        "sources": [str(s) for p in parts for s in (p.manifest.provenance.get("sources") or [])],
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "package_version": __version__,
        "seed": parts[0].manifest.provenance.get("seed"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "merged_from": [{"part": p.label, **p.manifest.provenance} for p in parts],
    }
    if degenerate:
        out["degenerate_fields"] = dict(degenerate)
    return out


# ----------------------------------------------------------------------------- the merge


def _check_out(out: Path, parts: Sequence[Part], overwrite: bool) -> None:
    real = out.resolve()
    for part in parts:
        if real == part.path.resolve() or part.path.resolve() in real.parents:
            raise DataError(f"--out {out} is part {part.label} (or inside it); merge into a new folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(
            f"--out {out} already exists and is not empty; refusing to replace it: pass --overwrite "
            "(overwrite=True), or choose another folder"
        )


def _copy_files(parts: Sequence[Part], folder: Path) -> dict[str, FileInfo]:
    """The extra files (equal in every part: checked), copied from the first part and re-hashed;
    the per-part files (PART_FILE_PREFIX) stay behind."""
    first = parts[0]
    out = {}
    for name, info in sorted(shared_files(first.manifest).items()):
        target = folder / name
        shutil.copyfile(first.path / name, target)
        if file_sha256(target) != info.sha256:
            raise DataError(
                f"part {first.label}: file {name}: sha256 does not match its manifest (damaged or replaced)"
            )
        out[name] = info
    return out


def merge_shard_sets(
    parts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    link: bool = True,
    allow_degenerate: bool = False,
    progress: bool = False,
) -> Manifest:
    """Join partial shard sets into the shard set `out` (see the module docstring); returns its
    manifest. `link=False` copies shards even where a hard link would do."""
    out = Path(out)
    loaded = load_parts(parts)
    schema = merged_schema(loaded)
    check_compatible(loaded)
    stats, extra = merge_family_data(loaded)
    _check_out(out, loaded, overwrite)
    with FolderLock(out, command_line()):
        _check_out(out, loaded, overwrite)  # again, now that no other writer can change it
        _remove_dead_temporaries(out)
        folder = atomic.temporary_name(out)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            manifest = _build(loaded, folder, schema, stats, extra, link, allow_degenerate, progress, out)
            _publish(folder, out)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    manifest.path = out
    return manifest


def _build(
    parts: Sequence[Part],
    folder: Path,
    schema: dict[str, FieldSpec],
    stats: dict[str, Any],
    extra: dict[str, Any],
    link: bool,
    allow_degenerate: bool,
    progress: bool,
    out: Path,
) -> Manifest:
    """Write the merged set into `folder` (not yet visible): shards, files, manifest last."""
    split_names = sorted({s for p in parts for s in p.manifest.splits})
    total = sum(p.manifest.splits[s].bytes for p in parts for s in p.manifest.splits)
    bar = _Progress()
    if progress:
        from tqdm import tqdm

        bar.bar = tqdm(total=total, unit="B", unit_scale=True, desc="merge")
    try:
        placed = {s: place_split(parts, s, folder, schema, link, bar) for s in split_names}
    finally:
        if bar.bar is not None:
            bar.bar.close()
    refuse_overlapping_keys([p for s in split_names for p in placed[s]], folder, schema)
    splits = {
        s: SplitInfo(s, [p.target for p in placed[s]], merge_split_field_stats(parts, s)) for s in split_names
    }
    degenerate = check_degenerate(splits, schema, out, allow_degenerate)
    manifest = Manifest(
        schema=schema,
        splits=splits,
        family=parts[0].manifest.family,
        stats=stats,
        extra=extra,
        files=_copy_files(parts, folder),
        provenance=merged_provenance(parts, degenerate),
        split_rule=parts[0].manifest.split_rule,
        member_crc32=all(p.manifest.member_crc32 for p in parts),
    )
    manifest.save(folder)
    return manifest


def _remove_dead_temporaries(out: Path) -> None:
    """Hidden folders of merges into `out` that were killed: the new set being built
    (`.<out>.tmp-<pid>`) and, once `out` is there again, an old set moved aside
    (`.<out>.old-<pid>`). Under `out`'s lock no live merge owns one."""
    if not out.parent.is_dir():
        return
    prefixes = [f".{out.name}.tmp-"] + ([f".{out.name}.old-"] if out.exists() else [])
    for path in out.parent.iterdir():
        if any(path.name.startswith(p) for p in prefixes) and path.is_dir() and not path.is_symlink():
            log.warning("%s: removing %s, left by an interrupted merge", out, path.name)
            shutil.rmtree(path, ignore_errors=True)


def _publish(folder: Path, out: Path) -> None:
    """Rename the finished folder to `out`. An existing `out` (checked: empty, or --overwrite) is
    moved aside first and removed only once the new set is in place."""
    aside = None
    if out.exists():
        aside = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, aside)
    try:
        atomic.publish(folder, out, overwrite=False)
    except BaseException:
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
