"""Writing shard sets to object storage (`prepare ... --out s3://bucket/set`), manifest last.

`ShardSetWriter` with a URL writes into a local staging folder and hands each shard here as soon
as it is finished: it is uploaded whole under a hidden temporary key (`.<name>.tmp-<token>`), its
size checked, and the local copy removed, so local staging holds at most one open shard per split.
Publishing copies every temporary object to its final key (checking the size again), uploads the
extra files the same way, and uploads `manifest.json` last, as one whole-object put: a reader sees
either no set (or the previous one) or the complete new one, never a manifest naming a missing
shard. A failure before the manifest leaves no new manifest, removes the temporary objects it can,
and raises a `DataError` naming the object and the URL.

The rules are the local writer's: an existing set (or, for one split, that split) is only
replaced with `overwrite`; shards not listed in the manifest (an interrupted write?) are refused
unless `overwrite`; the manifest is re-read before publishing, and a set published there
meanwhile by another process stops this one. Object stores have no locks, so two writers that
publish at the same moment are not told apart; the last manifest wins, whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from foundation.data.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ShardInfo
from foundation.data.remote import RetryPolicy, default_cache_dir, open_filesystem, with_retries
from foundation.data.writer import check_replaceable
from foundation.errors import DataError

log = logging.getLogger(__name__)

WRITABLE_SCHEMES = ("s3", "gs", "hf")
DEFAULT_RETRY = RetryPolicy()
"""Tries and backoff of each upload, copy and removal when the writer gives none."""
_SHARD_NAME = re.compile(r"^(?P<split>.+)-[0-9]{6}\.tar$")


def default_staging_dir() -> Path:
    """`$FOUNDATION_CACHE/staging`, else `~/.cache/foundation/staging`: where shards wait locally
    for their upload (at most one open shard per split)."""
    return default_cache_dir().parent / "staging"


class RemoteOutput:
    """The destination of a shard set written to a URL (used by `ShardSetWriter`).

    Args:
        url: the shard-set folder's URL (s3://, gs://, hf://).
        overwrite: replace an existing set (or the splits in `targets`).
        targets: the splits the writer replaces; None = the whole set.
        staging_dir: parent of the local staging folder (default: `default_staging_dir()`).
        retry: tries and backoff for each upload, copy and removal.
        storage_options: passed to fsspec (e.g. endpoint_url=, key=, secret=).
    """

    def __init__(
        self,
        url: str,
        *,
        overwrite: bool = False,
        targets: set[str] | None = None,
        staging_dir: str | os.PathLike | None = None,
        retry: RetryPolicy | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        scheme = url.split("://", 1)[0].lower()
        if scheme not in WRITABLE_SCHEMES:
            raise DataError(
                f"cannot write a shard set to {url}: {scheme}:// is read-only here; write to "
                f"{', '.join(s + '://' for s in WRITABLE_SCHEMES)} or to a local folder (and serve that)"
            )
        self.url = url.rstrip("/")
        self.retry = retry or DEFAULT_RETRY
        self.fs = open_filesystem(self.url, storage_options)
        self.token = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.staged: list[tuple[str, str, int]] = []
        """(final name, temporary key, size) of every object uploaded so far."""
        existing = self._read_manifest()
        self._seen = _digest(existing)
        self._check_target(existing, targets, overwrite)
        root = Path(staging_dir) if staging_dir is not None else default_staging_dir()
        root.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix="set-", dir=root))
        """The writer's local folder: the existing manifest (to add a split to it) and open shards."""
        if existing is not None:
            (self.staging / MANIFEST_NAME).write_bytes(existing)

    # ------------------------------------------------------------------ public

    def stage(self, info: ShardInfo, local: Path) -> None:
        """Upload a finished shard under its temporary key, check its size, drop the local copy."""
        self._upload(local, info.name, info.bytes)
        local.unlink()

    def publish(
        self,
        manifest: Manifest,
        files: Iterable[tuple[Path, str]],
        remove: Iterable[str],
        stray_splits: set[str] | None | bool,
    ) -> None:
        """Move the staged objects and `files` ((local path, name)) to their final keys, upload the
        manifest last, then remove `remove` (objects the new manifest no longer lists) and, unless
        `stray_splits` is False, unlisted shards of those splits (None: of every split)."""
        try:
            for local, name in files:
                self._upload(local, name, local.stat().st_size)
            self._recheck_target()
            for name, key, size in self.staged:
                self._run(f"publishing {name}", lambda k=key, n=name, s=size: self._copy(k, n, s))
            text = (manifest.to_json() + "\n").encode()
            self._run(f"uploading {MANIFEST_NAME}", lambda: self.fs.pipe_file(self._key(MANIFEST_NAME), text))
        finally:
            self.abort()
        listed = {s.name for split in manifest.splits.values() for s in split.shards} | set(manifest.files)
        doomed = set(remove) - listed
        if stray_splits is not False:
            doomed |= {
                name
                for name in self._shard_names()
                if name not in listed and (stray_splits is None or _split_of(name) in stray_splits)
            }
        for name in sorted(doomed):
            self._remove(self._key(name))

    def abort(self) -> None:
        """Remove the temporary objects uploaded so far and the local staging folder."""
        for _, key, _ in self.staged:
            self._remove(key)
        self.staged = []
        shutil.rmtree(self.staging, ignore_errors=True)

    # ------------------------------------------------------------------ checks

    def _check_target(self, existing: bytes | None, targets: set[str] | None, overwrite: bool) -> None:
        manifest = None
        if existing is not None:
            where = self._key(MANIFEST_NAME)
            manifest = Manifest.from_dict(_parse(existing, where), where)
        check_replaceable(self.url, manifest, targets, self._shard_names(), overwrite, "URL")

    def _recheck_target(self) -> None:
        """Nobody published a set at the URL while this one was writing."""
        if _digest(self._read_manifest()) != self._seen:
            raise DataError(
                f"{self.url}: another process published a shard set there while this one was writing; "
                "nothing was published — run again (with --overwrite to replace it)"
            )

    # ------------------------------------------------------------------ storage

    def _key(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _temporary_key(self, name: str) -> str:
        return self._key(f".{name}.tmp-{self.token}")

    def _run(self, what: str, attempt) -> Any:
        def failure(cause: str, tries: int | None) -> str:
            if tries is None:
                return f"writing shard set {self.url}: {what} failed ({cause}); nothing was published"
            return (
                f"writing shard set {self.url}: {what} failed {tries} times, last with {cause}; nothing "
                "was published — check the store and run again"
            )

        return with_retries(attempt, self.retry, failure, self.url)

    def _upload(self, local: Path, name: str, size: int) -> None:
        key = self._temporary_key(name)

        def put() -> None:
            self.fs.put_file(str(local), key)
            self._check_size(key, size)

        self.staged.append((name, key, size))
        self._run(f"uploading {name} to {key}", put)

    def _copy(self, key: str, name: str, size: int) -> None:
        final = self._key(name)
        self.fs.copy(key, final)
        self._check_size(final, size)

    def _check_size(self, key: str, size: int) -> None:
        """A short object (a put cut off without an error) is a failure worth another try."""
        self.fs.invalidate_cache(key)
        stored = self.fs.info(key).get("size")
        if stored != size:
            raise OSError(f"{key} holds {stored} bytes after the upload, not {size}")

    def _remove(self, key: str) -> None:
        """Best effort: a leftover temporary object is harmless (no manifest lists it)."""
        try:
            self.fs.rm_file(key)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 (cleanup must not hide the error being reported)
            log.warning("could not remove %s (%s); remove it by hand", key, exc)

    def _read_manifest(self) -> bytes | None:
        """The manifest now at the URL, or None."""

        def read() -> bytes | None:
            key = self._key(MANIFEST_NAME)
            self.fs.invalidate_cache(key)
            try:
                with self.fs.open(key, "rb") as src:
                    data = src.read(MAX_MANIFEST_BYTES + 1)
            except FileNotFoundError:
                return None
            if len(data) > MAX_MANIFEST_BYTES:
                raise DataError(f"{key}: manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
            return data

        return self._run(f"reading {MANIFEST_NAME}", read)

    def _shard_names(self) -> list[str]:
        """Names of the shard objects at the URL."""
        self.fs.invalidate_cache(self.url)
        try:
            entries = self.fs.ls(self.url, detail=False)
        except FileNotFoundError:
            return []
        names = (str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)
        return sorted(name for name in names if _SHARD_NAME.match(name))


def _split_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _parse(data: bytes, where: str) -> Any:
    import json

    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{where}: unreadable manifest ({(str(exc).splitlines() or [''])[0]})") from None
