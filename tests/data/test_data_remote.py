"""Shard sets read over HTTP from a real server on 127.0.0.1, with injected faults: the batches
are those of the local folder, damaged shards are refused, the cache stays within its bound."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

from foundation.data import ShardDataset  # noqa: E402
from foundation.data.remote import RemoteShardSet, is_url  # noqa: E402
from foundation.errors import DataError  # noqa: E402
from tests.testkit.same_shards import assert_same_batches, stream_keys_and_flux  # noqa: E402


class _Server:
    """A threaded static file server; `faults[name]` is a list of actions for the next requests
    of that file ("drop": headers and half the body, then the connection closes; "503"),
    `always_fail` names files that always answer 503, `trickle` files sent in small pieces.
    `requests` counts GETs per file; `Range: bytes=N-` is answered with a 206 from N (recorded in
    `range_starts`) unless `ranges` is False, when the whole file comes with a 200."""

    def __init__(self, root: Path):
        self.root = root
        self.faults: dict[str, list[str]] = {}
        self.always_fail: set[str] = set()
        self.trickle: set[str] = set()
        self.closing = threading.Event()
        self.requests: Counter[str] = Counter()
        self.ranges = True
        self.range_starts: dict[str, list[int]] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server name)
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                action = "503" if name in server.always_fail else None
                if action is None and server.faults.get(name):
                    action = server.faults[name].pop(0)
                if action == "503":
                    self.send_error(503)
                    return
                body = path.read_bytes()
                start = self._range_start()
                if start is not None and server.ranges and 0 < start < len(body):
                    server.range_starts.setdefault(name, []).append(start)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == "stall":  # half the body, then silence until the server closes
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.closing.wait()
                    return
                if action == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    time.sleep(0.1)  # the client reads what came before the connection breaks
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if name in server.trickle:
                    for start in range(0, len(body), 256):
                        self.wfile.write(body[start : start + 256])
                        self.wfile.flush()
                        time.sleep(0.0005)
                    return
                self.wfile.write(body)

            def _range_start(self) -> int | None:
                value = self.headers.get("Range", "")
                if value.startswith("bytes=") and value.endswith("-") and value[6:-1].isdigit():
                    return int(value[6:-1])
                return None

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/set"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path, write_split):
    """(local shard-set folder, running server over it): 103 samples in 11 shards."""
    local = write_split(tmp_path / "set", 103, 10, family="test")
    server = _Server(local)
    yield local, server
    server.close()


def _remote(server, tmp_path, **kwargs) -> RemoteShardSet:
    options = {"retries": 3, "backoff_s": 0.001, "max_backoff_s": 0.01}
    return RemoteShardSet(server.url, tmp_path / "cache", **{**options, **kwargs})


def test_is_url():
    assert is_url("https://example.org/set") and is_url("s3://bucket/set") and is_url("hf://datasets/o/r")
    assert not is_url("/data/set") and not is_url("file:///data/set") and not is_url(Path("/x"))


def test_faulty_server_gives_the_local_batches(served, tmp_path):
    local, server = served
    server.faults = {
        "train-000000.tar": ["drop"],
        "train-000003.tar": ["503", "drop"],
        "manifest.json": ["503"],
    }
    remote = stream_keys_and_flux(_remote(server, tmp_path))
    assert_same_batches(remote, stream_keys_and_flux(local))
    keys = [k for ks, _ in remote for k in ks]
    assert Counter(keys) == Counter({f"obj-{i:05d}": 2 for i in range(103)})  # two whole epochs
    assert server.requests["train-000000.tar"] == 2 and server.requests["train-000003.tar"] == 3
    assert server.requests["train-000005.tar"] == 1  # cached: fetched once for both epochs


def test_a_dropped_download_resumes_with_a_range_request(served, tmp_path):
    local, server = served
    name = "train-000004.tar"
    server.faults = {name: ["drop", "drop"]}  # each try gets half of what is left
    remote = _remote(server, tmp_path)
    assert_same_batches(
        stream_keys_and_flux(remote, shuffle=False), stream_keys_and_flux(local, shuffle=False)
    )
    size = (local / name).stat().st_size
    assert server.range_starts[name] == [size // 2, size // 2 + (size - size // 2) // 2]
    assert server.requests[name] == 3 and remote.resumed_bytes == sum(server.range_starts[name])


def test_a_server_without_range_support_restarts_the_download(served, tmp_path):
    local, server = served
    server.ranges = False
    server.faults = {"train-000004.tar": ["drop"]}
    remote = _remote(server, tmp_path)
    assert_same_batches(
        stream_keys_and_flux(remote, shuffle=False), stream_keys_and_flux(local, shuffle=False)
    )
    assert server.requests["train-000004.tar"] == 2 and remote.resumed_bytes == 0
    assert (remote.local / "train-000004.tar").read_bytes() == (local / "train-000004.tar").read_bytes()


def test_a_bad_manifest_at_a_url_is_named_by_its_url(served, tmp_path):
    local, server = served
    (local / "manifest.json").write_text('{"format": {"name": "something else"}}')
    with pytest.raises(DataError) as caught:
        _remote(server, tmp_path)
    message = str(caught.value)
    assert f"{server.url}/manifest.json" in message and str(tmp_path / "cache") not in message


def test_manifest_and_shards_arriving_in_small_pieces_are_read_whole(served, tmp_path):
    local, server = served
    server.trickle = {"manifest.json", "train-000000.tar"}
    assert (local / "manifest.json").stat().st_size > 2048
    remote = _remote(server, tmp_path)
    assert remote.manifest.splits["train"].samples == 103
    assert_same_batches(stream_keys_and_flux(remote), stream_keys_and_flux(local))


@pytest.mark.timeout(30)  # without a read timeout the stalled transfer would wait for minutes
def test_a_stalled_transfer_times_out_and_is_retried(served, tmp_path):
    local, server = served
    server.faults = {"train-000001.tar": ["stall"]}
    remote = _remote(server, tmp_path, timeout_s=0.3)
    assert_same_batches(stream_keys_and_flux(remote), stream_keys_and_flux(local))
    assert server.requests["train-000001.tar"] == 2


def test_resume_from_a_remote_set_matches_local(served, tmp_path):
    local, server = served
    ds = ShardDataset(_remote(server, tmp_path), batch_size=8, seed=1, epochs=2)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = ds.state_dict()
    resumed = ShardDataset(_remote(server, tmp_path), batch_size=8, seed=1, epochs=2)
    resumed.load_state_dict(state)
    rest = [b["__key__"] for b in resumed]
    full = [b["__key__"] for b in ShardDataset(local, batch_size=8, seed=1, epochs=2)]
    assert rest == full[5:]


def test_cache_stays_within_its_bound(served, tmp_path):
    local, server = served
    shard_bytes = max(p.stat().st_size for p in local.glob("*.tar"))
    bound = 3 * shard_bytes
    remote = _remote(server, tmp_path, cache_bytes=bound)
    assert_same_batches(stream_keys_and_flux(remote), stream_keys_and_flux(local))
    cached = list(remote.local.glob("*.tar"))
    assert 0 < sum(p.stat().st_size for p in cached) <= bound
    assert server.requests["train-000000.tar"] >= 2  # evicted, then fetched again for epoch 2


def test_damaged_shard_on_the_server_is_refused(served, tmp_path):
    local, server = served
    victim = local / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    remote = _remote(server, tmp_path)
    with pytest.raises(DataError, match=r"train-000002\.tar.*sha256"):
        stream_keys_and_flux(remote, shuffle=False)
    assert server.requests["train-000002.tar"] == 1  # not retried: another try gives the same bytes
    assert not (remote.local / "train-000002.tar").exists()
    # No temporary left once a read-ahead fetch still under way when the loader stopped has finished.
    assert remote.wait_read_ahead(timeout_s=60)
    assert not [p for p in remote.local.iterdir() if p.name.startswith(".")]


def test_a_longer_shard_on_the_server_is_refused(served, tmp_path):
    local, server = served
    victim = local / "train-000006.tar"
    victim.write_bytes(victim.read_bytes() + bytes(512))
    with pytest.raises(DataError, match=r"train-000006\.tar.*more than the"):
        stream_keys_and_flux(_remote(server, tmp_path), shuffle=False)
    assert server.requests["train-000006.tar"] == 1


def test_an_oversized_manifest_is_refused_unparsed(served, tmp_path, monkeypatch):
    import foundation.data.remote as remote_module

    _, server = served
    monkeypatch.setattr(remote_module, "MAX_MANIFEST_BYTES", 1024)
    with pytest.raises(DataError, match="manifest is larger than"):
        _remote(server, tmp_path)


def test_last_retry_error_names_shard_and_url(served, tmp_path):
    _, server = served
    server.always_fail = {"train-000001.tar"}
    remote = _remote(server, tmp_path)
    with pytest.raises(DataError) as caught:
        stream_keys_and_flux(remote, shuffle=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{server.url}/train-000001.tar" in message and "4 times" in message and "503" in message
    assert server.requests["train-000001.tar"] == 4


def test_missing_shard_is_not_retried(served, tmp_path):
    local, server = served
    (local / "train-000004.tar").unlink()
    with pytest.raises(DataError, match=r"train-000004\.tar.*FileNotFoundError"):
        stream_keys_and_flux(_remote(server, tmp_path), shuffle=False)
    assert server.requests["train-000004.tar"] == 1


def test_a_url_as_path_uses_the_default_cache(served, tmp_path, monkeypatch):
    local, server = served
    monkeypatch.setenv("FOUNDATION_CACHE", str(tmp_path / "home-cache"))
    assert_same_batches(stream_keys_and_flux(server.url), stream_keys_and_flux(local))
    assert list((tmp_path / "home-cache" / "shards").glob("*/train-000000.tar"))


def test_remote_set_survives_pickling(served, tmp_path):
    import pickle

    _, server = served
    remote = _remote(server, tmp_path)
    remote._fs()
    copy = pickle.loads(pickle.dumps(remote))
    assert copy._filesystem is None and copy.manifest.splits["train"].samples == 103
    assert os.path.samefile(copy.shard_path(copy.manifest.splits["train"].shards[0]).parent, remote.local)


def test_shards_info_and_verify_take_a_url(served, tmp_path, capsys):
    from foundation.cli import main

    local, server = served
    cache = ["--cache-dir", str(tmp_path / "cli-cache")]
    assert main(["shards", "info", server.url, *cache]) == 0
    assert f"shard set  {server.url}" in capsys.readouterr().out
    server.faults = {"train-000007.tar": ["drop"]}
    assert main(["shards", "verify", server.url, *cache]) == 0
    assert "OK: 11 shards, 103 samples" in capsys.readouterr().out


def test_shards_verify_reports_a_damaged_shard_at_a_url(served, tmp_path, capsys):
    from foundation.cli import main

    local, server = served
    victim = local / "train-000009.tar"
    victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    assert main(["shards", "verify", server.url, "--cache-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "train-000009.tar" in err and "sha256" in err and "FAILED" in err


def test_shards_verify_refuses_a_set_larger_than_the_cache_bound(served, tmp_path, capsys):
    from foundation.cli import main

    _, server = served
    assert (
        main(["shards", "verify", server.url, "--cache-dir", str(tmp_path / "c"), "--cache-bytes", "1000"])
        == 2
    )
    assert "--cache-bytes" in capsys.readouterr().err


def test_a_shard_evicted_before_opening_is_fetched_again(served, tmp_path):
    local, server = served
    remote = _remote(server, tmp_path)
    fetch = remote.shard_path
    evicted: list[str] = []

    def fetch_then_lose(info):  # another loader process evicts it right after our fetch
        path = fetch(info)
        if not evicted:
            evicted.append(info.name)
            path.unlink()
        return path

    remote.shard_path = fetch_then_lose
    assert_same_batches(stream_keys_and_flux(remote), stream_keys_and_flux(local))
    assert evicted and server.requests[evicted[0]] == 2


@pytest.mark.slow
def test_loader_workers_read_a_remote_set(served, tmp_path):
    from torch.utils.data import DataLoader

    local, server = served
    server.faults = {"train-000002.tar": ["drop"]}
    ds = ShardDataset(_remote(server, tmp_path), batch_size=8, seed=3, epochs=1)
    got = [b["__key__"] for b in DataLoader(ds, batch_size=None, num_workers=2)]
    assert got == [b["__key__"] for b in ShardDataset(local, batch_size=8, seed=3, epochs=1)]


def test_a_failing_cache_write_is_reported_at_once(served, tmp_path, monkeypatch):
    _, server = served
    remote = _remote(server, tmp_path)
    write = remote._write_cache
    monkeypatch.setattr(remote, "_write_cache", lambda dst, chunk: write(_Full(), chunk))
    with pytest.raises(DataError, match="cannot write to the shard cache.*No space left"):
        stream_keys_and_flux(remote, shuffle=False)
    assert server.requests["train-000000.tar"] == 1


class _Full:
    """A file on a full disk."""

    def write(self, chunk):
        raise OSError(28, "No space left on device")


def test_writing_a_set_to_http_is_refused(make_sample):
    from foundation.data import ShardSetWriter

    with pytest.raises(DataError, match=r"http:// is read-only here"):
        ShardSetWriter("http://127.0.0.1:9/set", {"train": 1.0})


def _wait_cached(remote: RemoteShardSet, names: list[str], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all((remote.local / (name + ".sha256")).exists() for name in names):
            return True
        time.sleep(0.02)
    return False


def test_read_ahead_fetches_the_plans_next_shards_in_the_background(served, tmp_path):
    local, server = served
    remote = _remote(server, tmp_path)
    ds = ShardDataset(remote, batch_size=8, seed=3, drop_last=False, shuffle_window=10, read_ahead=3)
    batches = iter(ds)
    next(batches)  # reads the first shard of the epoch's order (one window = one 10-sample shard)
    ahead = [ds.split_info.shards[s].name for s in ds.plan.shards_after(0, 0, 3)]
    first = ds.split_info.shards[int(ds.plan.shard_order(0)[0][0])].name
    assert len(ahead) == 3 and first not in ahead
    assert _wait_cached(remote, ahead), "the next shards were not fetched ahead"
    rest = list(batches)
    assert sum(len(b["__key__"]) for b in rest) == 103 - 8
    assert all(server.requests[p.name] == 1 for p in local.glob("*.tar"))  # ahead, then from the cache


def test_without_read_ahead_only_the_shards_read_are_fetched(served, tmp_path):
    _, server = served
    remote = _remote(server, tmp_path)
    ds = ShardDataset(remote, batch_size=8, seed=3, shuffle_window=10, read_ahead=0)
    next(iter(ds))
    time.sleep(0.3)
    assert sum(server.requests[name] for name in server.requests if name.endswith(".tar")) == 1


def test_a_failed_read_ahead_is_reported_when_the_shard_is_needed(served, tmp_path):
    _, server = served
    remote = _remote(server, tmp_path)
    ds = ShardDataset(remote, batch_size=8, seed=3, shuffle_window=10, read_ahead=2, drop_last=False)
    victim = ds.split_info.shards[int(ds.plan.shards_after(0, 0, 2)[1])].name
    server.always_fail = {victim}
    batches = iter(ds)
    next(batches)  # fine: the failing shard is only being fetched ahead
    with pytest.raises(DataError, match=rf"{victim}.*4 times"):
        list(batches)
    assert server.requests[victim] == 4  # the read-ahead's tries, not tried again as many times


def test_read_ahead_must_be_a_count_of_shards(served, tmp_path):
    _, server = served
    with pytest.raises(DataError, match="read_ahead"):
        ShardDataset(_remote(server, tmp_path), read_ahead=-1)
