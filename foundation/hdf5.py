"""Opening HDF5 inputs for reading, with errors that name the file and say what to do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from foundation.errors import DataError

#: HDF5's own wording when its file lock is held by another process ("unable to lock file, errno = 11").
_LOCKED = re.compile(r"\bunable to lock file\b", re.IGNORECASE)
#: HDF5's wording for a file shorter than its superblock says ("truncated file: eof = ..., stored_eof = ...").
_TRUNCATED = re.compile(r"\btruncated file\b", re.IGNORECASE)


def open_hdf5(path: str | Path, context: str = "") -> Any:
    """`h5py.File(path, "r")`, or a DataError naming the file (after `context`, e.g. the option it
    came from); a file another process holds open for writing gets HDF5's lock explained, and a
    truncated file is called truncated."""
    import h5py  # lazily: `foundation.embeddings` readers should not pay for it at CLI start-up

    where = f"{context}: {path}" if context else str(path)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise hdf5_open_error(where, exc) from None


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
