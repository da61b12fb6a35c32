"""The embeddings file: one HDF5 file of per-object vectors, the seam between export and search/eval.

Layout (docs/embeddings.md, format `foundation-embeddings` version 1):

    /object_id           (N,)   utf-8 strings, unique
    /<modality>          (N, D) float32, one dataset per modality (e.g. /image, /spectrum)
    /targets/<name>      (N,)   float64 regression targets where known (NaN where unknown)
    /split               (N,)   utf-8 strings, optional: the shard split each row came from
    root attributes      format, format_version, complete, rows, normalized, modalities,
                         checkpoint, config (JSON), config_hash, family, data, ...

Why it is written the way it is:
- Rows are appended in chunks to a `<name>.partial` file; `rows` (the committed row count) is
  updated only after every dataset of a chunk is written and flushed, so a crash mid-chunk is
  undone on resume by truncating to `rows`. The finished file is renamed into place, so a file
  under its final name is always complete and readers never see a half-written one.
- Resume is verified by object ids: `EmbeddingsWriter.done_ids` lists what is already in the file
  and the provenance attributes (checkpoint, config hash, modalities, dims) must match.
- Readers open files read-only; a file held open for writing by another process is reported as
  such instead of as an obscure HDF5 locking error.
Files written by other tools with the same layout but without the `format` attributes are read
too (every 2-D float dataset at the root is taken as a modality).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from foundation import atomic
from foundation.errors import DataError
from foundation.hdf5 import MappedRows, missing_storage, open_hdf5

FORMAT = "foundation-embeddings"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
RESERVED = ("object_id", "targets", "split")
_NORM_TOLERANCE = 1e-3
#: Sane bounds on what a file may declare, checked before anything is allocated or read.
MAX_ROWS = 1 << 34
MAX_DIM = 1 << 20
#: A filtered (compressed) dataset may not declare more than this many bytes per stored byte:
#: floats and ids compress a few-fold, a dataset of zeros declaring gigabytes is a bomb.
MAX_COMPRESSION_RATIO = 256
#: Free space kept in hand beyond a chunk's estimated size: HDF5 allocates whole chunks and
#: metadata, and a write that fails for want of space leaves HDF5's cache unusable (h5py then
#: crashes the process on the next flush), so a chunk is only written when it surely fits.
_SPACE_MARGIN_BYTES = 4 << 20
#: What h5py raises when HDF5 cannot make sense of a damaged file: OSError for data, RuntimeError
#: and KeyError for headers, heaps and links, ValueError/TypeError for garbled datatypes and
#: UnicodeDecodeError for garbled text. Caught only around reads of the file.
_DAMAGED_FILE_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, UnicodeDecodeError)


def _h5py():
    import h5py

    return h5py


def partial_path(path: str | Path) -> Path:
    """Where the in-progress file for `path` lives."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def is_unit_norm(vectors: np.ndarray, tolerance: float = _NORM_TOLERANCE) -> bool:
    """True when every row has L2 norm 1 (within `tolerance`); True for an empty array."""
    if len(vectors) == 0:
        return True
    norms = np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=1)
    return bool(np.all(np.abs(norms - 1.0) <= tolerance))


def _jsonable(value: Any) -> Any:
    """HDF5 attributes hold scalars and strings; anything nested is stored as JSON text."""
    if isinstance(value, str):
        return str(value)  # numpy str_ has no HDF5 conversion; a plain str does
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, int | float | bool):
        return value
    return json.dumps(value, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- writing


class EmbeddingsWriter:
    """Append rows to an embeddings file; resumable; renamed into place by `finish()`.

    `attrs` are provenance attributes (checkpoint, config, family, data, ...). When a `.partial`
    file from an interrupted run exists it is continued, provided its `attrs` agree on the keys in
    `resume_keys`; rows already present are listed by `done_ids` and must not be appended again.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        attrs: Mapping[str, Any] | None = None,
        chunk_rows: int = 1024,
        overwrite: bool = False,
        resume_keys: Sequence[str] = ("checkpoint", "config_hash", "family", "data"),
    ) -> None:
        h5py = _h5py()
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.chunk_rows = int(chunk_rows)
        if self.chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        self._attrs = {k: _jsonable(v) for k, v in (attrs or {}).items() if v is not None}
        for candidate in (self.path, self.partial):
            if candidate.is_dir():
                raise DataError(f"{candidate} is a directory; give the path of an embeddings file to write")
        if self.path.exists() and not overwrite:
            raise DataError(
                f"{self.path} already exists; pass --overwrite to replace it, or choose another --out"
            )
        if overwrite and self.partial.exists():
            self.partial.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.resumed_rows = 0
        if self.partial.exists():
            try:
                self._file = h5py.File(self.partial, "a")
            except OSError as exc:
                raise DataError(
                    f"cannot reopen the interrupted export {self.partial} ({exc}); if no other process "
                    "is writing it, delete it (or pass --overwrite) to start again"
                ) from None
            self._check_resumable(resume_keys)
            self._truncate_to_committed()
            self.resumed_rows = int(self._file.attrs["rows"])
        else:
            self._file = h5py.File(self.partial, "w")
            self._file.attrs["format"] = FORMAT
            self._file.attrs["format_version"] = FORMAT_VERSION
            self._file.attrs["complete"] = False
            self._file.attrs["rows"] = 0
            for key, value in self._attrs.items():
                self._file.attrs[key] = value
            self._file.create_dataset(
                "object_id",
                shape=(0,),
                maxshape=(None,),
                dtype=h5py.string_dtype("utf-8"),
                chunks=(self.chunk_rows,),
            )
            self._file.flush()
        ids = self._file["object_id"].asstr()[: self.resumed_rows]
        self._done: set[str] = set(ids.tolist())

    # -- resume

    def _check_resumable(self, keys: Sequence[str]) -> None:
        f = self._file
        if f.attrs.get("format") != FORMAT or "object_id" not in f:
            raise DataError(
                f"{self.partial} is not an interrupted embeddings export; delete it or pass --overwrite"
            )
        for key in keys:
            old, new = f.attrs.get(key), self._attrs.get(key)
            if isinstance(old, bytes):
                old = old.decode()
            if old is not None and new is not None and str(old) != str(new):
                raise DataError(
                    f"cannot resume {self.partial}: it was written with {key}={old!r}, this run has "
                    f"{key}={new!r}; delete it or pass --overwrite to start again"
                )

    def _truncate_to_committed(self) -> None:
        """Drop rows of a chunk that was being written when the process died."""
        rows = int(self._file.attrs.get("rows", 0))
        for name, ds in self._datasets():
            if ds.shape[0] > rows:
                ds.resize(rows, axis=0)
            elif ds.shape[0] < rows:
                raise DataError(f"{self.partial}: dataset {name!r} is shorter than the committed row count")

    def _datasets(self) -> Iterable[tuple[str, Any]]:
        h5py = _h5py()
        out = []
        self._file.visititems(
            lambda name, obj: out.append((name, obj)) if isinstance(obj, h5py.Dataset) else None
        )
        return out

    # -- appending

    @property
    def done_ids(self) -> set[str]:
        """Object ids already in the file (from this run or the interrupted one it continues)."""
        return self._done

    @property
    def rows(self) -> int:
        return int(self._file.attrs["rows"])

    def _ensure_dataset(self, name: str, shape_tail: tuple[int, ...], dtype: Any, fill: Any = None) -> Any:
        f = self._file
        if name in f:
            ds = f[name]
            if ds.shape[1:] != shape_tail:
                raise DataError(
                    f"{self.partial}: {name!r} has rows of shape {ds.shape[1:]}, new rows have {shape_tail}"
                    " (was the model changed between runs? delete the partial file to start again)"
                )
            return ds
        rows = self.rows
        chunks = (
            max(1, min(self.chunk_rows, (1 << 20) // max(1, 4 * int(np.prod(shape_tail))))),
        ) + shape_tail
        ds = f.create_dataset(
            name,
            shape=(rows,) + shape_tail,
            maxshape=(None,) + shape_tail,
            dtype=dtype,
            chunks=chunks,
            fillvalue=fill,
        )
        return ds

    def append(
        self,
        ids: Sequence[str],
        vectors: Mapping[str, np.ndarray],
        targets: Mapping[str, np.ndarray] | None = None,
        split: Sequence[str] | None = None,
    ) -> None:
        """Append one chunk of rows; all arrays have len(ids) rows. Committed atomically."""
        h5py = _h5py()
        n = len(ids)
        if n == 0:
            return
        ids = [str(i) for i in ids]
        if len(set(ids)) != n:
            raise DataError("duplicate object ids inside one chunk: " + ", ".join(sorted(_dupes(ids))[:5]))
        repeated = self._done.intersection(ids)
        if repeated:
            raise DataError(
                f"object ids already in {self.partial}: {', '.join(sorted(repeated)[:5])}"
                " (duplicate keys in the shards, or the same data exported twice)"
            )
        for name in vectors:
            if name in RESERVED or "/" in name or not name:
                raise DataError(f"{name!r} cannot be a modality name (reserved: {', '.join(RESERVED)})")
        existing = [m for m in self.modalities if m not in vectors]
        if existing:
            raise DataError(f"chunk is missing modalities {existing} that earlier rows have")
        new = [m for m in vectors if m not in self.modalities]
        if new and self.rows:
            raise DataError(f"modalities {new} appear after {self.rows} rows were written without them")
        self._ensure_space(ids, vectors, targets, split)
        start = self.rows
        stop = start + n
        arrays = {}
        for name, value in vectors.items():
            value = np.asarray(value, dtype=np.float32)
            if value.ndim != 2 or value.shape[0] != n:
                raise DataError(f"modality {name!r}: expected ({n}, D) vectors, got shape {value.shape}")
            if not np.all(np.isfinite(value)):
                raise DataError(f"modality {name!r}: non-finite embeddings for ids {ids[:3]}...")
            arrays[name] = value
        for name, value in arrays.items():
            ds = self._ensure_dataset(name, value.shape[1:], np.float32)
            ds.resize(stop, axis=0)
            ds[start:stop] = value
            ds.attrs["normalized"] = bool(ds.attrs.get("normalized", True)) and is_unit_norm(value)
        for name, value in (targets or {}).items():
            value = np.asarray(value, dtype=np.float64).reshape(-1)
            if value.shape[0] != n:
                raise DataError(f"target {name!r}: expected {n} values, got {value.shape[0]}")
            ds = self._ensure_dataset(f"targets/{name}", (), np.float64, fill=np.nan)
            ds.resize(stop, axis=0)
            ds[start:stop] = value
        if "targets" in self._file:
            for ds in self._file["targets"].values():
                if ds.shape[0] < stop:  # this chunk has no value for an older target: NaN
                    ds.resize(stop, axis=0)
                    ds[start:stop] = np.nan
        if split is not None or "split" in self._file:
            values = [str(s) for s in split] if split is not None else [""] * n
            if len(values) != n:
                raise DataError(f"split: expected {n} values, got {len(values)}")
            ds = self._ensure_dataset("split", (), h5py.string_dtype("utf-8"))
            ds.resize(stop, axis=0)
            ds[start:stop] = values
        ids_ds = self._file["object_id"]
        ids_ds.resize(stop, axis=0)
        ids_ds[start:stop] = ids
        self._file.flush()
        # Commit: only now do the new rows count.
        self._file.attrs["rows"] = stop
        self._file.attrs["modalities"] = json.dumps(sorted(set(self.modalities) | set(arrays)))
        self._file.flush()
        self._done.update(ids)

    def _ensure_space(
        self,
        ids: Sequence[str],
        vectors: Mapping[str, np.ndarray],
        targets: Mapping[str, np.ndarray] | None,
        split: Sequence[str] | None,
    ) -> None:
        """Raise ENOSPC before writing a chunk that may not fit on the disk (see _SPACE_MARGIN_BYTES)."""
        n = len(ids)
        per_row = sum(int(np.prod(np.shape(v)[1:], dtype=np.int64)) * 4 for v in vectors.values())
        per_row += 8 * len(targets or {}) + 32 * (2 if split is not None else 1)
        text = sum(len(i.encode()) for i in ids) + sum(len(str(s).encode()) for s in split or ())
        datasets = len(vectors) + len(targets or {}) + 2
        needed = n * per_row + text + datasets * (1 << 20) + _SPACE_MARGIN_BYTES
        free = free_bytes(self.partial.parent)
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"not enough free space for the next {n} rows of embeddings (about {needed >> 20} MiB "
                f"needed, {free >> 20} MiB free); "
                + (
                    f"{self.rows} rows are kept in the partial file, re-run the export after freeing "
                    "space to resume"
                    if self.rows
                    else "nothing was written"
                ),
                str(self.partial),
            )

    @property
    def modalities(self) -> list[str]:
        raw = self._file.attrs.get("modalities")
        return json.loads(raw) if raw else []

    def targets_without_values(self, block_rows: int = 1 << 20) -> list[str]:
        """Targets that are NaN in every committed row (a name no sample carries), read in blocks."""
        if "targets" not in self._file:
            return []
        empty = []
        for name, ds in self._file["targets"].items():
            blocks = range(0, self.rows, block_rows)
            if not any(np.isfinite(ds[start : min(self.rows, start + block_rows)]).any() for start in blocks):
                empty.append(name)
        return sorted(empty)

    def finish(self) -> Path:
        """Mark complete, close and rename into place (flushed to disk first: the `.partial` file
        is the temporary); returns the final path."""
        f = self._file
        mods = self.modalities
        f.attrs["normalized"] = bool(mods) and all(bool(f[m].attrs.get("normalized", False)) for m in mods)
        f.attrs["complete"] = True
        f.close()
        atomic.publish(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing (the `.partial` file stays, to be resumed)."""
        if self._file.id.valid:
            self._file.close()

    def discard_if_empty(self) -> None:
        """Close, and delete the `.partial` file when it holds no committed row (nothing to resume)."""
        empty = self._file.id.valid and self.rows == 0
        self.close()
        if empty:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddingsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of `folder`."""
    return int(shutil.disk_usage(folder).free)


def _dupes(values: Sequence[str]) -> set[str]:
    seen: set[str] = set()
    return {v for v in values if v in seen or seen.add(v)}


# ----------------------------------------------------------------------------- reading


class Embeddings:
    """A validated, read-only embeddings file. Ids are loaded eagerly, vectors on demand.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | Path, *, allow_partial: bool = False) -> None:
        h5py = _h5py()
        self.path = Path(path)
        if not self.path.exists():
            hint = ""
            if partial_path(self.path).exists():
                hint = (
                    f" (an unfinished export {partial_path(self.path).name} is there: re-run the "
                    "export command to finish it)"
                )
            raise DataError(f"embeddings file {self.path} does not exist{hint}")
        if self.path.is_dir():
            raise DataError(f"{self.path} is a directory, not an embeddings HDF5 file")
        if not h5py.is_hdf5(self.path):
            raise DataError(
                f"{self.path} is not an HDF5 file (expected an embeddings file from `foundation export`)"
            )
        self._file = open_hdf5(self.path)
        try:
            with self._reading("it"):
                self._validate(allow_partial)
        except Exception:
            self._file.close()
            raise

    def _fail(self, what: str) -> None:
        raise DataError(f"malformed embeddings file {self.path}: {what}")

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """HDF5's errors on a damaged file, as one DataError naming the file and what was read."""
        try:
            yield
        except DataError:
            raise
        except _DAMAGED_FILE_ERRORS as exc:
            message = " ".join(str(exc).split())[:300]
            raise DataError(
                f"malformed embeddings file {self.path}: cannot read {what} ({message})"
            ) from None

    def _validate(self, allow_partial: bool) -> None:
        h5py = _h5py()
        f = self._file
        attrs = f.attrs
        fmt = attrs.get("format")
        if fmt is not None and _text(fmt) != FORMAT:
            self._fail(f"format attribute is {_text(fmt)!r}, expected {FORMAT!r}")
        version = self._int_attr("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            self._fail(
                f"format version {version} is newer than this foundation (reads <= {FORMAT_VERSION}); upgrade"
            )
        if fmt is not None and not bool(attrs.get("complete", True)) and not allow_partial:
            self._fail(
                "it is marked incomplete (an export that did not finish); re-run the export to finish it"
            )
        if "object_id" not in f or not isinstance(f["object_id"], h5py.Dataset):
            self._fail("no 'object_id' dataset (every embeddings file lists its object ids)")
        ids_ds = f["object_id"]
        if ids_ds.ndim != 1:
            self._fail(f"'object_id' must be 1-D, it has shape {ids_ds.shape}")
        rows = self._int_attr("rows", ids_ds.shape[0])
        if not 0 <= rows <= MAX_ROWS:
            self._fail(f"it declares {rows} rows (expected 0 to {MAX_ROWS})")
        if ids_ds.shape[0] < rows:
            self._fail(f"'object_id' has {ids_ds.shape[0]} rows, attribute 'rows' says {rows}")
        if rows == 0:
            self._fail("it holds no rows (an export of an empty selection?); export some objects first")
        self._check_stored("object_id", ids_ds, rows)
        if ids_ds.dtype.kind in "SOU":
            ids = ids_ds.asstr()[:rows] if ids_ds.dtype.kind != "U" else ids_ds[:rows]
            ids = np.asarray(ids, dtype=object)
        elif ids_ds.dtype.kind in "iu":
            ids = np.asarray([str(v) for v in ids_ds[:rows]], dtype=object)
        else:
            self._fail(f"'object_id' must hold strings or integers, it holds {ids_ds.dtype}")
        self.rows = rows
        self.ids = ids
        if len(set(ids.tolist())) != rows:
            dup = sorted(_dupes(ids.tolist()))
            self._fail(f"{len(dup)} object ids appear more than once (e.g. {dup[:3]})")
        if "modalities" in attrs:
            mods = self._modalities_attr()
            for m in mods:
                if m not in f:
                    self._fail(f"attribute 'modalities' names {m!r} but there is no such dataset")
        else:
            mods = sorted(
                name
                for name, obj in f.items()
                if isinstance(obj, h5py.Dataset) and name not in RESERVED and obj.ndim == 2
            )
        if not mods:
            self._fail("no embedding datasets (expected one (N, D) float dataset per modality)")
        for m in mods:
            ds = f[m]
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.dtype.kind != "f":
                self._fail(f"modality {m!r} must be a 2-D float dataset, got {getattr(ds, 'shape', ds)}")
            if ds.shape[0] < rows:
                self._fail(f"modality {m!r} has {ds.shape[0]} rows but there are {rows} object ids")
            if not 1 <= ds.shape[1] <= MAX_DIM:
                self._fail(f"modality {m!r} has dimension {ds.shape[1]} (expected 1 to {MAX_DIM})")
            self._check_stored(m, ds, rows)
        self.modalities = list(mods)
        targets = []
        if "targets" in f:
            if not isinstance(f["targets"], h5py.Group):
                self._fail("'targets' must be a group of 1-D datasets")
            for name, ds in f["targets"].items():
                if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "fiu":
                    self._fail(f"target {name!r} must be a 1-D numeric dataset")
                if ds.shape[0] < rows:
                    self._fail(f"target {name!r} has {ds.shape[0]} values but there are {rows} object ids")
                self._check_stored(f"targets/{name}", ds, rows)
                targets.append(name)
        self.target_names = sorted(targets)
        if "split" in f:
            split_ds = f["split"]
            if (
                not isinstance(split_ds, h5py.Dataset)
                or split_ds.ndim != 1
                or split_ds.dtype.kind not in "SOU"
            ):
                self._fail("'split' must be a 1-D dataset of strings")
            if split_ds.shape[0] < rows:
                self._fail(f"'split' has {split_ds.shape[0]} values but there are {rows} object ids")
            self._check_stored("split", split_ds, rows)
        self._row_of: dict[str, int] | None = None
        self._mapped: dict[str, MappedRows | None] = {}

    def _int_attr(self, key: str, default: int) -> int:
        value = self._file.attrs.get(key, default)
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(-1)[0]
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
            self._fail(f"attribute {key!r} must be an integer, it is {value!r:.80}")
        return int(value)

    def _modalities_attr(self) -> list[str]:
        try:
            mods = json.loads(_text(self._file.attrs["modalities"]))
        except (ValueError, RecursionError, UnicodeDecodeError):
            mods = None
        if not isinstance(mods, list) or not all(isinstance(m, str) and m for m in mods):
            self._fail("attribute 'modalities' must be a JSON list of dataset names")
        return mods

    def _check_stored(self, name: str, ds: Any, rows: int) -> None:
        """Refuse a dataset whose first `rows` rows are not really on disk (a sparse file declaring
        billions of rows reads back as fill values: gigabytes from a few kilobytes), before it is read."""
        problem = missing_storage(ds, rows, max_ratio=MAX_COMPRESSION_RATIO) or vlen_lengths_problem(
            ds, self.path
        )
        if problem:
            self._fail(f"dataset {name!r} {problem}; the file is truncated, sparse or not an export")

    # -- access

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (JSON-encoded ones decoded)."""
        out = {}
        with self._reading("its attributes"):
            items = list(self._file.attrs.items())
        for key, value in items:
            value = _text(value) if isinstance(value, bytes | str) else value
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key] = value.item() if isinstance(value, np.generic) else value
        return out

    def recorded(self, key: str) -> str | None:
        """Root attribute `key` as the text it was stored as (None when absent), for comparisons."""
        with self._reading(f"attribute {key!r}"):
            value = self._file.attrs.get(key)
            if value is None:
                return None
            return _text(value.item() if isinstance(value, np.generic) else value)

    def dim(self, modality: str) -> int:
        return int(self._dataset(modality).shape[1])

    def normalized(self, modality: str) -> bool:
        """Whether the file records the vectors of `modality` as L2-normalised."""
        ds = self._dataset(modality)
        with self._reading(f"the attributes of {modality!r}"):
            if "normalized" in ds.attrs:
                return bool(ds.attrs["normalized"])
            return bool(self._file.attrs.get("normalized", False))

    def _dataset(self, modality: str) -> Any:
        if modality not in self.modalities:
            raise DataError(f"{self.path} has no modality {modality!r}; it has: {', '.join(self.modalities)}")
        return self._file[modality]

    def vectors(self, modality: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """(n, D) float32 vectors of `modality` (all rows, a slice, or sorted/unsorted row indices)."""
        with self._reading(f"modality {modality!r}"):
            out = np.asarray(self._read_rows(modality, rows), dtype=np.float32)
        if not np.all(np.isfinite(out)):
            bad = int((~np.isfinite(out).all(axis=1)).sum())
            self._fail(f"modality {modality!r} holds {bad} vectors with NaN or infinite values")
        return out

    def _read_rows(self, modality: str, rows: np.ndarray | slice | None) -> np.ndarray:
        if rows is None:
            return self._dataset(modality)[: self.rows]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.rows)
            return self._dataset(modality)[start:stop:step]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        mapped = self._mapped_rows(modality)
        if mapped is not None:
            return mapped.read(rows)
        ds = self._dataset(modality)
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        got = ds[uniq] if len(uniq) else np.zeros((0, ds.shape[1]), ds.dtype)
        out = np.empty((len(rows), ds.shape[1]), dtype=ds.dtype)
        out[order] = got[inverse]
        return out

    def _mapped_rows(self, modality: str) -> MappedRows | None:
        """The memory-mapped row reader of an uncompressed dataset (random rows at page-cache speed;
        search re-ranking reads hundreds per query), made on first use; None for other layouts.
        Kept by modality, so that a read of mapped rows asks h5py nothing (~0.2 ms a lookup)."""
        if modality not in self._mapped:
            self._mapped[modality] = MappedRows.of(self.path, self._dataset(modality), self.rows)
        return self._mapped[modality]

    def target(self, name: str) -> np.ndarray:
        if name not in self.target_names:
            raise DataError(
                f"{self.path} has no target {name!r}; it has: {', '.join(self.target_names) or 'none'}"
            )
        with self._reading(f"target {name!r}"):
            return np.asarray(self._file["targets"][name][: self.rows], dtype=np.float64)

    @property
    def split(self) -> np.ndarray | None:
        """Per-row split names, or None when the file does not record them."""
        with self._reading("'split'"):
            if "split" not in self._file:
                return None
            return np.asarray(self._file["split"].asstr()[: self.rows], dtype=object)

    def rows_of(self, ids: Iterable[str]) -> np.ndarray:
        """Row index of every id (DataError naming the ids that are not in the file)."""
        if self._row_of is None:
            self._row_of = {oid: i for i, oid in enumerate(self.ids.tolist())}
        ids = [str(i) for i in ids]
        missing = [i for i in ids if i not in self._row_of]
        if missing:
            raise DataError(
                f"object ids not in {self.path}: {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        return np.asarray([self._row_of[i] for i in ids], dtype=np.int64)

    def close(self) -> None:
        for mapped in self._mapped.values():
            if mapped is not None:
                mapped.close()
        self._mapped.clear()
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> Embeddings:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        dims = ", ".join(f"{m}: {self.dim(m)}" for m in self.modalities)
        return f"Embeddings({str(self.path)!r}, rows={self.rows}, {dims}, targets={self.target_names})"


#: A variable-length string as HDF5 stores it in a dataset: its byte length, then the global heap
#: object holding the bytes (heap collection address, object index).
_VLEN_REFERENCE = np.dtype([("length", "<u4"), ("heap", "<u8"), ("index", "<u4")])


def vlen_lengths_problem(ds: Any, path: Path) -> str | None:
    """Why the strings of a variable-length dataset cannot be what its references declare, or None.

    HDF5 allocates the length a reference declares before it finds the heap object to be of
    another size: one damaged length makes it allocate gigabytes. The references of an unfiltered
    chunked dataset are read raw (without following them) and their lengths checked against the
    file's size.
    """
    h5py = _h5py()
    if h5py.check_string_dtype(ds.dtype) is None or ds.chunks is None:
        return None
    if ds.id.get_create_plist().get_nfilters():
        return None  # compressed references: bounded by the compression ratio check instead
    limit = path.stat().st_size
    total = 0
    for i in range(ds.id.get_num_chunks()):
        info = ds.id.get_chunk_info(i)
        raw = ds.id.read_direct_chunk(info.chunk_offset)[1]
        if len(raw) % _VLEN_REFERENCE.itemsize:
            return None  # not the 16-byte reference layout (8-byte heap addresses): not checked
        lengths = np.frombuffer(raw, dtype=_VLEN_REFERENCE)["length"]
        total += int(lengths.sum(dtype=np.int64))
        if total > limit:
            return f"declares strings of {total} bytes in all, more than the file's {limit} bytes"
    return None


def open_embeddings(path: str | Path, *, allow_partial: bool = False) -> Embeddings:
    """Open and validate an embeddings file (DataError with a clear reason when malformed)."""
    return Embeddings(path, allow_partial=allow_partial)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- parts and merging

_PART_RE = re.compile(r"\.part-(\d{5})-of-(\d{5})$")


def part_path(out: str | Path, part: int, parts: int) -> Path:
    """`embeddings.h5` -> `embeddings.part-00003-of-00008.h5` (one output per rank / array task)."""
    out = Path(out)
    suffix = out.suffix or ".h5"
    return out.with_name(f"{out.stem if out.suffix else out.name}.part-{part:05d}-of-{parts:05d}{suffix}")


def find_parts(out: str | Path) -> list[Path]:
    """The part files of `out`, in part order; DataError if some are missing or counts disagree."""
    out = Path(out)
    stem = out.stem if out.suffix else out.name
    suffix = out.suffix or ".h5"
    found: dict[int, Path] = {}
    totals = set()
    for candidate in sorted(out.parent.glob(f"{glob.escape(stem)}.part-*-of-*{suffix}")):
        match = _PART_RE.search(candidate.name[: len(candidate.name) - len(suffix)])
        if match:
            found[int(match.group(1))] = candidate
            totals.add(int(match.group(2)))
    if not found:
        pending = sorted(out.parent.glob(f"{glob.escape(stem)}.part-*{suffix}{PARTIAL_SUFFIX}"))
        hint = f" ({len(pending)} part(s) are still being written or were interrupted)" if pending else ""
        raise DataError(f"no finished part files {stem}.part-NNNNN-of-NNNNN{suffix} in {out.parent}{hint}")
    if len(totals) != 1:
        raise DataError(f"part files of {out} disagree on the number of parts: {sorted(totals)}")
    (total,) = totals
    missing = [i for i in range(total) if i not in found]
    if missing:
        raise DataError(
            f"{len(missing)} of {total} parts of {out} are missing or unfinished (parts {missing[:10]}); "
            "re-run the export for them before merging"
        )
    return [found[i] for i in range(total)]


def merge_embeddings(
    parts: Sequence[str | Path], out: str | Path, *, overwrite: bool = False, chunk_rows: int = 65536
) -> Path:
    """Concatenate finished part files into one embeddings file (atomically; ids must be disjoint)."""
    if not parts:
        raise DataError("nothing to merge: no part files given")
    opened = [open_embeddings(p) for p in parts]
    try:
        first = opened[0]
        provenance = {
            k: v
            for k, v in first._file.attrs.items()
            if k not in ("rows", "complete", "modalities", "part", "parts", "normalized")
        }
        for other in opened[1:]:
            if other.modalities != first.modalities:
                raise DataError(
                    f"{other.path} has modalities {other.modalities}, {first.path} has {first.modalities}"
                )
            for m in first.modalities:
                if other.dim(m) != first.dim(m):
                    raise DataError(
                        f"{other.path}: {m} has dimension {other.dim(m)}, {first.path} has {first.dim(m)}"
                    )
            for key in ("checkpoint", "config_hash", "family"):
                a, b = first._file.attrs.get(key), other._file.attrs.get(key)
                if a is not None and b is not None and _text(a) != _text(b):
                    raise DataError(
                        f"{other.path} was exported with {key}={_text(b)!r}, {first.path} with {_text(a)!r}"
                    )
        seen: set[str] = set()
        for e in opened:
            overlap = seen.intersection(e.ids.tolist())
            if overlap:
                raise DataError(f"{e.path} repeats object ids of an earlier part, e.g. {sorted(overlap)[:3]}")
            seen.update(e.ids.tolist())
        provenance["merged_from"] = json.dumps([Path(p).name for p in parts])
        target_names = sorted(set().union(*(e.target_names for e in opened)))
        with_split = all(e.split is not None for e in opened)
        if Path(out).exists() and not overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
        partial_path(out).unlink(missing_ok=True)  # a merge is cheap: never continue a half merge
        writer = EmbeddingsWriter(
            out, attrs=provenance, overwrite=overwrite, chunk_rows=min(chunk_rows, 4096)
        )
        try:
            for e in opened:
                split = e.split
                for start in range(0, e.rows, chunk_rows):
                    sl = slice(start, min(e.rows, start + chunk_rows))
                    writer.append(
                        e.ids[sl].tolist(),
                        {m: e.vectors(m, sl) for m in e.modalities},
                        {
                            t: (
                                e.target(t)[sl]
                                if t in e.target_names
                                else np.full(sl.stop - sl.start, np.nan)
                            )
                            for t in target_names
                        },
                        split=split[sl].tolist() if with_split else None,
                    )
            return writer.finish()
        finally:
            writer.close()
    finally:
        for e in opened:
            e.close()
