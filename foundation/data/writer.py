"""Writing shard sets: samples -> `<split>-<NNNNNN>.tar` + `manifest.json`.

Atomic at the level of the whole set: shards are written under hidden temporary names and only
renamed into place when the writer closes without error, followed by the manifest. An interrupted
or failed write leaves the previous state of the directory untouched (minus hidden temporaries).

One writer per folder: a writer holds the folder's `FolderLock` from construction to close/abort,
so two `prepare` runs on one `--out` cannot both succeed; the publish step re-checks that the
lock is still its own and that no other set appeared meanwhile. The hidden temporaries of a
killed writer are removed by the next writer, which takes over its stale lock.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import platform
import re
import sys
import weakref
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from foundation.data import codec, tario
from foundation.data.manifest import (
    MANIFEST_NAME,
    FileInfo,
    Manifest,
    ShardInfo,
    SplitInfo,
    check_split_name,
    shard_name,
)
from foundation.data.remote import is_url
from foundation.data.schema import (
    FieldSpec,
    check_field_name,
    check_key,
    check_value_against,
    merge_spec,
    prepare_value,
)
from foundation.data.summary import (
    MASK_MEANINGS,
    DegenerateDataError,
    RunningStats,
    default_cause,
    degenerate_reason,
    mask_of,
    wants_stats,
)
from foundation.errors import DataError
from foundation.lock import FolderLock, LockedError, command_line

log = logging.getLogger(__name__)

DEFAULT_SPLIT_FRACTIONS = {"train": 0.9, "valid": 0.05, "test": 0.05}
_ANNOTATIONS = ("unit", "description", "optional")


def split_for_key(key: str, fractions: Mapping[str, float], salt: str = "") -> str:
    """The split a key belongs to: sha256(salt + key) as a number in [0, 1), cut at the cumulative
    fractions in their given order. Depends on nothing but the key, so adding samples never moves
    an existing one to another split."""
    digest = hashlib.sha256((salt + key).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    total = 0.0
    last = None
    for split, fraction in fractions.items():
        total += fraction
        last = split
        if u < total:
            return split
    assert last is not None
    return last


def check_split_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """`fractions` as floats, after checking the names, that each lies in [0, 1] and that they sum to 1."""
    if not isinstance(fractions, Mapping) or not fractions:
        raise DataError(
            "split_fractions must map split names to fractions, e.g. {'train': 0.9, 'valid': 0.1}"
        )
    out = {}
    for split, fraction in fractions.items():
        check_split_name(split)
        if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise DataError(f"split fraction for {split!r} must be in [0, 1], got {fraction!r}")
        out[split] = float(fraction)
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise DataError(f"split fractions must add up to 1, got {sum(out.values())} ({out})")
    return out


class _ShardFile:
    """One tar being written under a temporary name; hashes as it goes."""

    def __init__(self, directory: Path, name: str, token: str):
        self.name = name
        self.tmp = directory / f".{name}.tmp-{token}"
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.samples = 0
        self.keys: set[str] = set()

    def _put(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if key in self.keys:
            raise DataError(f"sample key {key!r} was written twice (shard {self.name}); keys must be unique")
        self.keys.add(key)
        for name, payload in members:
            self._put(tario.member_header(name, len(payload), zlib.crc32(payload)))
            self._put(payload)
            self._put(tario.padding(len(payload)))
        self.samples += 1

    def finish(self) -> ShardInfo:
        self._put(tario.END_OF_ARCHIVE)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.keys = set()
        return ShardInfo(self.name, self.samples, self.bytes, self.sha.hexdigest())

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


class _SplitState:
    def __init__(self, name: str):
        self.name = name
        self.current: _ShardFile | None = None
        self.done: list[tuple[ShardInfo, Path]] = []
        self.stats: dict[str, RunningStats] = {}
        self.key_hashes: list[np.ndarray] = []
        self.pending_hashes: list[int] = []

    @property
    def samples(self) -> int:
        return sum(info.samples for info, _ in self.done) + (self.current.samples if self.current else 0)


def check_replaceable(
    where: str,
    existing: Manifest | None,
    targets: set[str] | None,
    shard_names: Iterable[str],
    overwrite: bool,
    other: str,
) -> None:
    """The writer's rules before it writes to a folder or a URL (`where`): without `overwrite`,
    refuse to replace an existing set (or, with `targets`, those of its splits) and to write
    beside shards of the target splits that no manifest lists (an interrupted write?)."""
    if overwrite:
        return
    if existing is not None:
        clash = set(existing.splits) if targets is None else targets & set(existing.splits)
        if clash:
            what = "a shard set" if targets is None else f"split(s) {', '.join(sorted(clash))}"
            raise DataError(
                f"{where} already holds {what}; refusing to overwrite it: pass --overwrite "
                f"(overwrite=True) to replace it, or choose another {other}"
            )
    listed = {s.name for split in (existing.splits.values() if existing else []) for s in split.shards}
    stray = [
        name
        for name in shard_names
        if name not in listed and (targets is None or name.rsplit("-", 1)[0] in targets)
    ]
    if stray:
        raise DataError(
            f"{where} holds shards not listed in a manifest ({', '.join(stray[:3])}"
            f"{', ...' if len(stray) > 3 else ''}; an interrupted write?); pass --overwrite "
            "(overwrite=True) to replace them"
        )


class ShardSetWriter:
    """Write samples into a shard set with train/valid/test splits.

    ``write(sample)`` routes a sample by a hash of its ``__key__`` (see `split_for_key`) unless
    ``split=`` names one. Samples are dicts of numpy arrays (numeric/bool), bool/int/float, str and
    JSON-compatible dicts/lists; the schema is inferred from the samples (dimensions that vary
    become ``null``) or declared with ``schema=``: ``{field: {"kind": "npy", "dtype": "float32",
    "shape": [None, 3], "unit": ..., "description": ..., "optional": False}}``; an entry with only
    unit/description/optional annotates an inferred field.

    The set is only visible when `close()` (or leaving the ``with`` block) succeeds. An existing
    set is never replaced unless ``overwrite=True``.

    Numeric fields get statistics per split (``field_stats``: finite, non-finite, zero and masked
    element counts, mean/std/min/max). An element is masked when its field has a mask: declared
    with ``masks={"spectrum": ("spectrum_mask", "bad")}`` (meanings: "bad" = True marks a bad
    element, "good" = True marks a good one, "weight" = an inverse variance, <= 0 is bad), or by
    the naming rule: a bool field ``<name>_mask`` beside ``<name>`` marks bad elements of it.
    ``close()`` refuses (`DegenerateDataError`, nothing published) when a float field comes out
    all zeros, all masked, constant or mostly non-finite (rules: `foundation.data.summary`),
    naming the source files given to ``write(..., source=)`` and the family's ``hints`` of the
    likely cause; ``allow_degenerate=True`` writes it anyway and records it in the provenance.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split_fractions: Mapping[str, float] | None = None,
        *,
        samples_per_shard: int = 1000,
        family: str | None = None,
        schema: Mapping[str, Any] | None = None,
        stats: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        files: Mapping[str, str | os.PathLike] | Iterable[str | os.PathLike] | None = None,
        provenance: Mapping[str, Any] | None = None,
        seed: int | None = None,
        split_salt: str = "",
        overwrite: bool = False,
        field_stats: bool = True,
        masks: Mapping[str, tuple[str, str]] | None = None,
        hints: Mapping[str, str] | None = None,
        allow_degenerate: bool = False,
    ):
        if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise DataError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
        self.out_dir = Path(out_dir)
        self.fractions = check_split_fractions(
            split_fractions if split_fractions is not None else DEFAULT_SPLIT_FRACTIONS
        )
        self.samples_per_shard = samples_per_shard
        self.family = family
        self.stats: dict[str, Any] = dict(stats or {})
        """Family statistics recorded in the manifest; may be updated until close()."""
        self.extra: dict[str, Any] = dict(extra or {})
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.seed = seed
        self.split_salt = split_salt
        self.overwrite = overwrite
        self.field_stats = field_stats
        self.allow_degenerate = allow_degenerate
        self.hints: dict[str, str] = dict(hints or {})
        """Per field: the likely cause of a degenerate result, as the family knows it."""
        self._masks = _check_masks(masks or {})
        self._mask_used: dict[str, tuple[str, str]] = {}
        self._by_source: dict[str, dict[str | None, RunningStats]] = {}
        self._files: dict[str, tuple[Path, str | None]] = {}
        if files is not None:
            items = files.items() if isinstance(files, Mapping) else ((Path(p).name, p) for p in files)
            for name, path in items:
                self.add_file(path, name=name)
        self._declared: dict[str, FieldSpec] = {}
        self._annotations: dict[str, dict[str, Any]] = {}
        for name, spec in (schema or {}).items():
            check_field_name(name)
            if isinstance(spec, FieldSpec):
                self._declared[name] = spec
            elif isinstance(spec, Mapping) and "kind" in spec:
                self._declared[name] = FieldSpec.from_dict(spec, f"schema.{name}")
            elif isinstance(spec, Mapping) and set(spec) <= set(_ANNOTATIONS):
                self._annotations[name] = dict(spec)
            else:
                raise DataError(
                    f"schema.{name}: give a full field description (with 'kind') or only "
                    f"{', '.join(_ANNOTATIONS)}; got {spec!r}"
                )
        self._schema: dict[str, FieldSpec] = dict(self._declared)
        self._frozen_fields: set[str] | None = None
        self._existing: Manifest | None = None
        self._token = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._splits: dict[str, _SplitState] = {}
        self._closed = False
        self._seen_manifest: tuple[int, int, int] | None = None
        self._created_dir = False
        self._remote = None
        if is_url(out_dir):  # a local staging folder, each finished shard uploaded (foundation.data.upload)
            from foundation.data.upload import RemoteOutput

            self._remote = RemoteOutput(str(out_dir), overwrite=overwrite, targets=self._target_splits())
            self.out_dir = self._remote.staging
        self._folder_lock = FolderLock(self.out_dir, command_line()).acquire()
        self._release_lock = weakref.finalize(self, self._folder_lock.release)
        try:
            self._remove_dead_temporaries()
            self._check_target()
        except BaseException:
            self._release_lock()
            if self._remote is not None:
                self._remote.abort()
            raise

    # ------------------------------------------------------------------ public

    def add_file(
        self, path: str | os.PathLike, name: str | None = None, description: str | None = None
    ) -> str:
        """Copy a file (e.g. a tokenizer) into the set on close; recorded with its sha256."""
        path = Path(path)
        name = name or path.name
        if not path.is_file():
            raise DataError(f"extra file {str(path)!r} does not exist")
        if "/" in name or name in (".", "..", MANIFEST_NAME) or name.endswith(".tar"):
            raise DataError(f"extra file name {name!r} must be a plain name, not a shard or the manifest")
        self._files[name] = (path, description)
        return name

    def write(
        self,
        sample: Mapping[str, Any],
        split: str | None = None,
        source: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    ) -> str:
        """Add one sample; returns the split it went to. `source` is the file it came from, or a
        {field: file} mapping, named if a field comes out degenerate."""
        if self._closed:
            raise DataError("this writer is closed")
        if not isinstance(sample, Mapping):
            raise DataError(f"a sample must be a dict, got {type(sample).__name__}")
        key = check_key(sample.get("__key__"))
        split = self._split_of(key, split)
        fields = [name for name in sample if name != "__key__"]
        self._check_fields(key, fields)
        members = []
        values = {}
        for name in sorted(fields):
            value = sample[name]
            spec = self._schema.get(name)
            if name in self._declared:
                value = check_value_against(self._declared[name], value, name, key)
            else:
                new_spec, value = prepare_value(name, value, key)
                spec = new_spec if spec is None else merge_spec(spec, new_spec, name, key)
                self._schema[name] = spec
            spec = self._schema[name]
            if spec.kind == "scalar" and spec.dtype == "float64":
                value = float(value)
            members.append((f"{key}.{name}.{spec.ext}", codec.encode(spec, value)))
            values[name] = value
        state = self._split_state(split)
        if state.current is None:
            state.current = _ShardFile(self.out_dir, shard_name(split, len(state.done)), self._token)
        state.current.add(key, members)
        state.pending_hashes.append(
            int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        )
        if len(state.pending_hashes) >= 65536:
            state.key_hashes.append(np.array(state.pending_hashes, dtype=np.uint64))
            state.pending_hashes = []
        if self.field_stats:
            self._observe(state, key, values, source)
        if state.current.samples >= self.samples_per_shard:
            self._finish_shard(state)
        return split

    def _finish_shard(self, state: _SplitState) -> None:
        info = state.current.finish()
        if self._remote is not None:
            self._remote.stage(info, state.current.tmp)
        state.done.append((info, state.current.tmp))
        state.current = None

    @property
    def counts(self) -> dict[str, int]:
        """Samples written so far per split."""
        return {name: state.samples for name, state in self._splits.items()}

    def close(self) -> Manifest:
        """Finish the shards, move them into place and write the manifest (last)."""
        if self._closed:
            raise DataError("this writer is already closed")
        self._closed = True
        try:
            for state in self._splits.values():
                if state.current is not None:
                    self._finish_shard(state)
                self._check_duplicate_keys(state)
            self._check_degenerate()
            self._recheck_target()
            manifest = self._publish()
        except BaseException:
            self._cleanup()
            raise
        finally:
            self._release_lock()
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; the directory keeps its previous content."""
        self._closed = True
        try:
            self._cleanup()
        finally:
            self._release_lock()

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ internals

    def _split_of(self, key: str, split: str | None) -> str:
        """The split a sample goes to: the one asked for, else its key's hash bucket."""
        if split is None:
            return split_for_key(key, self.fractions, self.split_salt)
        return check_split_name(split)

    def _target_splits(self) -> set[str] | None:
        """Splits this writer replaces; None = the whole set."""
        return None

    def _check_target(self) -> None:
        manifest_path = self.out_dir / MANIFEST_NAME
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise DataError(f"{str(self.out_dir)!r} exists and is not a directory")
        existing = None
        if manifest_path.exists():
            existing = Manifest.load(self.out_dir)
        targets = self._target_splits()
        shards = (
            [p.name for p in sorted(self.out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))]
            if self.out_dir.exists()
            else []
        )
        check_replaceable(str(self.out_dir), existing, targets, shards, self.overwrite, "directory")
        if existing is not None and targets is not None:
            self._adopt_existing(existing)
        self._existing = existing
        self._seen_manifest = self._manifest_identity()
        self._created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _manifest_identity(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the manifest: publishing replaces the file, so this changes."""
        try:
            st = os.stat(self.out_dir / MANIFEST_NAME)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _recheck_target(self) -> None:
        """Under the publish step: still our folder, and nobody published there meanwhile."""
        if not self._folder_lock.still_held():
            raise LockedError(
                f"{str(self.out_dir)!r}: another process took over this writer's lock (it looked stale); "
                "nothing was written, so that the two do not replace each other — run again once it is done"
            )
        if self._manifest_identity() != self._seen_manifest:
            raise DataError(
                f"{str(self.out_dir)!r}: another process published a shard set there while this one was "
                "writing; nothing was written — run again (with --overwrite to replace it)"
            )

    def _remove_dead_temporaries(self) -> None:
        """Remove hidden temporaries of writers that died (killed, crashed): this writer holds the
        folder's lock, every writer holds it while writing, so no live writer owns one."""
        if not self.out_dir.is_dir():
            return
        count = size = 0
        for path in self.out_dir.iterdir():
            if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    size += path.stat().st_size
                    path.unlink()
                    count += 1
        if count:
            log.warning(
                "%s: removed %d temporary file(s) (%.1f MB) left by an interrupted write",
                self.out_dir,
                count,
                size / 1e6,
            )

    def _adopt_existing(self, existing: Manifest) -> None:
        """Adding a split to an existing set: same family, same fields, compatible specs."""
        if self.family is not None and existing.family not in (None, self.family):
            raise DataError(
                f"{self.out_dir} holds shards of family {existing.family!r}, not {self.family!r}; "
                "use another directory"
            )
        self.family = self.family or existing.family
        others = {n: s for n, s in existing.schema.items()}
        for name, spec in others.items():
            if name in self._declared:
                mine = self._declared[name]
                if (mine.kind, mine.dtype) != (spec.kind, spec.dtype):
                    raise DataError(
                        f"schema.{name}: declared {mine.kind}/{mine.dtype} but the existing shard set "
                        f"stores {spec.kind}/{spec.dtype}"
                    )
            else:
                self._schema[name] = spec
        self._frozen_fields = set(others) | set(self._declared)

    def _check_fields(self, key: str, fields: list[str]) -> None:
        for name in fields:
            if name.startswith("__"):
                raise DataError(f"sample {key!r}: reserved field name {name!r} (only __key__ is allowed)")
            check_field_name(name)
        if self._frozen_fields is None:
            self._frozen_fields = set(fields) | set(self._declared) | set(self._annotations)
        present = set(fields)
        unknown = present - self._frozen_fields
        if unknown:
            raise DataError(
                f"sample {key!r} has field(s) {sorted(unknown)} that earlier samples (or the existing shard "
                f"set) do not have ({sorted(self._frozen_fields)}); declare optional fields with "
                "schema={name: {'optional': True, ...}}"
            )
        missing = [name for name in self._frozen_fields - present if not self._is_optional(name)]
        if missing:
            raise DataError(
                f"sample {key!r} lacks field(s) {sorted(missing)} that earlier samples have; declare them "
                "optional with schema={name: {'optional': True}} if samples may omit them"
            )

    def _is_optional(self, name: str) -> bool:
        spec = self._schema.get(name)
        return bool((spec and spec.optional) or self._annotations.get(name, {}).get("optional"))

    def _split_state(self, split: str) -> _SplitState:
        state = self._splits.get(split)
        if state is None:
            targets = self._target_splits()
            if targets is not None and split not in targets:
                raise DataError(f"this writer writes split(s) {sorted(targets)}, not {split!r}")
            state = self._splits[split] = _SplitState(split)
        return state

    def _final_schema(self) -> dict[str, FieldSpec]:
        schema = {}
        for name in sorted(self._schema):
            spec = self._schema[name]
            notes = {k: v for k, v in self._annotations.get(name, {}).items() if v is not None}
            if notes:
                spec = replace(spec, **notes)
            schema[name] = spec
        unseen = sorted(set(self._annotations) - set(schema))
        if unseen:
            log.warning("schema annotations for field(s) %s that no sample had; ignored", unseen)
        return schema

    def _check_duplicate_keys(self, state: _SplitState) -> None:
        hashes = state.key_hashes + [np.array(state.pending_hashes, dtype=np.uint64)]
        all_hashes = np.sort(np.concatenate(hashes))
        dup = all_hashes[1:][all_hashes[1:] == all_hashes[:-1]]
        if len(dup):
            raise DataError(
                f"split {state.name!r}: {len(dup)} sample key(s) were written more than once (in different "
                "shards); keys must be unique within a shard set — nothing was written"
            )

    def _observe(self, state: _SplitState, key: str, values: Mapping[str, Any], source: Any) -> None:
        """Add one sample's numeric fields to its split's statistics and to its source's."""
        for name, value in values.items():
            if not wants_stats(self._schema[name]):
                continue
            observed = RunningStats.of(value, self._mask(name, key, value, values))
            state.stats.setdefault(name, RunningStats()).merge(observed)
            origin = _source_of(source, name)
            per_source = self._by_source.setdefault(name, {})
            if origin not in per_source and len(per_source) >= _MAX_SOURCES:
                origin = _OTHER_SOURCES
            per_source.setdefault(origin, RunningStats()).merge(observed)

    def _mask(self, name: str, key: str, value: Any, values: Mapping[str, Any]) -> np.ndarray | None:
        """The masked elements of field `name` in this sample, from its declared or named mask."""
        rule = self._masks.get(name)
        if rule is None:
            companion = f"{name}_mask"
            if companion not in values or np.asarray(values[companion]).dtype != bool:
                return None
            rule = (companion, "bad")
        companion, meaning = rule
        if companion not in values:
            return None
        mask = mask_of(values[companion], meaning)
        try:
            mask = np.broadcast_to(mask, np.shape(value))
        except ValueError:
            raise DataError(
                f"sample {key!r}: mask field {companion!r} has shape {mask.shape}, which does not fit "
                f"field {name!r} of shape {np.shape(value)}; a mask must have its field's shape"
            ) from None
        self._mask_used[name] = rule
        return mask

    def _stats_entry(self, name: str, stats: RunningStats) -> dict[str, Any]:
        entry = stats.to_dict()
        if name in self._mask_used:
            companion, meaning = self._mask_used[name]
            entry["mask"] = f"{companion} ({_MEANING_TEXT[meaning]})"
        return entry

    def _check_degenerate(self) -> None:
        """Refuse a field that came out all zeros / all masked / constant / mostly NaN (all splits
        this writer wrote, together), naming its sources and the likely cause."""
        if not self.field_stats:
            return
        merged: dict[str, RunningStats] = {}
        for state in self._splits.values():
            for name, stats in state.stats.items():
                merged.setdefault(name, RunningStats()).merge(stats)
        problems = []
        found = {}
        for name in sorted(merged):
            reason = degenerate_reason(self._stats_entry(name, merged[name]), self._schema[name])
            if reason is None:
                continue
            kind, description = reason
            found[name] = description
            cause = self.hints.get(name) or default_cause(kind)
            problems.append(
                f"field {name!r} {description} (source: {self._blame(name, kind)}; likely cause: {cause})"
            )
        if not problems:
            return
        if self.allow_degenerate:
            log.warning("writing degenerate data as allowed: %s", "; ".join(problems))
            self.provenance["degenerate_fields"] = found
            return
        raise DegenerateDataError(
            f"{self.out_dir}: the prepared data are degenerate, so nothing was written: "
            + "; ".join(problems)
            + ". Fix the input or its options, or pass --allow-degenerate (allow_degenerate=True) "
            "to write it anyway"
        )

    def _blame(self, name: str, kind: str) -> str:
        """The sources whose own values of `name` are degenerate the same way (else all of them)."""
        per_source = self._by_source.get(name, {})
        spec = self._schema[name]
        known = [src for src in per_source if src is not None]
        same_way = []
        for src in known:
            reason = degenerate_reason(self._stats_entry(name, per_source[src]), spec)
            if reason is not None and reason[0] == kind:
                same_way.append(src)
        named = same_way or known
        if not named:
            return "not recorded"
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        return ", ".join(named[:3]) + more

    def _provenance(self) -> dict[str, Any]:
        from foundation import __version__

        out: dict[str, Any] = {
            "sources": [],
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
            "package_version": __version__,
            "seed": self.seed,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "numpy": np.__version__,
        }
        out.update(self.provenance)
        out["sources"] = [str(s) for s in out.get("sources") or []]
        return out

    def _publish(self) -> Manifest:
        existing = Manifest.load(self.out_dir) if (self.out_dir / MANIFEST_NAME).exists() else None
        targets = self._target_splits()
        if targets is None:
            for split in self.fractions:
                self._split_state(split)
        new_splits = {
            name: SplitInfo(
                name,
                [info for info, _ in state.done],
                {f: self._stats_entry(f, s) for f, s in sorted(state.stats.items())},
            )
            for name, state in self._splits.items()
        }
        schema = self._final_schema()
        if not schema:
            raise DataError(f"no samples were written to {self.out_dir}; nothing to publish")
        files, file_moves = self._stage_files()
        if targets is None or existing is None:
            manifest = Manifest(
                schema=schema,
                splits=new_splits,
                family=self.family,
                stats=self.stats,
                extra=self.extra,
                files=files,
                provenance=self._provenance(),
                split_rule=self._split_rule(),
            )
            old_shards = {
                s.name for split in (existing.splits.values() if existing else []) for s in split.shards
            }
            old_files = set(existing.files) if existing else set()
        else:
            for name, spec in schema.items():
                if name in existing.schema:
                    schema[name] = merge_spec(existing.schema[name], spec, name, "(schema merge)")
            splits = dict(existing.splits)
            old_shards = {s.name for split in targets if split in splits for s in splits[split].shards}
            splits.update(new_splits)
            provenance = dict(existing.provenance)
            provenance.setdefault("splits", {})
            provenance["splits"] = {**provenance["splits"], **{s: self._provenance() for s in new_splits}}
            manifest = Manifest(
                schema=schema,
                splits=splits,
                family=self.family,
                stats={**existing.stats, **self.stats},
                extra={**existing.extra, **self.extra},
                files={**existing.files, **files},
                provenance=provenance,
                split_rule=existing.split_rule,
                member_crc32=existing.member_crc32,  # older shards may lack member CRCs
            )
            old_files = set()
        manifest.to_json()  # fail on unserialisable stats/extra before anything is moved into place
        if self._remote is not None:
            gone = (old_shards - {s.name for split in manifest.splits.values() for s in split.shards}) | (
                old_files - set(manifest.files)
            )
            strays = targets if (targets is None or self.overwrite) else False
            self._remote.publish(manifest, [(tmp, final.name) for tmp, final in file_moves], gone, strays)
            return manifest
        # Shards and files are flushed already; their new names reach the disk with the manifest's
        # (the folder is flushed after it is renamed into place).
        for state in self._splits.values():
            for info, tmp in state.done:
                os.replace(tmp, self.out_dir / info.name)
        for tmp, final in file_moves:
            os.replace(tmp, final)
        new_shards = {s.name for split in manifest.splits.values() for s in split.shards}
        manifest.save(self.out_dir)
        for name in sorted((old_shards - new_shards) | (old_files - set(manifest.files))):
            with contextlib.suppress(FileNotFoundError):
                (self.out_dir / name).unlink()
        if targets is None or self.overwrite:
            for stray in self.out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
                split = stray.name.rsplit("-", 1)[0]
                if stray.name not in new_shards and (targets is None or split in targets):
                    stray.unlink()
        return manifest

    def _split_rule(self) -> dict[str, Any] | None:
        if self._target_splits() is not None:
            return None  # one explicitly named split, no hash routing
        return {
            "method": "sha256(salt + key), first 8 bytes big-endian / 2**64, cut at cumulative fractions",
            "salt": self.split_salt,
            "fractions": [[name, fraction] for name, fraction in self.fractions.items()],
        }

    def _stage_files(self) -> tuple[dict[str, FileInfo], list[tuple[Path, Path]]]:
        """Copy extra files under temporary names: ({name: info}, [(temporary, final)])."""
        out = {}
        moves = []
        for name, (source, description) in sorted(self._files.items()):
            tmp = self.out_dir / f".{name}.tmp-{self._token}"
            sha = hashlib.sha256()
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    sha.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())  # on disk before it is renamed into place, as the shards are
            out[name] = FileInfo(name, tmp.stat().st_size, sha.hexdigest(), description)
            moves.append((tmp, self.out_dir / name))
        return out, moves

    def _cleanup(self) -> None:
        for state in self._splits.values():
            if state.current is not None:
                state.current.abort()
                state.current = None
            for _, tmp in state.done:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            state.done = []
        for leftover in self.out_dir.glob(f".*.tmp-{self._token}"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if self._created_dir:  # leave no empty folder behind a failed first write
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()
        if self._remote is not None:
            self._remote.abort()


_TEMPORARY = re.compile(r"^\..+\.tmp-[0-9]+(-[0-9a-f]{8})?$")
"""Hidden temporaries of this writer (`.<name>.tmp-<pid>-<hex>`) and of `Manifest.save`."""
_MAX_SOURCES = 10_000
"""Sources tracked one by one per field (for naming them in errors); the rest are pooled."""
_OTHER_SOURCES = "(other sources)"
_MEANING_TEXT = {"bad": "True = bad", "good": "True = good", "weight": "<= 0 = bad"}


def _check_masks(masks: Mapping[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    out = {}
    for name, rule in masks.items():
        check_field_name(name)
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and rule[1] in MASK_MEANINGS):
            raise DataError(
                f"masks[{name!r}] must be (mask field, meaning) with meaning one of "
                f"{', '.join(MASK_MEANINGS)}; got {rule!r}"
            )
        companion = check_field_name(rule[0])
        if companion == name:
            raise DataError(f"masks[{name!r}]: a field cannot be its own mask")
        out[name] = (companion, rule[1])
    return out


def _source_of(source: Any, name: str) -> str | None:
    if isinstance(source, Mapping):
        source = source.get(name)
    return None if source is None else os.fspath(source) if isinstance(source, os.PathLike) else str(source)


class ShardWriter(ShardSetWriter):
    """Write one split, into a new shard set or next to the other splits of an existing one.

    ``ShardWriter(out_dir, split="train", samples_per_shard=1000)``: every sample goes to `split`.
    An existing split of that name is only replaced with ``overwrite=True``; other splits, the
    family statistics and files of an existing set are kept (``stats``/``extra`` are merged in).
    """

    def __init__(self, out_dir: str | os.PathLike, split: str = "train", **kwargs: Any):
        if "split_fractions" in kwargs:
            raise DataError("ShardWriter writes one split; use ShardSetWriter for split_fractions")
        self.split = check_split_name(split)
        super().__init__(out_dir, {split: 1.0}, **kwargs)

    def _target_splits(self) -> set[str] | None:
        return {self.split}

    def _split_of(self, key: str, split: str | None) -> str:
        if split is not None and split != self.split:
            raise DataError(f"this ShardWriter writes split {self.split!r}, not {split!r}")
        return self.split
