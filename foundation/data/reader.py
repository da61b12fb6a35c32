"""Random access to the samples of one shard: a file descriptor plus an index of member offsets.

Opening a shard checks its size against the manifest (truncation), walks the tar headers
(checksums, structure), and checks every member against the schema's field names and kinds and
the sample count; decoding checks every `.npy` header against the field's dtype and shape.

Reads are `pread`s straight into their destination (for arrays: the batch tensor), not an mmap:
the same speed here, no page-table work per process, and memory use stays at the batches being
built however large the shards are. The walk keeps the first PEEK bytes of every member, so
`.npy` headers and small JSON/text members cost no further read.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from foundation.data import codec, tario
from foundation.data.schema import READ_EXTS, FieldSpec, check_key
from foundation.errors import DataError

PEEK = 256


def file_sha256(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def check_keys(keys: Sequence[str], shard: str) -> None:
    """Keys as the docs promise them (non-empty; no dots, slashes, whitespace): a key with `../`
    or a leading `/` would turn into a path in any tool that unpacks the shard. All keys are
    checked in one scan; the offender is looked for only if there is one."""
    if "" not in keys:
        try:
            check_key("".join(keys) or "-")
            return
        except DataError:
            pass
    for key in keys:
        try:
            check_key(key)
        except DataError as exc:
            raise DataError(f"shard {shard}: {exc}") from None


class ShardReader:
    """One opened shard. `keys[i]` is sample i's key; `decode(i, field)` its value."""

    def __init__(
        self,
        path: str | os.PathLike,
        schema: Mapping[str, FieldSpec],
        *,
        expected_bytes: int | None = None,
        expected_samples: int | None = None,
        expected_sha256: str | None = None,
        keep_members: bool = False,
    ):
        self.path = Path(path)
        self.name = self.path.name
        self.schema = schema
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            raise DataError(
                f"shard {self.name} is listed in the manifest but missing from {self.path.parent}"
            ) from None
        if expected_bytes is not None and size != expected_bytes:
            raise DataError(
                f"shard {self.name}: {size} bytes on disk but the manifest records {expected_bytes}: "
                "the shard is truncated or was replaced; re-create the shard set "
                "(`foundation shards verify DIR` checks every shard)"
            )
        if expected_sha256 is not None:
            digest = file_sha256(self.path)
            if digest != expected_sha256:
                raise DataError(
                    f"shard {self.name}: sha256 {digest[:12]}… does not match the manifest "
                    f"({expected_sha256[:12]}…): the shard is corrupted; re-create it"
                )
        if size == 0:
            raise DataError(f"shard {self.name} is empty (0 bytes)")
        self.fd = os.open(self.path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self.fd)
        columns = tario.scan(self.fd, self.name, with_crc=keep_members, peek=PEEK)
        self.members = columns.members() if keep_members else None
        self._index(columns, expected_samples)

    def _index(self, columns: tario.MemberColumns, expected_samples: int | None) -> None:
        fields = list(self.schema)
        self.fields = fields
        self.column = {name: i for i, name in enumerate(fields)}
        keys: list[str] = []
        # Column-major Python lists: the hot path indexes single ints, which lists do fastest.
        offsets: list[list[int]] = [[] for _ in fields]
        sizes: list[list[int]] = [[] for _ in fields]
        heads: list[list[bytes | None]] = [[] for _ in fields]
        self.exts: list[str | None] = [None] * len(fields)
        suffixes: dict[str, int] = {}  # "<field>.<ext>" -> column, checked once per shard
        seen: set[str] = set()
        current = None
        for name, offset, size, head in zip(
            columns.names, columns.offsets, columns.sizes, columns.heads, strict=True
        ):
            dot = name.find(".", name.rfind("/") + 1)
            key = name if dot < 0 else name[:dot]
            if key != current:
                if key in seen:
                    raise DataError(
                        f"shard {self.name}: sample key {key!r} appears twice (members are not grouped "
                        "by key, or the key is duplicated)"
                    )
                seen.add(key)
                current = key
                keys.append(key)
                for column in offsets:
                    column.append(-1)
                for column in sizes:
                    column.append(-1)
                for column in heads:
                    column.append(None)
            suffix = "" if dot < 0 else name[dot + 1 :]
            col = suffixes.get(suffix)
            if col is None:
                col = suffixes[suffix] = self._check_suffix(name)
            if offsets[col][-1] >= 0:
                raise DataError(
                    f"shard {self.name} member {name!r}: sample {key!r} has field {fields[col]!r} twice"
                )
            offsets[col][-1] = offset
            sizes[col][-1] = size
            heads[col][-1] = head
        check_keys(keys, self.name)
        self.keys = keys
        self.offsets = offsets
        self.sizes = sizes
        self.heads = heads
        for col, name in enumerate(fields):
            if not self.schema[name].optional and -1 in offsets[col]:
                missing = offsets[col].count(-1)
                raise DataError(
                    f"shard {self.name}: sample {keys[offsets[col].index(-1)]!r} has no field {name!r} "
                    f"(required by the schema; {missing} sample(s) lack it)"
                )
        if expected_samples is not None and len(keys) != expected_samples:
            raise DataError(
                f"shard {self.name}: holds {len(keys)} samples but the manifest records {expected_samples}: "
                "the shard was replaced or damaged; re-create the shard set"
            )
        # (column, NpyHeader) pairs already checked against the schema; headers are shared objects
        # (kept alive in the dict so that an id is never reused for another header)
        self._checked: dict[tuple[int, int], codec.NpyHeader] = {}

    def _check_suffix(self, name: str) -> int:
        """Column of a member name's `<field>.<ext>`, after checking it against the schema."""
        _, field, ext = tario.split_name(name)
        where = f"shard {self.name} member {name!r}"
        col = self.column.get(field)
        if col is None:
            raise DataError(
                f"{where}: field {field!r} is not in the manifest schema ({', '.join(self.fields)}); "
                "the shard does not belong to this manifest, or the schema is incomplete"
            )
        kind = self.schema[field].kind
        if ext not in READ_EXTS[kind]:
            raise DataError(
                f"{where}: extension .{ext} cannot hold the schema's {kind} field {field!r} "
                f"(expected .{' or .'.join(READ_EXTS[kind])})"
            )
        known = self.exts[col]
        if known is not None and known != ext:
            raise DataError(f"{where}: field {field!r} is stored as both .{known} and .{ext}")
        self.exts[col] = ext
        return col

    def __len__(self) -> int:
        return len(self.keys)

    def _where(self, i: int, field: str) -> str:
        return f"shard {self.name} sample {self.keys[i]!r} field {field!r}"

    # ------------------------------------------------------------------ decoding

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise DataError(f"shard {self.name}: file ended early (truncated while in use?)")
        return data

    def read_into(self, destination: memoryview, offset: int) -> None:
        """Fill `destination` with the file's bytes at `offset` (one pread, no intermediate copy)."""
        if os.preadv(self.fd, [destination], offset) != len(destination):
            raise DataError(f"shard {self.name}: file ended early (truncated while in use?)")

    def array_header(self, i: int, col: int) -> codec.NpyHeader:
        """Parsed and schema-checked `.npy` header of sample i, column col."""
        size = self.sizes[col][i]
        head = self.heads[col][i]
        if len(head) >= 12 and len(head) < size:
            need = (
                (10 + int.from_bytes(head[8:10], "little"))
                if head[6] == 1
                else (12 + int.from_bytes(head[8:12], "little"))
            )
            if need > len(head):  # an unusually long header: read all of it (if not absurd)
                head = self.read(self.offsets[col][i], min(need, size, codec.MAX_NPY_HEADER + 12))
        try:
            header = codec.npy_header(head, 0, size)
        except ValueError as exc:
            raise DataError(f"{self._where(i, self.fields[col])}: corrupted .npy member: {exc}") from None
        if (col, id(header)) not in self._checked:
            field = self.fields[col]
            problem = self.schema[field].check_array_meta(header.dtype.newbyteorder("="), header.shape)
            if problem:
                raise DataError(f"{self._where(i, field)}: {problem}")
            self._checked[(col, id(header))] = header
        return header

    def decode(self, i: int, field: str, copy: bool = True) -> Any:
        """Value of one field of sample i (None if an optional field is absent). Arrays are
        freshly read, writable and native-endian (`copy` is accepted for compatibility)."""
        col = self.column[field]
        offset = self.offsets[col][i]
        if offset < 0:
            return None
        spec = self.schema[field]
        size = self.sizes[col][i]
        if spec.kind == "npy":
            header = self.array_header(i, col)
            data = bytearray(header.nbytes)
            if header.nbytes:
                self.read_into(memoryview(data), offset + header.data_offset)
            return codec.npy_from_data(data, header)
        head = self.heads[col][i]
        data = head if head is not None and len(head) == size else self.read(offset, size)
        try:
            if spec.kind == "str":
                return codec.decode_text(data)
            if spec.kind == "json":
                return codec.decode_json(data)
            value = codec.decode_scalar(data, self.exts[col] or "json")
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DataError(
                f"{self._where(i, field)}: cannot decode {spec.kind} member ({type(exc).__name__}: "
                f"{str(exc)[:200]})"
            ) from None
        problem = spec.check_scalar(value)
        if problem:
            raise DataError(f"{self._where(i, field)}: {problem}")
        return float(value) if spec.dtype == "float64" else value

    def sample(self, i: int, fields: Sequence[str] | None = None, copy: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"__key__": self.keys[i]}
        for field in fields if fields is not None else self.fields:
            value = self.decode(i, field, copy)
            if value is not None or not self.schema[field].optional:
                out[field] = value
        return out

    def close(self) -> None:
        """Close the file now (otherwise it is closed when the reader is garbage-collected)."""
        self._finalizer()
