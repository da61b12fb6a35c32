"""Small shard sets shared by the data-layer tests."""

from __future__ import annotations

import numpy as np
import pytest

from foundation.data import ShardWriter


def _make_sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "__key__": f"obj-{i:05d}",
        "flux": rng.normal(size=(6,)).astype(np.float32),
        "label": i,
        "z": float(i) / 10,
        "name": f"object {i}",
        "meta": {"index": i, "tags": ["a", str(i)]},
    }


def _write_split(path, n: int, samples_per_shard: int, split: str = "train", **kwargs):
    with ShardWriter(path, split=split, samples_per_shard=samples_per_shard, **kwargs) as writer:
        for i in range(n):
            writer.write(_make_sample(i))
    return path


@pytest.fixture(scope="session")
def make_sample():
    """make_sample(i) -> a sample with an array, int, float, str and JSON field."""
    return _make_sample


@pytest.fixture(scope="session")
def write_split():
    """write_split(path, n, samples_per_shard, split="train", **writer_kwargs) -> path."""
    return _write_split


@pytest.fixture(scope="session")
def small_set(tmp_path_factory):
    """103 train samples in shards of 10 (the last one short): uneven on purpose."""
    return _write_split(tmp_path_factory.mktemp("small") / "set", 103, 10, family="test")


# ---------------------------------------------------------------------- an S3-API server


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of `target` (host, port) that passes every
    request on, except that `faults[name]` (the last path part of an object) lists actions for its
    next GETs: "503" (an S3 ServiceUnavailable reply, which s3fs leaves to its caller) or "drop"
    (the headers and half the body, then the connection closes). `gets` counts GETs per name.
    `failing_puts` holds substrings: a PUT (or copy) whose path holds one is answered 503 always."""

    def __init__(self, target: tuple[str, int]):
        import http.client
        import http.server
        import socket
        import threading
        import time
        from collections import Counter

        self.faults: dict[str, list[str]] = {}
        self.gets: Counter[str] = Counter()
        self.failing_puts: set[str] = set()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                name = self.path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
                action = None
                if self.command == "GET" and "?" not in self.path:
                    proxy.gets[name] += 1
                    if proxy.faults.get(name):
                        action = proxy.faults[name].pop(0)
                if self.command == "PUT" and any(part in self.path for part in proxy.failing_puts):
                    action = "503"
                if action == "503":
                    reply = b"<Error><Code>ServiceUnavailable</Code><Message>Try again.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                upstream = http.client.HTTPConnection(*target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if action == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    time.sleep(0.1)  # the client reads what came before the connection breaks
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # noqa: N815 (http.server names)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server (server mode) on a free port of 127.0.0.1, for the whole session."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"the S3 tests need moto's server mode (pip install 'moto[server]'): {exc}")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield host, port
    server.stop()


class S3Bucket:
    """One empty bucket on the moto server, reached through a FaultProxy; `url(key)` is its
    s3:// URL, `fs` an s3fs file system on it."""

    def __init__(self, name: str, proxy: FaultProxy):
        import s3fs

        self.name = name
        self.proxy = proxy
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True)
        self.fs.mkdir(name)

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}" if key else f"s3://{self.name}"

    def upload(self, local, key: str) -> str:
        """Copy a local shard-set folder under `key`; return its URL."""
        for path in sorted(p for p in local.iterdir() if p.is_file()):
            self.fs.put_file(str(path), f"{self.name}/{key}/{path.name}")
        return self.url(key)


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch, request):
    """A fresh bucket; the endpoint is given the standard way (AWS_ENDPOINT_URL), with dummy
    credentials, as a user points at MinIO or Ceph."""
    pytest.importorskip("s3fs")
    import re
    import uuid

    proxy = FaultProxy(moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    yield S3Bucket(f"{stem}-{uuid.uuid4().hex[:8]}", proxy)
    proxy.close()
