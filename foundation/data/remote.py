"""Shard sets on object storage (`https://`, `http://`, `s3://`, `gs://`, `hf://`) through fsspec.

Each shard is fetched *whole* into a bounded local cache and checked (size and sha256 against the
manifest) before anything reads it; the local reader then reads the cached file. So batches,
determinism and exact resume are those of a local shard set: only where the bytes come from
differs. Transient errors (dropped connections, timeouts, HTTP 429/5xx) are retried with
exponential backoff, each retry continuing from the bytes already received (an HTTP Range request,
or a seek on stores read by ranges); after the last try a `DataError` names the shard and its URL.
Writing a set to a URL is `foundation.data.upload`.

Read-ahead: a `ShardDataset` over a remote set asks `prefetch` for the next few shards of its plan
after each batch; one background thread per process fetches them into the cache (never more than
half the cache bound ahead), so the loader rarely waits for the network. A shard is still read
only once it is whole and checked: no unverified byte reaches training.

Cache layout, one folder per shard-set URL: `<cache_dir>/<hash of URL>/` holds `manifest.json`
(fetched anew on every open), the extra files, and the shards under their own names, each beside
a `<name>.sha256` marker written once the shard was checked. A shard is trusted from the cache
only while its size and marker match the current manifest; least recently used shards are
removed when the cached shards exceed `cache_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation import atomic
from foundation.data.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from foundation.errors import DataError

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "s3", "gs", "hf")
DEFAULT_CACHE_BYTES = 16 << 30
_CHUNK = 4 << 20
_MARKER = ".sha256"


_FORK_HOOK: list[bool] = []


def _reset_fsspec_after_fork() -> None:
    """fsspec runs async file systems on an event-loop thread that a forked child (a loader
    worker) does not inherit: without a reset, the child's first read waits for it forever."""
    if not _FORK_HOOK:
        import fsspec.asyn

        os.register_at_fork(after_in_child=fsspec.asyn.reset_lock)
        _FORK_HOOK.append(True)


def is_url(path: Any) -> bool:
    """True for a shard-set location we read through fsspec (`scheme://...`)."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return path.split("://", 1)[0].lower() in URL_SCHEMES


def default_cache_dir() -> Path:
    """`$FOUNDATION_CACHE/shards`, else `~/.cache/foundation/shards`."""
    root = os.environ.get("FOUNDATION_CACHE") or Path.home() / ".cache" / "foundation"
    return Path(root) / "shards"


def open_filesystem(url: str, storage_options: dict[str, Any] | None = None, timeout_s: float = 60.0):
    """A new fsspec file system for `url`'s scheme; for http(s) with connect and read timeouts of
    `timeout_s` (aiohttp's default only bounds a whole transfer, at 5 minutes) unless
    `storage_options` gives client_kwargs. s3:// takes its endpoint and credentials the standard
    way (AWS_ENDPOINT_URL, AWS_PROFILE, ...) or from storage_options (endpoint_url=, key=, secret=)."""
    try:
        import fsspec
    except ImportError:
        raise DataError("shard sets at URLs need fsspec: pip install 'foundation[remote]'") from None
    protocol = url.split("://", 1)[0].lower()
    options = dict(storage_options or {})
    _reset_fsspec_after_fork()
    try:
        if protocol in ("http", "https") and "client_kwargs" not in options:
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
            options["client_kwargs"] = {"timeout": timeout}
        return fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    except ImportError as exc:
        raise DataError(
            f"{protocol}:// URLs need a package fsspec could not import ({exc}); install it (s3fs "
            "for s3://, gcsfs for gs://, huggingface_hub for hf://, aiohttp for http(s)://)"
        ) from None


def load_manifest(path: str | os.PathLike, **options: Any) -> Manifest:
    """The manifest of a shard set in a local folder or at a URL (fetched with its extra files into
    the cache, so `manifest.path` is a folder holding them); `options` go to `RemoteShardSet`."""
    if is_url(path):
        return RemoteShardSet(str(path), **options).manifest
    return Manifest.load(path)


class DamagedShardError(DataError):
    """An object whose bytes differ from what the manifest records (another try would not mend it)."""


class _Transient(Exception):
    """A failure worth another try (the message says what happened)."""


def _http_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and status >= 400 else None


def _is_transient(exc: BaseException) -> bool:
    """Dropped connections, timeouts and HTTP 429/5xx are worth another try."""
    status = _http_status(exc)
    if status is not None:
        return status == 429 or status >= 500
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, OSError, _Transient)):
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(exc, aiohttp.ClientError)


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
"""Failures another try would not mend (a missing object, a refused permission)."""


def _is_permanent(exc: BaseException) -> bool:
    """A storage refusal to report as a DataError; anything else that is not transient is a bug
    and keeps its traceback."""
    return isinstance(exc, _PERMANENT) or _http_status(exc) is not None


def _describe(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0].strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Partial:
    """A download in progress: the temporary file, the bytes received so far and their hash."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.received = 0
        self.digest = hashlib.sha256()

    def add(self, chunk: bytes, write: Callable[[Any, bytes], None]) -> None:
        write(self.file, chunk)
        self.received += len(chunk)
        self.digest.update(chunk)

    def restart(self) -> None:
        if self.received:
            self.file.seek(0)
            self.file.truncate()
            self.received = 0
            self.digest = hashlib.sha256()

    def close(self) -> None:
        self.file.close()


def _answered_range(response: Any, offset: int) -> bool:
    """True if an HTTP response is the 206 for `bytes=offset-` (a server without Range support
    answers 200 with the whole object)."""
    if response is None or getattr(response, "status", None) != 206:
        return False
    content_range = response.headers.get("Content-Range", "")
    return content_range.startswith(f"bytes {offset}-")


@dataclass(frozen=True)
class RetryPolicy:
    """Further tries after a transient failure; the wait before try k+1 is
    min(max_backoff_s, backoff_s * 2**k), with up to 25 % random jitter (it changes no data, only timing)."""

    retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, k: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**k) * (1 + random.random() / 4)


def with_retries(
    attempt: Callable[[], Any], policy: RetryPolicy, failure: Callable[[str, int | None], str], where: str
) -> Any:
    """Run `attempt`, again after transient failures. A refusal (a missing object, a denied
    permission, HTTP 4xx) and the last transient failure become a DataError with the message
    `failure(cause, tries)` (`tries` None for a refusal); anything else is a bug and propagates."""
    for k in range(policy.retries + 1):
        try:
            return attempt()
        except Exception as exc:
            if isinstance(exc, DataError) or not (_is_transient(exc) or _is_permanent(exc)):
                raise
            if not _is_transient(exc):
                raise DataError(failure(_describe(exc), None)) from None
            if k == policy.retries:
                raise DataError(failure(_describe(exc), policy.retries + 1)) from None
            delay = policy.delay(k)
            log.warning("%s: %s; retrying in %.2f s", where, _describe(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass
class _Background:
    """This process's read-ahead thread and the per-shard locks (by cache path, shared by every
    `RemoteShardSet` of the process) that keep it and the loaders from fetching one shard into the
    same temporary name at once; made anew after a fork."""

    pid: int
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="shard-read-ahead")
    )
    guard: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[str, Future] = field(default_factory=dict)
    failed: dict[str, BaseException] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)
    fetching: dict[str, threading.Lock] = field(default_factory=dict)


_PROCESS_GUARD = threading.Lock()
_PROCESS_BACKGROUND: list[_Background] = []


def _background() -> _Background:
    with _PROCESS_GUARD:
        if not _PROCESS_BACKGROUND or _PROCESS_BACKGROUND[0].pid != os.getpid():
            _PROCESS_BACKGROUND[:] = [_Background(os.getpid())]
        return _PROCESS_BACKGROUND[0]


class RemoteShardSet:
    """A shard set at a URL, read through a bounded local cache of whole, checked shards.

    Args:
        url: the shard-set folder's URL (holding manifest.json).
        cache_dir: where cached shard sets live (default: `default_cache_dir()`).
        cache_bytes: bound on this set's cached shards; least recently used ones are removed
            above it (a shard being fetched is kept even if it alone exceeds the bound).
        retries: further tries after a transient failure.
        backoff_s, max_backoff_s: the wait before try k+1 is min(max_backoff_s, backoff_s * 2**k),
            with up to 25 % random jitter (it changes no data, only timing).
        timeout_s: http(s): a connection or a read that stalls longer fails (and is retried).
        storage_options: passed to fsspec (e.g. S3 endpoint, credentials profile).
    """

    def __init__(
        self,
        url: str,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        *,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 60.0,
        storage_options: dict[str, Any] | None = None,
    ):
        if not is_url(url):
            raise DataError(f"{url!r} is not a shard-set URL; use one of {', '.join(URL_SCHEMES)}://")
        if int(cache_bytes) <= 0:
            raise DataError(f"cache_bytes must be positive, got {cache_bytes!r}")
        self.url = url.rstrip("/")
        self.cache_bytes = int(cache_bytes)
        self.retry = RetryPolicy(max(0, int(retries)), float(backoff_s), float(max_backoff_s))
        self.timeout_s = float(timeout_s)
        self.storage_options = dict(storage_options or {})
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.local = root / hashlib.sha256(self.url.encode()).hexdigest()[:24]
        self._filesystem: Any = None
        self._filesystem_pid = 0
        self.resumed_bytes = 0
        """Bytes not fetched again because a retry resumed a download (for tests and logs)."""
        self.manifest = self._open()

    # ------------------------------------------------------------------ public

    def shard_path(self, info) -> Path:
        """The local path of shard `info` (a manifest ShardInfo), fetched and checked if needed."""
        return self._get(info, ahead=False)

    def prefetch(self, infos: Iterable[Any]) -> None:
        """Start fetching shards the loader will need soon (in order, on this process's read-ahead
        thread), at most half the cache bound ahead so that read-ahead never evicts what is being
        read. A failed fetch is not reported here: its error (after all retries) is raised to the
        loader when it asks for that shard."""
        state = _background()
        budget = self.cache_bytes // 2
        for info in infos:
            budget -= info.bytes
            if budget < 0:
                break
            key = str(self.local / info.name)
            with state.guard:
                if key not in state.pending:
                    state.pending[key] = state.pool.submit(self._fetch_ahead, info, state)

    def stop_read_ahead(self) -> None:
        """Drop this set's read-ahead fetches not yet started (a loader stopped), and forget its
        failed ones, so that the next loader tries those shards afresh; a fetch under way finishes
        (its shard lands in the cache whole, or not at all)."""
        state = _background()
        folder = str(self.local) + os.sep
        with state.guard:
            for key, future in list(state.pending.items()):
                if key.startswith(folder) and future.cancel():
                    del state.pending[key]
            for key in [k for k in state.failed if k.startswith(folder)]:
                del state.failed[key]
            state.unreadable = {k for k in state.unreadable if not k.startswith(folder)}

    def wait_read_ahead(self, timeout_s: float | None = None) -> bool:
        """Wait until this set's read-ahead fetches, queued or under way, have finished (before
        removing its cache, or to see it settled); False if some still run after `timeout_s`."""
        state = _background()
        folder = str(self.local) + os.sep
        with state.guard:
            running = [f for key, f in state.pending.items() if key.startswith(folder)]
        _, not_done = futures_wait(running, timeout=timeout_s)
        return not not_done

    def _fetch_ahead(self, info: Any, state: _Background) -> None:
        try:
            self._get(info, ahead=True)
        except Exception as exc:  # noqa: BLE001 - kept by _get; raised when the loader asks for it
            log.debug("read-ahead of %s failed: %s", info.name, exc)
        finally:
            with state.guard:
                state.pending.pop(str(self.local / info.name), None)

    def _get(self, info: Any, ahead: bool) -> Path:
        """Fetch (once per process at a time) and check shard `info`. A read-ahead's failure,
        reached after all its retries, is kept and raised to the loader when it asks for the shard,
        rather than trying again as many times."""
        path = self.local / info.name
        key = str(path)
        state = _background()
        with state.guard:
            lock = state.fetching.setdefault(key, threading.Lock())
        with lock:
            if not ahead:
                with state.guard:
                    failure = state.failed.pop(key, None)
                if failure is not None:
                    raise failure
            if self._cached(path, info.bytes, info.sha256):
                os.utime(path)  # most recently used
                return path
            if ahead and key in state.unreadable:
                return path  # its last fetch failed: only the loader tries it again
            try:
                self._fetch(info.name, path, info.bytes, info.sha256)
            except Exception as exc:
                with state.guard:
                    state.unreadable.add(key)
                    if ahead:
                        state.failed[key] = exc
                raise
            with state.guard:
                state.unreadable.discard(key)
            self._evict(keep=path)
        return path

    def fetch_all(self, splits: Sequence[str] | None = None) -> Path:
        """Fetch every shard of `splits` (default: all), for `shards verify`; return the local
        folder, then a complete shard set for those splits."""
        names = list(splits) if splits else sorted(self.manifest.splits)
        shards = [s for name in names for s in self.manifest.split(name).shards]
        total = sum(s.bytes for s in shards)
        if total > self.cache_bytes:
            raise DataError(
                f"{self.url}: the shard set holds {total} bytes, more than the cache bound of "
                f"{self.cache_bytes}; raise the bound (--cache-bytes) to fetch it whole"
            )
        for info in shards:
            self.shard_path(info)
        return self.local

    # ------------------------------------------------------------------ opening

    def _open(self) -> Manifest:
        """Fetch manifest.json and the extra files it lists; validate them as local ones."""
        self.local.mkdir(parents=True, exist_ok=True)
        raw = self._with_retries(MANIFEST_NAME, self._read_manifest_bytes)
        atomic.write_bytes(self.local / MANIFEST_NAME, raw)
        manifest = self._load_cached_manifest()
        for info in manifest.files.values():
            path = self.local / info.name
            if not self._cached(path, info.bytes, info.sha256):
                self._fetch(info.name, path, info.bytes, info.sha256)
        return manifest

    def _load_cached_manifest(self) -> Manifest:
        """Validate the fetched manifest; its errors name the URL it came from, not the cache."""
        try:
            return Manifest.load(self.local)
        except DataError as exc:
            message = str(exc).replace(str(self.local / MANIFEST_NAME), self._remote(MANIFEST_NAME))
            raise DataError(message.replace(str(self.local), self.url)) from None

    def _read_manifest_bytes(self) -> bytes:
        """The whole manifest; one read may return only one network chunk, so read to the end."""
        pieces: list[bytes] = []
        received = 0
        url = self._remote(MANIFEST_NAME)
        with self._fs().open(url, "rb", **self._open_options(MAX_MANIFEST_BYTES + 1)) as src:
            while received <= MAX_MANIFEST_BYTES:
                chunk = src.read(min(_CHUNK, MAX_MANIFEST_BYTES + 1 - received))
                if not chunk:
                    break
                pieces.append(chunk)
                received += len(chunk)
        if received > MAX_MANIFEST_BYTES:
            raise DataError(
                f"{url}: manifest is larger than {MAX_MANIFEST_BYTES >> 20} MiB; "
                "this is not a manifest of ours"
            )
        return b"".join(pieces)

    # ------------------------------------------------------------------ fetching

    def _fetch(self, name: str, path: Path, size: int, sha256: str) -> None:
        """Fetch to a temporary name across tries (a retry resumes from the bytes received where
        the server allows), check size and sha256, then publish it."""
        self._marker(path).unlink(missing_ok=True)
        with atomic.replacing(path) as tmp:
            partial = _Partial(tmp)
            try:
                self._with_retries(name, lambda: self._download(name, partial, size))
            finally:
                partial.close()
            if partial.received > size:
                raise DamagedShardError(
                    f"shard {name} at {self._remote(name)}: more than the {size} bytes the manifest "
                    "records; the object was replaced: re-create or re-upload the shard set"
                )
            if partial.digest.hexdigest() != sha256:
                raise DamagedShardError(
                    f"shard {name} at {self._remote(name)}: its sha256 differs from the manifest's; "
                    "the copy on the server is damaged or was replaced: re-create or re-upload the shard set"
                )
        atomic.write_text(self._marker(path), sha256 + "\n")

    def _download(self, name: str, partial: _Partial, size: int) -> None:
        """One try: continue `partial` from its end (or from the start where the server ignores
        the range), up to one byte past `size` so that a longer object is noticed."""
        with self._open_at(name, size, partial.received) as (src, resumed):
            if not resumed:
                partial.restart()
            self.resumed_bytes += partial.received
            while partial.received <= size:
                chunk = src.read(_CHUNK)
                if not chunk:
                    break
                partial.add(chunk, self._write_cache)
        if partial.received < size:
            raise _Transient(f"received {partial.received} bytes but the manifest records {size}")

    @contextlib.contextmanager
    def _open_at(self, name: str, size: int, offset: int):
        """(file object, whether it starts at `offset`). HTTP: a `Range: bytes=offset-` request,
        resumed only if the server answers 206 from that offset; other stores: a seek (their files
        read by ranges)."""
        url = self._remote(name)
        if offset == 0:
            with self._fs().open(url, "rb", **self._open_options(size)) as src:
                yield src, True
            return
        if self._is_http():
            options = {**self._open_options(size), "headers": {"Range": f"bytes={offset}-"}}
            with self._fs().open(url, "rb", **options) as src:
                yield src, _answered_range(getattr(src, "r", None), offset)
            return
        with self._fs().open(url, "rb") as src:
            src.seek(offset)
            yield src, True

    def _write_cache(self, dst, chunk: bytes) -> None:
        """A local write failure (a full disk) is no transient network error: report it at once."""
        try:
            dst.write(chunk)
        except OSError as exc:
            raise DataError(
                f"cannot write to the shard cache {self.local} ({exc.strerror}); free space there or "
                "choose another cache folder"
            ) from None

    def _with_retries(self, name: str, attempt: Callable[[], Any]) -> Any:
        def failure(cause: str, tries: int | None) -> str:
            if tries is None:
                return f"shard set {self.url}: cannot read {name} from {self._remote(name)} ({cause})"
            return (
                f"shard set {self.url}: reading {name} from {self._remote(name)} failed {tries} times, "
                f"last with {cause}; check the server or network and try again"
            )

        return with_retries(attempt, self.retry, failure, self._remote(name))

    # ------------------------------------------------------------------ cache

    def _marker(self, path: Path) -> Path:
        return path.with_name(path.name + _MARKER)

    def _cached(self, path: Path, size: int, sha256: str) -> bool:
        try:
            if path.stat().st_size != size:
                return False
            return self._marker(path).read_text().strip() == sha256
        except (FileNotFoundError, NotADirectoryError):
            return False

    def _evict(self, keep: Path) -> None:
        """Remove least recently used shards until the cached shards fit `cache_bytes`. A reader
        that has a removed shard open keeps reading it (POSIX keeps the file until closed)."""
        entries = []
        for path in self.local.glob("*.tar"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # another process removed it meanwhile
            entries.append((stat.st_mtime, path, stat.st_size))
        total = sum(size for _, _, size in entries)
        for _, path, size in sorted(entries):
            if total <= self.cache_bytes:
                break
            if path == keep:
                continue
            self._marker(path).unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            total -= size

    # ------------------------------------------------------------------ fsspec

    def _remote(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _is_http(self) -> bool:
        return self.url.split("://", 1)[0].lower() in ("http", "https")

    def _open_options(self, size: int) -> dict[str, Any]:
        """HTTP: one streaming GET per object. Giving fsspec a size skips its HEAD/GET probe, which
        reports any failure (a 503 too) as a missing file; `size` bounds what is read anyway."""
        if self._is_http():
            return {"block_size": 0, "size": size}
        return {}

    def _fs(self):
        """This process's fsspec file system: a forked loader worker opens its own, as an async
        one's event loop and connections cannot cross a fork."""
        if self._filesystem is None or self._filesystem_pid != os.getpid():
            self._filesystem = open_filesystem(self.url, self.storage_options, self.timeout_s)
            self._filesystem_pid = os.getpid()
        return self._filesystem

    def __str__(self) -> str:
        return self.url

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_filesystem"] = None  # each process opens its own connections
        return state
