"""Opening HDF5 inputs for reading, with errors that name the file and say what to do.

An untrusted file's metadata is read first in a short-lived child (`foundation.isolated`): a
damaged file can make the HDF5 C library loop forever inside an attribute read or allocate
gigabytes for a damaged size, and no Python code can interrupt it.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from foundation.errors import DataError
from foundation.isolated import run_isolated

#: HDF5's own wording when its file lock is held by another process ("unable to lock file, errno = 11").
_LOCKED = re.compile(r"\bunable to lock file\b", re.IGNORECASE)
#: HDF5's wording for a file shorter than its superblock says ("truncated file: eof = ..., stored_eof = ...").
_TRUNCATED = re.compile(r"\btruncated file\b", re.IGNORECASE)
#: What h5py raises when HDF5 cannot make sense of damaged metadata (TypeError: a type h5py cannot
#: map, MemoryError: an allocation past the child's bound).
#: Largest chunk a reader inflates: HDF5 inflates a whole chunk to read any part of it.
MAX_CHUNK_BYTES = 1 << 30
_UNREADABLE = (OSError, RuntimeError, KeyError, ValueError, UnicodeDecodeError, MemoryError)


def open_hdf5(path: str | Path, context: str = "") -> Any:
    """`h5py.File(path, "r")`, or a DataError naming the file (after `context`, e.g. the option it
    came from); a file another process holds open for writing gets HDF5's lock explained, and a
    truncated file is called truncated.

    Before the file is first opened by this process, a bounded child reads every object header and
    attribute and walks every chunk index: a file on which these loop, blow up or crash is refused
    in one line instead.
    """
    where = f"{context}: {path}" if context else str(path)
    identity = _identity(path)
    if identity is None or identity not in _CHECKED:
        run_isolated(lambda: read_all_metadata(path, where), where)
        if identity is not None:
            _CHECKED.add(identity)
    return _open(path, where)


#: Files this process has checked, by identity: readers that reopen a file per batch pay once.
_CHECKED: set[tuple[int, ...]] = set()


def _identity(path: str | Path) -> tuple[int, ...] | None:
    """(device, inode, size, mtime) of `path`: a file rewritten since its check is checked again."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open(path: str | Path, where: str) -> Any:
    import h5py  # lazily: `foundation.embeddings` readers should not pay for it at CLI start-up

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise hdf5_open_error(where, exc) from None


def read_all_metadata(path: str | Path, where: str) -> None:
    """Open `path` and read what any reader may: every object's header and attributes, and the
    chunk index of chunked datasets. A DataError when HDF5 cannot, or a chunk is unsafe to read."""
    with _open(path, where) as f:
        try:
            _read_attributes(f)
            f.visititems(lambda name, obj: _read_object(name, obj, where))
        except _UNREADABLE as exc:
            message = " ".join(str(exc).split())[:300]
            raise DataError(f"{where}: damaged HDF5 metadata ({type(exc).__name__}: {message})") from None


def _read_object(name: str, obj: Any, where: str) -> None:
    import h5py

    _read_attributes(obj)
    if isinstance(obj, h5py.Dataset):
        problem = _storage_problem(obj)
        if problem:
            raise DataError(f"{where}: dataset {name!r} {problem}; the file is damaged")


def _storage_problem(ds: Any) -> str | None:
    """Why the stored bytes of `ds` cannot be read safely, or None. HDF5 reads an unfiltered chunk
    whole into a buffer of the chunk's size, whatever size the chunk index records: a damaged size
    overruns the buffer and corrupts memory (a crash later, or wrong data)."""
    file_size = ds.file.id.get_filesize()
    if ds.chunks is None:
        offset = ds.id.get_offset()
        if offset is not None and offset + ds.id.get_storage_size() > file_size:
            return f"stores {ds.id.get_storage_size()} bytes at offset {offset}, past the file's end"
        return None
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    expected = None if filtered else _chunk_bytes(ds)
    for chunk in _chunks(ds):
        if chunk.byte_offset + chunk.size > file_size:
            return f"has a chunk at offset {chunk.byte_offset} of {chunk.size} bytes, past the file's end"
        if expected is not None and chunk.size != expected:
            return f"has an uncompressed chunk of {chunk.size} bytes where its layout needs {expected}"
    return None


def _chunk_bytes(ds: Any) -> int | None:
    """Bytes of one whole unfiltered chunk on disk, or None for element types not checked here."""
    import h5py

    kind = ds.id.get_type()
    if (
        isinstance(kind, h5py.h5t.TypeStringID)
        and kind.is_variable_str()
        or isinstance(kind, h5py.h5t.TypeVlenID)
    ):
        element = 8 + ds.file.id.get_create_plist().get_sizes()[0]  # length, heap address, index
    elif isinstance(kind, (h5py.h5t.TypeIntegerID, h5py.h5t.TypeFloatID, h5py.h5t.TypeStringID)):
        element = kind.get_size()
    else:
        return None
    return element * math.prod(int(c) for c in ds.chunks)


def _chunks(ds: Any) -> list[Any]:
    """The chunk index of `ds` (offset, size), in one pass where h5py offers it."""
    if hasattr(ds.id, "chunk_iter"):
        found: list[Any] = []
        ds.id.chunk_iter(found.append)
        return found
    return [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]


def _read_attributes(obj: Any) -> None:
    for key in obj.attrs:
        try:
            obj.attrs[key]
        except TypeError:
            pass  # a type h5py has no NumPy equivalent for: no reader can read it either


def missing_storage(ds: Any, rows: int | None = None, *, max_ratio: float | None = None) -> str | None:
    """Why the first `rows` rows of dataset `ds` (all of it by default) are not all stored in its
    file, or None when they are.

    HDF5 returns the fill value for bytes or chunks never written, without reading anything, so a
    file of a few kilobytes can declare billions of rows. Contiguous data must have its bytes
    allocated (compact data lives whole in the object header); chunked data every chunk the rows
    touch; with `max_ratio`, compressed data may not declare more than that many bytes per byte it
    stores (a dataset of zeros declaring gigabytes is a bomb).
    """
    import h5py

    tail = tuple(int(n) for n in ds.shape[1:])
    shape = tuple(int(n) for n in ds.shape) if rows is None else (int(rows), *tail)
    extent = f"shape {shape}" if rows is None else f"{rows} rows"
    declared = math.prod(shape) * int(ds.id.get_type().get_size())
    if declared == 0:
        return None
    stored = int(ds.id.get_storage_size())
    plist = ds.id.get_create_plist()
    if ds.chunks is None:
        if stored >= declared or plist.get_layout() == h5py.h5d.COMPACT:
            return None
        return f"declares {extent} ({declared} bytes) but stores only {stored} bytes"
    needed = math.prod(-(-size // int(chunk)) for size, chunk in zip(shape, ds.chunks, strict=True))
    have = int(ds.id.get_num_chunks())
    if have < needed:
        return (
            f"declares {extent} but stores only {have} of its {needed} chunks (HDF5 reads fill values "
            "where no chunks are stored)"
        )
    if max_ratio is not None and plist.get_nfilters() and declared > max_ratio * max(stored, 1):
        return f"declares {declared} bytes compressed into {stored} (more than {max_ratio}:1)"
    return None


def check_storage(ds: Any, where: str) -> None:
    """Refuse data that is not all in this file: virtual or external storage, chunks too large to
    inflate, or a declared shape whose chunks or bytes are not all stored (`missing_storage`).
    For readers that read whole datasets of an untrusted file (`ds`: an `h5py.Dataset`)."""
    if ds.is_virtual:
        raise DataError(f"{where}: a virtual dataset (its data lives in other files); copy it into the file")
    if ds.external:
        raise DataError(f"{where}: data stored in external raw files; copy it into the HDF5 file")
    if ds.size == 0:
        return
    if ds.chunks is not None:
        chunk_bytes = math.prod(int(c) for c in ds.chunks) * ds.dtype.itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise DataError(
                f"{where}: chunks of {chunk_bytes / 2**20:.0f} MiB exceed the {MAX_CHUNK_BYTES >> 20} MiB "
                "this reader inflates; rechunk the file (e.g. h5repack -l CHUNK=...)"
            )
    problem = missing_storage(ds)
    if problem:
        raise DataError(
            f"{where}: {problem}; the file is sparse or truncated (copy it again from its source)"
        )


def hdf5_open_error(where: str, exc: OSError) -> DataError:
    """The DataError for an `h5py.File` that would not open: locked, truncated, or otherwise bad."""
    message = str(exc)
    if isinstance(exc, BlockingIOError) or _LOCKED.search(message):
        return DataError(
            f"{where} is locked by another process that is writing it; wait for it to finish "
            "(or set HDF5_USE_FILE_LOCKING=FALSE on file systems without locking)"
        )
    if _TRUNCATED.search(message):
        return DataError(
            f"{where} is truncated (shorter than its header says: an interrupted copy or download?); "
            f"copy it again ({message})"
        )
    return DataError(f"{where}: cannot open as HDF5 ({message})")


class MappedRows:
    """Rows of an unfiltered 2-D HDF5 dataset read at random through a memory map of its file.

    h5py reads an arbitrary list of rows as one hyperslab selection per row, about 0.2 ms each:
    re-ranking 640 candidates from an embeddings file cost ~100 ms, twenty times the index search.
    Uncompressed data lies in the file as plain arrays (one contiguous block, or one block per
    chunk of whole rows), so a row is a byte range at a computed offset: read from the page cache
    it costs a copy. `MappedRows.of` builds the offset table once and returns None for a layout it
    cannot map (filters, compact storage, chunks that split rows); every offset and size from the
    file is checked against the file's length first.
    """

    def __init__(self, path: str | Path, ds: Any, block_rows: int, block_offsets: Any) -> None:
        import numpy as np

        self.dtype = ds.dtype
        self.dim = int(ds.shape[1])
        self.row_bytes = self.dim * self.dtype.itemsize
        self.block_rows = block_rows
        self.block_offsets = block_offsets
        self._map = np.memmap(path, mode="r", dtype=np.uint8)
        self._windows = np.lib.stride_tricks.sliding_window_view(self._map.view(np.ndarray), self.row_bytes)

    @classmethod
    def of(cls, path: str | Path, ds: Any, rows: int) -> MappedRows | None:
        """A reader of the first `rows` rows of `ds` (stored in the file at `path`), or None."""
        import h5py
        import numpy as np

        if ds.ndim != 2 or rows == 0 or ds.dtype.kind not in "fiu":
            return None
        plist = ds.id.get_create_plist()
        if plist.get_nfilters() or plist.get_layout() == h5py.h5d.COMPACT:
            return None
        row_bytes = int(ds.shape[1]) * ds.dtype.itemsize
        if ds.chunks is None:
            offset = ds.id.get_offset()
            if offset is None:
                return None
            block_rows, offsets = rows, np.asarray([offset], dtype=np.int64)
        else:
            if ds.chunks[1] != ds.shape[1]:
                return None
            block_rows = int(ds.chunks[0])
            offsets = _chunk_offsets(ds, block_rows, -(-rows // block_rows), block_rows * row_bytes)
            if offsets is None:
                return None
        if offsets.min() < 0 or int(offsets.max()) + block_rows * row_bytes > os.path.getsize(path):
            return None
        return cls(path, ds, block_rows, offsets)

    def read(self, rows: Any) -> Any:
        """The rows (int array, each checked by the caller to be in range) in the dataset's dtype:
        one gather in C over a sliding-window view of the file's bytes (row i of the view = the
        row that starts at byte i). It replaced a Python loop over the rows, which with an h5py
        lookup per read cost ~1 ms of a 1024-d search query re-ranking 320 rows."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64)
        starts = self.block_offsets[rows // self.block_rows] + (rows % self.block_rows) * self.row_bytes
        return self._windows[starts].view(self.dtype)

    def close(self) -> None:
        self._windows = None
        self._map = None


def _chunk_offsets(ds: Any, chunk_rows: int, n_chunks: int, chunk_bytes: int) -> Any:
    """File offsets of the first `n_chunks` chunks of whole rows, or None when one is missing,
    filtered or not of the plain size."""
    import numpy as np

    offsets = np.full(n_chunks, -1, dtype=np.int64)
    for info in _chunks(ds):
        index = info.chunk_offset[0] // chunk_rows
        if index >= n_chunks:
            continue
        if info.filter_mask or info.size != chunk_bytes or info.byte_offset is None:
            return None
        offsets[index] = info.byte_offset
    return offsets if offsets.min() >= 0 else None
