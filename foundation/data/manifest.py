"""`manifest.json`: the contract describing a shard set (see docs/shards.md).

`Manifest.load(dir)` validates the whole file and raises `DataError` with the offending key, so
a loader or a family can trust what it reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation import atomic
from foundation.data.schema import FieldSpec, check_field_name
from foundation.errors import DataError

log = logging.getLogger(__name__)

FORMAT_NAME = "foundation-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLIT_NAMES = ("train", "valid", "test")
_SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
"""A larger manifest.json is refused unread (ours: ~150 bytes per shard, i.e. ~1.7 million shards)."""
MAX_MANIFEST_DEPTH = 64
"""Deeper nesting of JSON objects/lists is refused (ours nest 6 levels; stats/extra rarely more)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def check_split_name(split: Any) -> str:
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise DataError(
            f"split name {split!r} is not allowed: use lower-case letters, digits and '_' "
            f"(the usual ones are {', '.join(SPLIT_NAMES)})"
        )
    return split


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class FileInfo:
    """An extra file copied into the shard set (e.g. a tokenizer)."""

    name: str
    bytes: int
    sha256: str
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "bytes": self.bytes, "sha256": self.sha256}
        if self.description:
            out["description"] = self.description
        return out


@dataclass
class SplitInfo:
    name: str
    shards: list[ShardInfo]
    field_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per numeric field: count, nonfinite, mean, std, min, max over every element of every sample."""

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "bytes": self.bytes,
            "shards": [s.to_dict() for s in self.shards],
            "field_stats": self.field_stats,
        }


@dataclass
class Manifest:
    """A shard set's description. `path` is the shard-set directory (None until saved/loaded)."""

    schema: dict[str, FieldSpec]
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    family: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    """Statistics the family needs at training time (e.g. normalisation), as the family wrote them."""
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileInfo] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    split_rule: dict[str, Any] | None = None
    """How samples were routed to splits by key hash (fractions, salt), so a grown data set keeps it."""
    format_version: int = FORMAT_VERSION
    member_crc32: bool = True
    """True if every member's CRC-32 is in its tar header (devmajor/devminor), as our writer does."""
    path: Path | None = None

    # ------------------------------------------------------------------ access

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            where = f" in {self.path}" if self.path else ""
            have = ", ".join(sorted(self.splits)) or "none"
            raise DataError(f"no split {name!r}{where}; the shard set has: {have}")
        return self.splits[name]

    def shard_paths(self, split: str) -> list[Path]:
        base = self._base()
        return [base / s.name for s in self.split(split).shards]

    def file_path(self, name: str) -> Path:
        """Path of an extra file recorded in the manifest (e.g. 'tokenizer.json')."""
        if name not in self.files:
            have = ", ".join(sorted(self.files)) or "none"
            raise DataError(f"shard set {self.path} has no file {name!r} (files: {have})")
        return self._base() / name

    def field_stats(self, split: str = "train") -> dict[str, dict[str, Any]]:
        return self.split(split).field_stats

    def _base(self) -> Path:
        if self.path is None:
            raise DataError("this manifest has no directory yet (it was never saved or loaded)")
        return self.path

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": {
                "name": FORMAT_NAME,
                "version": self.format_version,
                "member_crc32": self.member_crc32,
            },
            "family": self.family,
            "schema": {name: spec.to_dict() for name, spec in self.schema.items()},
            "splits": {name: info.to_dict() for name, info in sorted(self.splits.items())},
            "split_rule": self.split_rule,
            "stats": self.stats,
            "extra": self.extra,
            "files": [f.to_dict() for f in sorted(self.files.values(), key=lambda f: f.name)],
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        """The manifest text; raises DataError if stats/extra/provenance hold non-JSON values."""
        try:
            data = json.loads(json.dumps(self.to_dict(), default=_json_default))  # numpy -> plain
        except (TypeError, ValueError) as exc:
            raise DataError(f"manifest: stats/extra/provenance must be JSON-serialisable ({exc})") from None
        return json.dumps(_finite(data, "manifest"), indent=1, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        if not isinstance(data, Mapping):
            raise DataError(
                f"{where}: expected a JSON object at the top level, got {type(data).__name__}; this is not "
                "a foundation shard-set manifest"
            )
        fmt = data.get("format")
        if not isinstance(fmt, Mapping) or fmt.get("name") != FORMAT_NAME:
            raise DataError(
                f"{where}: 'format.name' must be {FORMAT_NAME!r}; this is not a foundation shard set"
            )
        version = fmt.get("version")
        if not isinstance(version, int) or version < 1:
            raise DataError(f"{where}: 'format.version' must be a positive integer")
        if version > FORMAT_VERSION:
            raise DataError(
                f"{where}: shard format version {version} is newer than this package reads "
                f"({FORMAT_VERSION}); upgrade foundation"
            )
        family = data.get("family")
        if family is not None and not isinstance(family, str):
            raise DataError(f"{where}: 'family' must be a string or null")
        schema_data = data.get("schema")
        if not isinstance(schema_data, Mapping) or not schema_data:
            raise DataError(f"{where}: 'schema' must map field names to field descriptions")
        schema = {}
        for name, spec in schema_data.items():
            try:
                check_field_name(name)
            except DataError as exc:
                raise DataError(f"{where}: schema: {exc}") from None
            schema[name] = FieldSpec.from_dict(spec, f"{where}: schema.{name}")
        splits_data = data.get("splits")
        if not isinstance(splits_data, Mapping):
            raise DataError(f"{where}: 'splits' must map split names to shard lists")
        splits = {}
        for split, info in splits_data.items():
            check_split_name(split)
            splits[split] = _split_from_dict(split, info, f"{where}: splits.{split}")
        for key in ("stats", "extra", "provenance"):
            if not isinstance(data.get(key, {}), Mapping):
                raise DataError(f"{where}: {key!r} must be a JSON object")
        files = {}
        for i, item in enumerate(data.get("files", [])):
            ctx = f"{where}: files[{i}]"
            if not isinstance(item, Mapping):
                raise DataError(f"{ctx}: expected an object")
            info = FileInfo(
                _str(item, "name", ctx),
                _int(item, "bytes", ctx),
                _sha(item, ctx),
                item.get("description"),
            )
            _check_plain_name(info.name, ctx)
            files[info.name] = info
        split_rule = data.get("split_rule")
        if split_rule is not None and not isinstance(split_rule, Mapping):
            raise DataError(f"{where}: 'split_rule' must be an object or null")
        return cls(
            schema=schema,
            splits=splits,
            family=family,
            stats=dict(data.get("stats", {})),
            extra=dict(data.get("extra", {})),
            files=files,
            provenance=dict(data.get("provenance", {})),
            split_rule=dict(split_rule) if split_rule is not None else None,
            format_version=version,
            member_crc32=bool(fmt.get("member_crc32", False)),
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """Read and validate `<directory>/manifest.json`."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.exists():
            raise DataError(
                f"shard directory {str(directory)!r} does not exist; create shards with "
                "`foundation prepare <family> ...` (or `foundation.data.ShardSetWriter`)"
            )
        if not path.is_file():
            raise DataError(
                f"{str(directory)!r} has no {MANIFEST_NAME}: it is not a shard set (or writing it was "
                "interrupted); create shards with `foundation prepare <family> ...`, or index existing "
                "webdataset tars with `foundation shards index DIR`"
            )
        data = _read_json(path)
        manifest = cls.from_dict(data, str(path))
        manifest.path = directory
        return manifest

    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Write `manifest.json` atomically (temporary name, then rename)."""
        directory = Path(directory) if directory is not None else self._base()
        target = atomic.write_text(directory / MANIFEST_NAME, self.to_json() + "\n")
        self.path = directory
        return target


def _read_json(path: Path) -> Any:
    """The parsed manifest: bounded in size and nesting, every failure one DataError line."""
    try:
        with open(path, "rb") as handle:
            too_big = os.fstat(handle.fileno()).st_size > MAX_MANIFEST_BYTES
            raw = b"" if too_big else handle.read(MAX_MANIFEST_BYTES + 1)  # + 1: it may grow meanwhile
    except OSError as exc:
        raise DataError(f"{path}: unreadable manifest ({exc.strerror})") from None
    if too_big or len(raw) > MAX_MANIFEST_BYTES:
        raise DataError(
            f"{path}: manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB; this is not a manifest "
            "written by foundation (re-create it with `foundation shards index`)"
        )
    too_deep = False
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        data, too_deep = None, True
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: unreadable manifest ({(str(exc).splitlines() or [''])[0]})") from None
    if too_deep or _depth_exceeds(data, MAX_MANIFEST_DEPTH):
        raise DataError(
            f"{path}: manifest JSON is nested deeper than {MAX_MANIFEST_DEPTH} levels; this is not a "
            "manifest written by foundation (re-create it with `foundation shards index`)"
        )
    return data


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True if lists/objects nest deeper than `limit` (iterative: no recursion to blow)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _finite(value: Any, path: str) -> Any:
    """Strict JSON has no NaN/Infinity: such values in stats/extra are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("manifest: %s is %s; written as null (JSON has no NaN/Infinity)", path, value)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _str(item: Mapping, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty string")
    return value


def _int(item: Mapping, key: str, where: str) -> int:
    value = item.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"{where}: {key!r} must be a non-negative integer")
    return value


def _sha(item: Mapping, where: str) -> str:
    value = item.get("sha256")
    if not isinstance(value, str) or not _SHA_RE.match(value):
        raise DataError(f"{where}: 'sha256' must be 64 lower-case hex digits")
    return value


def _check_plain_name(name: str, where: str) -> None:
    if "/" in name or "\\" in name or name in (".", "..") or name == MANIFEST_NAME:
        raise DataError(f"{where}: {name!r} must be a plain file name inside the shard set")


def _split_from_dict(split: str, info: Any, where: str) -> SplitInfo:
    if not isinstance(info, Mapping) or not isinstance(info.get("shards"), list):
        raise DataError(f"{where}: expected an object with a 'shards' list")
    shards = []
    for i, item in enumerate(info["shards"]):
        ctx = f"{where}.shards[{i}]"
        if not isinstance(item, Mapping):
            raise DataError(f"{ctx}: expected an object")
        shard = ShardInfo(
            _str(item, "name", ctx), _int(item, "samples", ctx), _int(item, "bytes", ctx), _sha(item, ctx)
        )
        _check_plain_name(shard.name, ctx)
        shards.append(shard)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise DataError(f"{where}: a shard is listed twice")
    stats = info.get("field_stats", {})
    if not isinstance(stats, Mapping):
        raise DataError(f"{where}.field_stats must be an object")
    split_info = SplitInfo(split, shards, dict(stats))
    for key in ("samples", "bytes"):
        if key in info and info[key] != getattr(split_info, key):
            raise DataError(
                f"{where}: {key!r} is {info[key]} but its shards add up to {getattr(split_info, key)}"
            )
    return split_info
