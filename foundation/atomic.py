"""Write-then-rename: a reader sees the old file or the whole new one, never half of either.

Every artefact the project writes (manifests, reports, embeddings, model folders) goes through
these helpers: the bytes land in a temporary name beside the target (same file system, so the
rename is atomic), are flushed to disk, and only then take the target's name; the folder holding
it is flushed after the rename, so the new name survives a power cut too. A failure removes the
temporary and leaves the target as it was. `publish` is the last step alone, for writers whose
temporary has a name of its own (a resumable `.partial` file, a checkpoint folder every rank
writes into).
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


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk; best effort,
    as some file systems refuse to open or fsync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file's bytes to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str | Path) -> None:
    """Flush every file under folder `path`, then every folder's entries, to disk."""
    path = Path(path)
    for child in path.iterdir():
        if child.is_symlink():
            continue
        if child.is_dir():
            fsync_tree(child)
        elif child.is_file():
            fsync_file(child)
    fsync_dir(path)


def publish(tmp: str | Path, path: str | Path, *, overwrite: bool = True) -> None:
    """Give the fully written temporary `tmp` (a file or a folder, beside `path`) the name `path`:
    its contents are flushed to disk before the rename, the parent folder after it. With
    `overwrite=False` an existing `path` is never replaced (FileExistsError)."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir() and not tmp.is_symlink():
        fsync_tree(tmp)
    elif tmp.is_file():
        fsync_file(tmp)
    if overwrite:
        os.replace(tmp, path)
    else:
        if path.exists():
            raise FileExistsError(f"{path} appeared while it was being written; nothing was replaced")
        os.rename(tmp, path)
    fsync_dir(path.parent)


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
        publish(tmp, path, overwrite=overwrite)
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


def write_figure(path: str | Path, figure: Any, **savefig: Any) -> Path:
    """Save a matplotlib figure to `path` atomically (format from the name's suffix, png without
    one; `savefig` go to Figure.savefig), then close it, since pyplot keeps open figures alive."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with replacing(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig)
    plt.close(figure)
    return path
