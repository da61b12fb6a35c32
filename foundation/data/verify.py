"""`foundation shards verify`: check a shard set end to end and say exactly what is wrong where.

Checks, per shard: presence, size and sha256 against the manifest; tar structure and header
checksums; each member's CRC-32 (written by our writer, so a flipped byte is traced to its
member); member names against the schema; sample count; every sample decoded and checked
against the schema (dtype, shape, kind). Plus: extra files' sha256 and keys unique per split.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from foundation.data.manifest import Manifest
from foundation.data.reader import ShardReader, file_sha256
from foundation.errors import DataError


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class _Stop(Exception):
    pass


def verify_shard_set(
    path: str | os.PathLike,
    splits: Sequence[str] | None = None,
    all_problems: bool = False,
    progress: bool | None = None,
) -> VerifyReport:
    """Verify a shard set; stops at the first problem unless `all_problems`."""
    from tqdm import tqdm

    manifest = Manifest.load(path)
    assert manifest.path is not None
    report = VerifyReport()

    def problem(message: str) -> None:
        report.problems.append(message)
        if not all_problems:
            raise _Stop

    selected = list(splits) if splits else sorted(manifest.splits)
    for split in selected:
        manifest.split(split)  # clear error for an unknown split
    total = sum(manifest.splits[s].bytes for s in selected)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="verify",
        disable=not (progress or (progress is None and sys.stderr.isatty())),
    )
    try:
        for name, info in sorted(manifest.files.items()):
            file_path = manifest.path / name
            if not file_path.is_file():
                problem(f"file {name} is listed in the manifest but missing")
            elif file_sha256(file_path) != info.sha256:
                problem(f"file {name}: sha256 does not match the manifest (damaged or replaced)")
        for split in selected:
            hashes: list[np.ndarray] = []
            for shard in manifest.splits[split].shards:
                hashes.append(_verify_shard(manifest, shard, problem, report))
                bar.update(shard.bytes)
            _check_unique_keys(manifest, split, hashes, problem)
    except _Stop:
        pass
    finally:
        bar.close()
    return report


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """64-bit hashes of sample keys (for uniqueness checks over splits too large to hold the keys)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
        dtype=np.uint64,
    )


def duplicate_keys(
    hashes: Sequence[np.ndarray], limit: int = 20
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pairs of places ((shard, index in shard), ...) whose key hashes (`key_hashes`, one array per
    shard) are equal, at most `limit`. Memory: 8 bytes per sample, not the keys themselves."""
    if not hashes:
        return []
    everything = np.concatenate(hashes)
    order = np.argsort(everything, kind="stable")
    ordered = everything[order]
    dup = np.nonzero(ordered[1:] == ordered[:-1])[0]
    bounds = np.cumsum([0] + [len(h) for h in hashes])
    pairs = []
    for d in dup[:limit]:
        places = []
        for flat in (order[d], order[d + 1]):
            s = int(np.searchsorted(bounds, flat, side="right") - 1)
            places.append((s, int(flat - bounds[s])))
        pairs.append((places[0], places[1]))
    return pairs


def _check_unique_keys(manifest: Manifest, split: str, hashes: list[np.ndarray], problem) -> None:
    """Keys must be unique across the shards of a split (each shard was checked on its own)."""
    shards = manifest.splits[split].shards
    for (a, i), (b, j) in duplicate_keys(hashes):
        keys = []
        for shard, index in ((a, i), (b, j)):
            reader = ShardReader(manifest.path / shards[shard].name, manifest.schema)
            keys.append(reader.keys[index])
            reader.close()
        if keys[0] == keys[1]:  # (not a 64-bit hash collision)
            names = f"{shards[a].name} and {shards[b].name}"
            problem(f"split {split!r}: sample key {keys[0]!r} appears in both {names}")


_CRC_CHUNK = 1 << 24


def _member_crc32(reader: ShardReader, member) -> int:
    """CRC-32 of a member's data, read in bounded chunks (a member may be gigabytes)."""
    crc, end = 0, member.offset + member.size
    for start in range(member.offset, end, _CRC_CHUNK):
        crc = zlib.crc32(reader.read(start, min(_CRC_CHUNK, end - start)), crc)
    return crc


def _verify_shard(manifest: Manifest, shard, problem, report: VerifyReport) -> np.ndarray:
    empty = np.zeros(0, dtype=np.uint64)
    path = manifest.path / shard.name
    if not path.is_file():
        problem(f"shard {shard.name}: listed in the manifest but missing")
        return empty
    report.shards += 1
    size = path.stat().st_size
    report.bytes += size
    if size != shard.bytes:
        problem(
            f"shard {shard.name}: {size} bytes on disk, the manifest records {shard.bytes} "
            "(truncated or replaced)"
        )
    digest = file_sha256(path)
    sha_ok = digest == shard.sha256
    if not sha_ok:
        problem_text = f"shard {shard.name}: sha256 does not match the manifest"
    try:
        reader = ShardReader(path, manifest.schema, keep_members=True)
    except DataError as exc:
        problem(str(exc) if sha_ok else f"{problem_text}; {exc}")
        return empty
    try:
        located = False
        if manifest.member_crc32 and reader.members is not None:
            for member in reader.members:
                if member.crc32 is not None and _member_crc32(reader, member) != member.crc32:
                    located = True
                    also = "; sha256 does not match the manifest either" if not sha_ok else ""
                    problem(
                        f"shard {shard.name} member {member.name!r}: data does not match its CRC-32 "
                        f"(damaged bytes){also}"
                    )
        if not sha_ok and not located:
            problem(f"{problem_text} (damaged or replaced; the damaged member could not be located)")
        if len(reader) != shard.samples:
            problem(f"shard {shard.name}: holds {len(reader)} samples, the manifest records {shard.samples}")
        for i in range(len(reader)):
            try:
                reader.sample(i, copy=False)
            except DataError as exc:
                problem(str(exc))
            report.samples += 1
        return key_hashes(reader.keys)
    finally:
        reader.close()
