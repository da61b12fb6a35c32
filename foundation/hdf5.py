"""Opening HDF5 inputs for reading, with errors that name the file and say what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foundation.errors import DataError


def open_hdf5(path: str | Path, context: str = "") -> Any:
    """`h5py.File(path, "r")`, or a DataError naming the file (after `context`, e.g. the option it
    came from); a file another process holds open for writing gets HDF5's lock explained."""
    import h5py  # lazily: `foundation.embeddings` readers should not pay for it at CLI start-up

    where = f"{context}: {path}" if context else str(path)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "lock" in str(exc).lower():
            raise DataError(
                f"{where} is locked by another process that is writing it; wait for it to finish "
                "(or set HDF5_USE_FILE_LOCKING=FALSE on file systems without locking)"
            ) from None
        raise DataError(f"{where}: cannot open as HDF5 ({exc})") from None
