"""Make a manifest for tar shards written by other tools (webdataset's TarWriter/ShardWriter,
`tar` itself): `foundation shards index DIR`.

Shard files are left as they are. Splits come from the file names (`<split>-<anything>.tar`)
unless given explicitly. The schema is inferred from every member: `.npy` headers give dtype
and shape, `.json` holding one number/bool is a scalar field (other JSON is metadata), `.txt`
is text, `.cls`/`.id`/... are integer scalars. Pickles and media members are refused.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from foundation.data import codec, tario
from foundation.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo, check_split_name
from foundation.data.reader import check_keys, file_sha256
from foundation.data.schema import READ_EXTS, FieldSpec, check_field_name, merge_spec
from foundation.data.verify import duplicate_keys, key_hashes
from foundation.data.writer import RunningStats
from foundation.errors import DataError

_INT_EXTS = {"cls", "cls2", "index", "inx", "id"}


def _member_spec(buf, member: tario.Member, ext: str, shard: str) -> tuple[FieldSpec, object]:
    where = f"shard {shard} member {member.name!r}"
    if ext == "npy":
        try:
            header = codec.npy_header(buf, member.offset, member.size)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        value = codec.npy_view(buf, member.offset, header)
        return FieldSpec("npy", header.dtype.newbyteorder("=").name, tuple(header.shape)), value
    data = buf[member.offset : member.offset + member.size]
    try:
        if ext in _INT_EXTS:
            return FieldSpec("scalar", "int64", ()), int(data)
        if ext in READ_EXTS["str"]:
            return FieldSpec("str"), data.decode("utf-8")
        if ext in READ_EXTS["json"]:
            value = json.loads(data)
            if isinstance(value, bool):
                return FieldSpec("scalar", "bool", ()), value
            if isinstance(value, int):
                return FieldSpec("scalar", "int64", ()), value
            if isinstance(value, float):
                return FieldSpec("scalar", "float64", ()), value
            return FieldSpec("json"), value
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{where}: cannot decode ({type(exc).__name__}: {str(exc)[:200]})") from None
    if ext in ("pyd", "pickle", "pkl", "pth"):
        raise DataError(
            f"{where}: pickled members are never read (they can run arbitrary code); re-write the field "
            "as .npy (arrays), .json (numbers, metadata) or .txt (text)"
        )
    raise DataError(
        f"{where}: .{ext} members are not supported by foundation shards; store arrays as .npy, numbers and "
        "metadata as .json, text as .txt"
    )


def _index_shard(
    path: Path, schema: dict[str, FieldSpec], field_counts: dict[str, int], stats: dict[str, RunningStats]
) -> list[str]:
    """Add one shard's members to the inferred schema, counts and stats; its sample keys."""
    if not path.is_file():
        raise DataError(f"shard {path.name} is not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"shard {path.name} is empty (0 bytes); remove it or re-create it")
    with open(path, "rb") as handle:
        buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        members = tario.walk(buf, path.name)
        if not members:
            raise DataError(f"shard {path.name} holds no members (an empty archive); remove it")
        keys = _sample_keys(members, path.name)
        for member in members:
            key, field, ext = tario.split_name(member.name)
            spec, value = _member_spec(buf, member, ext, path.name)
            old = schema.get(field)
            schema[field] = spec if old is None else merge_spec(old, spec, field, key)
            field_counts[field] = field_counts.get(field, 0) + 1
            if spec.dtype is not None and spec.dtype.startswith(("int", "uint", "float")):
                stats.setdefault(field, RunningStats()).update(value)
            del value
    finally:
        buf.close()
    return keys


def _sample_keys(members: Sequence[tario.Member], shard: str) -> list[str]:
    """The shard's sample keys, in order, after checking the layout the loader relies on: every
    member is `<key>.<field>.<ext>`, a sample's members are adjacent, no key or field repeats."""
    keys: list[str] = []
    seen: set[str] = set()
    fields: set[str] = set()
    for member in members:
        key, field, _ = tario.split_name(member.name)
        if not field:
            raise DataError(f"shard {shard} member {member.name!r}: no <key>.<field> structure")
        check_field_name(field)
        if not keys or keys[-1] != key:
            if key in seen:
                raise DataError(
                    f"shard {shard}: sample key {key!r} appears twice (members are not grouped by key, or "
                    "the key is duplicated); keys must be unique"
                )
            seen.add(key)
            keys.append(key)
            fields.clear()
        if field in fields:
            raise DataError(f"shard {shard} member {member.name!r}: sample {key!r} has field {field!r} twice")
        fields.add(field)
    check_keys(keys, shard)
    return keys


def _refuse_duplicate_keys(split: str, paths: Sequence[Path], hashes: Sequence) -> None:
    """Keys are unique across the shards of a split (the loader and `verify` rely on it)."""
    for (a, i), (b, j) in duplicate_keys(hashes, limit=100):
        first, second = (_shard_keys(paths[a])[i], _shard_keys(paths[b])[j])
        if first == second:  # (not a 64-bit hash collision)
            raise DataError(
                f"split {split!r}: sample key {first!r} appears in both {paths[a].name} and {paths[b].name}; "
                "keys must be unique within a split"
            )


def _shard_keys(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        return _sample_keys(tario.walk(handle.fileno(), path.name), path.name)


def index_shards(
    directory: str | os.PathLike,
    *,
    splits: Mapping[str, Sequence[str | os.PathLike]] | None = None,
    family: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write `manifest.json` for existing tar shards in `directory` and return it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{str(directory)!r} is not a directory")
    if (directory / MANIFEST_NAME).exists() and not overwrite:
        raise DataError(f"{directory} already has a {MANIFEST_NAME}; pass --overwrite to replace it")
    if splits is None:
        found: dict[str, list[Path]] = {}
        for path in sorted(directory.glob("*.tar")):
            prefix = path.name.split("-", 1)[0] if "-" in path.name else ""
            try:
                check_split_name(prefix)
            except DataError:
                raise DataError(
                    f"cannot tell the split of {path.name}: name shards <split>-<NNNNNN>.tar (e.g. "
                    "train-000000.tar) or pass --split NAME=GLOB"
                ) from None
            found.setdefault(prefix, []).append(Path(path.name))  # relative to `directory`, as --split gives
        if not found:
            raise DataError(f"no .tar shards in {directory}")
        split_paths = found
    else:
        split_paths = {check_split_name(s): [Path(p) for p in paths] for s, paths in splits.items()}
    schema: dict[str, FieldSpec] = {}
    field_counts: dict[str, int] = {}
    split_infos: dict[str, SplitInfo] = {}
    total_samples = 0
    for split, paths in split_paths.items():
        shards: list[ShardInfo] = []
        stats: dict[str, RunningStats] = {}
        hashes = []
        for path in paths:
            path = path if path.is_absolute() else directory / path
            if path.parent.resolve() != directory.resolve():
                raise DataError(f"shard {path} must be inside {directory}")
            keys = _index_shard(path, schema, field_counts, stats)
            hashes.append(key_hashes(keys))
            shards.append(ShardInfo(path.name, len(keys), path.stat().st_size, file_sha256(path)))
            total_samples += len(keys)
        _refuse_duplicate_keys(split, [directory / s.name for s in shards], hashes)
        split_infos[split] = SplitInfo(split, shards, {f: s.to_dict() for f, s in sorted(stats.items())})
    if not schema:
        raise DataError(f"the shards in {directory} hold no members")
    final = {}
    for name, spec in sorted(schema.items()):
        if field_counts[name] < total_samples:
            spec = FieldSpec(spec.kind, spec.dtype, spec.shape, optional=True)
        final[name] = spec
    manifest = Manifest(
        schema=final,
        splits=split_infos,
        family=family,
        provenance={"sources": [], "command": "foundation shards index", "indexed_existing_shards": True},
        member_crc32=False,
    )
    manifest.save(directory)
    return manifest
