"""Write-then-rename: a reader sees the old file or the whole new one, never half of either.

Every artefact the project writes (manifests, reports, embeddings, model folders) goes through
these helpers: the bytes land in a temporary name beside the target (same file system, so the
rename is atomic), are flushed to disk, and only then take the target's name. A failure removes
the temporary and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write (a file, or a folder the caller creates); on success it
    takes `path`'s name. With `overwrite=False` an existing `path` is never replaced: the rename
    fails with FileExistsError instead (and for folders `os.rename` refuses a non-empty target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            if path.exists():
                raise FileExistsError(f"{path} appeared while it was being written; nothing was replaced")
            os.rename(tmp, path)
    finally:
        _remove(tmp)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; return `path`."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return `path`."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """Write `data` as indented JSON with a final newline, atomically; `dumps` go to json.dumps."""
    dumps.setdefault("indent", 1)
    return write_text(path, json.dumps(data, **dumps) + "\n")
