"""The HTTP repository: RepositoryServer / ``fedsm repo serve`` and the HttpRepository client.

The scenarios every repository must pass (round trips, idempotent uploads, tampered files
refused, URLs and ids that are not digests refused, any bytes) run from
:class:`fedsm.testing.RepositoryContract` against a live server; this module adds what is
particular to HTTP. Statuses are checked with raw ``http.client`` requests so the server sees
paths exactly as written (``requests`` would normalise ``..``). Retry behaviour is checked
against a tiny misbehaving server. The memory test runs ``fedsm repo serve`` as a subprocess
and samples its RSS while a 200 MB file goes up and comes back down.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import requests

from fedsm.cli import main as cli_main
from fedsm.cli.repo import parse_size
from fedsm.repository import (
    DigestMismatch,
    FileTooLarge,
    HttpRepository,
    InvalidRepositoryUrl,
    LocalRepository,
    Repository,
    RepositoryServer,
    RepositoryUnauthorized,
    RepositoryUnreachable,
    open_repository,
)
from fedsm.repository import http as http_module
from fedsm.repository._store import DigestStore
from fedsm.testing import RepositoryContract

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RepositoryServer]:
    with RepositoryServer(tmp_path / "store", token=TOKEN, max_size=1 << 20) as srv:
        yield srv


@pytest.fixture
def repo(server: RepositoryServer, tmp_path: Path) -> Iterator[HttpRepository]:
    with HttpRepository(server.url, TOKEN, download_dir=tmp_path / "dl", backoff_s=0.01) as r:
        yield r


def _raw(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent verbatim; returns (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        all_headers = dict(headers or {})
        if body is not None:
            all_headers.setdefault("Content-Length", str(len(body)))
        for name, value in all_headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _stored(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- round trip -------------------------------------------------------------------------------


class TestHttpRepositoryContract(RepositoryContract):
    """The shared repository scenarios, on an HttpRepository talking to a RepositoryServer
    (on 127.0.0.1, a free port, with a token; every request with a timeout)."""

    __test__ = True

    def make_repository(self, tmp_path: Path) -> Iterator[HttpRepository]:
        self.store = tmp_path / "store"
        with RepositoryServer(self.store, token=TOKEN, max_size=16 << 20) as srv:
            with HttpRepository(srv.url, TOKEN, timeout_s=10, retries=1, backoff_s=0.01) as client:
                yield client

    def replace_stored_bytes(self, repository: Repository, digest: str, data: bytes) -> None:
        (self.store / digest).write_bytes(data)

    def stored_digests(self, repository: Repository) -> list[str]:
        return _stored(self.store)


def test_url_form_store_layout_and_download_dir(
    repo: HttpRepository, server: RepositoryServer, tmp_path: Path
) -> None:
    data = os.urandom(70_000)
    src = tmp_path / "params.safetensors"
    src.write_bytes(data)
    digest = _sha(data)
    up = repo.upload_file(src)
    assert up["file"] == f"{server.url}/files/{digest}"
    assert (tmp_path / "store" / digest).read_bytes() == data
    status, path = repo.download_file(up["file"], "node_params_1.pt")
    assert (status, path) == (200, tmp_path / "dl" / "node_params_1.pt")
    assert path.read_bytes() == data


def test_second_upload_of_same_content_sends_nothing(repo: HttpRepository, tmp_path: Path) -> None:
    src = tmp_path / "plan.py"
    src.write_bytes(b"class Plan: ...\n")
    first = repo.upload_file(src)
    stored = tmp_path / "store" / first["sha256"]
    inode = stored.stat().st_ino
    assert repo.upload_file(src) == first
    assert stored.stat().st_ino == inode  # not rewritten: the HEAD probe found it


def test_upload_bytes_sends_small_new_bytes_in_one_request(
    repo: HttpRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's trained parameters are new: one PUT, no HEAD first (a round trip saved per
    node-round); the server keeps one file per digest, and the bytes read back whole."""
    import requests

    def no_head(*args: object, **kwargs: object) -> None:
        raise AssertionError("upload_bytes asked first (HEAD) for small new bytes")

    monkeypatch.setattr(requests.Session, "head", no_head)
    data = b"trained parameters" * 100
    up = repo.upload_bytes(data)
    assert repo.upload_bytes(data) == up  # again: stored once
    assert repo.read_bytes(up["file"], max_bytes=len(data)) == data
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if p.is_file()) == [up["sha256"]]


def test_open_repository_gives_a_working_http_client(
    server: RepositoryServer, tmp_path: Path
) -> None:
    repo = open_repository(server.url + "/", TOKEN)
    src = tmp_path / "f"
    src.write_bytes(b"via open_repository")
    up = repo.upload_file(src)
    _, path = repo.download_file(up["file"], tmp_path / "g")
    assert path.read_bytes() == b"via open_repository"


def test_server_and_local_repository_share_the_layout(repo: HttpRepository, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"shared layout")
    up = repo.upload_file(src)
    local = LocalRepository(tmp_path / "store")
    assert local.exists(up["sha256"])
    _, path = local.download_file(local.url_for(up["sha256"]), tmp_path / "g")
    assert path.read_bytes() == b"shared layout"


def test_missing_file_is_404(server: RepositoryServer) -> None:
    digest = _sha(b"never uploaded")
    assert _raw(server.url, "GET", f"/files/{digest}", headers=AUTH)[0] == 404
    assert _raw(server.url, "HEAD", f"/files/{digest}", headers=AUTH)[0] == 404


def test_urls_of_other_repositories_are_refused(repo: HttpRepository, tmp_path: Path) -> None:
    digest = "b" * 64
    parts = urlsplit(repo.base_url)
    for url in (
        f"http://{parts.hostname}:{parts.port + 1}/files/{digest}",
        f"http://example.org:{parts.port}/files/{digest}",
        f"https://{parts.hostname}:{parts.port}/files/{digest}",
        f"{repo.base_url}/other/{digest}",
        f"{repo.base_url}/files/../files/{digest}",
        LocalRepository(tmp_path / "local").url_for(digest),
    ):
        with pytest.raises(InvalidRepositoryUrl):
            repo.download_file(url, tmp_path / "out")


# -- statuses ---------------------------------------------------------------------------------


def test_digest_mismatch_is_400_and_stores_nothing(
    server: RepositoryServer, tmp_path: Path
) -> None:
    body = b"the real bytes"
    status, _, raw = _raw(server.url, "PUT", f"/files/{_sha(b'other')}", body, AUTH)
    assert status == 400
    assert json.loads(raw)["error"] == "digest_mismatch"
    assert _stored(tmp_path / "store") == []
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []
    # ...and the right digest is accepted on a fresh connection.
    assert _raw(server.url, "PUT", f"/files/{_sha(body)}", body, AUTH)[0] == 201
    assert _raw(server.url, "PUT", f"/files/{_sha(body)}", body, AUTH)[0] == 200


BAD_PATHS = [
    "/files/../etc/passwd",
    "/files/%2e%2e",
    "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/files/..%2f" + "a" * 64,
    "/files/" + "A" * 64,
    "/files/" + "a" * 63,
    "/files/" + "a" * 65,
    "/files/" + "a" * 64 + "/",
    "/files/" + "a" * 64 + "?download=1",
    "/files/" + "a" * 63 + "%00",
    "/files//etc/passwd",
    "/files/",
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_ids_that_are_not_lowercase_sha256_are_400(
    server: RepositoryServer, tmp_path: Path, path: str
) -> None:
    for method in ("GET", "HEAD"):
        assert _raw(server.url, method, path, headers=AUTH)[0] == 400, method
    status, _, raw = _raw(server.url, "PUT", path, b"payload", AUTH)
    assert status == 400
    assert json.loads(raw)["error"] == "bad_id"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert _stored(tmp_path / "store") == []


def test_paths_outside_files_are_404(server: RepositoryServer) -> None:
    for path in ("/", "/../etc/passwd", "/upload/", "/files"):
        assert _raw(server.url, "GET", path, headers=AUTH)[0] == 404, path


def test_oversize_is_413_from_content_length(server: RepositoryServer, tmp_path: Path) -> None:
    body = os.urandom((1 << 20) + 1)
    status, headers, raw = _raw(server.url, "PUT", f"/files/{_sha(body)}", body, AUTH)
    assert status == 413
    assert json.loads(raw)["error"] == "too_large"
    assert headers["X-Fedsm-Max-Size"] == str(1 << 20)
    assert _stored(tmp_path / "store") == []
    exact = body[: 1 << 20]
    assert _raw(server.url, "PUT", f"/files/{_sha(exact)}", exact, AUTH)[0] == 201


def test_oversize_is_refused_by_the_client_before_sending(
    repo: HttpRepository, tmp_path: Path
) -> None:
    src = tmp_path / "big"
    src.write_bytes(b"x" * ((1 << 20) + 10))
    with pytest.raises(FileTooLarge, match=str(1 << 20)):
        repo.upload_file(src)
    assert _stored(tmp_path / "store") == []


def test_store_refuses_more_bytes_than_max_size_while_reading(tmp_path: Path) -> None:
    store = DigestStore(tmp_path / "store")
    with pytest.raises(FileTooLarge):
        store.ingest(iter([b"a" * 600, b"b" * 600]), max_size=1000)
    assert _stored(store.root) == [] and list(store.tmp_dir.iterdir()) == []


def test_missing_length_is_411(server: RepositoryServer) -> None:
    status, _, _ = _raw(
        server.url,
        "PUT",
        f"/files/{_sha(b'')}",
        b"0\r\n\r\n",
        {**AUTH, "Transfer-Encoding": "chunked", "Content-Length": "0"},
    )
    assert status == 411
    body = b"abc"
    conn_status = _raw(server.url, "PUT", f"/files/{_sha(body)}", None, AUTH)[0]
    assert conn_status == 411


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"bearer {TOKEN}"},
        {"Authorization": "Bearer \u00e9t\u00e9"},
    ],
)
def test_missing_or_wrong_token_is_401(
    server: RepositoryServer, tmp_path: Path, headers: dict[str, str]
) -> None:
    body = b"payload"
    digest = _sha(body)
    headers = {k: v.encode().decode("latin-1") for k, v in headers.items()}
    for method, data in (("GET", None), ("HEAD", None), ("PUT", body)):
        status, got, _ = _raw(server.url, method, f"/files/{digest}", data, headers)
        assert status == 401, method
        assert got["WWW-Authenticate"].startswith("Bearer")
    # Even a bad id is 401 first: nothing is revealed without the token.
    assert _raw(server.url, "GET", "/files/../etc/passwd", headers=headers)[0] == 401
    assert _stored(tmp_path / "store") == []


def test_unauthorized_put_is_refused_before_the_body_with_expect_continue(
    server: RepositoryServer,
) -> None:
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            f"PUT /files/{'c' * 64} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        head = sock.recv(4096)  # answered without a single body byte sent
    assert head.startswith(b"HTTP/1.1 401")


def test_client_with_wrong_token_raises_repository_unauthorized(
    server: RepositoryServer, tmp_path: Path
) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"data")
    for token in (None, "wrong"):
        client = HttpRepository(server.url, token, backoff_s=0.01)
        with pytest.raises(RepositoryUnauthorized):
            client.upload_file(src)
        with pytest.raises(RepositoryUnauthorized):
            client.exists(_sha(b"data"))
    assert _stored(tmp_path / "store") == []


def test_upload_abandoned_midway_leaves_nothing(server: RepositoryServer, tmp_path: Path) -> None:
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            f"PUT /files/{'d' * 64} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
            + b"x" * 5000
        )
    # The server notices the closed connection; a request on a new connection then proves
    # the abandoned one has been handled.
    assert _raw(server.url, "HEAD", f"/files/{'d' * 64}", headers=AUTH)[0] == 404
    deadline = threading.Event()
    for _ in range(100):  # bounded: at most ~2 s for the handler thread to clean up
        if not list((tmp_path / "store" / ".tmp").iterdir()):
            break
        deadline.wait(0.02)
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []
    assert _stored(tmp_path / "store") == []


class _HalfThenWait:
    """A request body that sends half, waits at a barrier, then sends the rest."""

    def __init__(self, data: bytes, barrier: threading.Barrier) -> None:
        self.data = data
        self.barrier = barrier

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[bytes]:
        half = len(self.data) // 2
        yield self.data[:half]
        self.barrier.wait(timeout=10)
        yield self.data[half:]


def test_concurrent_uploads_of_same_content_both_succeed_and_leave_one_file(
    server: RepositoryServer, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    url = f"{server.url}/files/{_sha(data)}"
    barrier = threading.Barrier(2)
    statuses: list[int] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            response = requests.put(
                url, data=_HalfThenWait(data, barrier), headers=AUTH, timeout=20
            )
            statuses.append(response.status_code)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(statuses) in ([200, 201], [201, 201])
    assert _stored(tmp_path / "store") == [_sha(data)]
    assert (tmp_path / "store" / _sha(data)).read_bytes() == data
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


# -- client retries ---------------------------------------------------------------------------


class _Misbehaving(ThreadingHTTPServer):
    """Serves one file, misbehaving on each GET as ``modes`` says (then "ok" forever)."""

    daemon_threads = True

    def __init__(self, data: bytes, modes: list[str]) -> None:
        self.data = data
        self.modes = modes
        self.gets = 0
        super().__init__(("127.0.0.1", 0), _MisbehavingHandler)


class _MisbehavingHandler(BaseHTTPRequestHandler):
    server: _Misbehaving

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        mode = srv.modes[srv.gets] if srv.gets < len(srv.modes) else "ok"
        srv.gets += 1
        if mode == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.data
        if mode == "tamper":
            body = bytes([body[0] ^ 1]) + body[1:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(srv.data)))
        self.end_headers()
        if mode == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def misbehaving() -> Iterator[_Misbehaving]:
    srv = _Misbehaving(os.urandom(200_000), [])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def _client_for(srv: _Misbehaving, retries: int = 3) -> HttpRepository:
    return HttpRepository(
        f"http://127.0.0.1:{srv.server_address[1]}", retries=retries, backoff_s=0.01, timeout_s=5
    )


@pytest.mark.parametrize("first", ["truncate", "tamper", "503"])
def test_a_bad_download_is_retried_and_then_succeeds(
    misbehaving: _Misbehaving, tmp_path: Path, first: str
) -> None:
    misbehaving.modes = [first, first]
    client = _client_for(misbehaving)
    url = client.url_for(_sha(misbehaving.data))
    status, path = client.download_file(url, tmp_path / "out.bin")
    assert status == 200
    assert path.read_bytes() == misbehaving.data
    assert misbehaving.gets == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary left


@pytest.mark.parametrize("mode", ["truncate", "tamper"])
def test_a_download_that_stays_wrong_raises_digest_mismatch(
    misbehaving: _Misbehaving, tmp_path: Path, mode: str
) -> None:
    misbehaving.modes = [mode] * 10
    client = _client_for(misbehaving, retries=2)
    with pytest.raises(DigestMismatch, match="3 attempts"):
        client.download_file(client.url_for(_sha(misbehaving.data)), tmp_path / "out.bin")
    assert misbehaving.gets == 3
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_is_repository_unreachable_after_bounded_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    waits: list[float] = []
    monkeypatch.setattr(http_module.time, "sleep", waits.append)
    client = HttpRepository(f"http://127.0.0.1:{port}", retries=3, backoff_s=0.2, timeout_s=2)
    src = tmp_path / "f"
    src.write_bytes(b"data")
    with pytest.raises(RepositoryUnreachable, match="4 attempts"):
        client.upload_file(src)
    assert waits == [0.2, 0.4, 0.8]
    waits.clear()
    with pytest.raises(RepositoryUnreachable):
        client.download_file(client.url_for("e" * 64), tmp_path / "out")
    assert waits == [0.2, 0.4, 0.8]
    assert not (tmp_path / "out").exists()


# -- fedsm repo serve, memory -----------------------------------------------------------------


def test_parse_size_units() -> None:
    assert parse_size("1048576") == 1 << 20
    assert parse_size("512M") == 512 << 20
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("10k") == 10 << 10


def test_cli_refuses_a_bad_port_or_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["repo", "serve", "--root", str(tmp_path / "r"), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    assert cli_main(["repo", "serve", "--root", str(not_a_dir)]) == 2
    assert "repository directory" in capsys.readouterr().err


def _start_serve(root: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsm", "repo", "serve", "--root", str(root), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
    if not line.startswith("repository="):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"fedsm repo serve printed {line!r} first; stderr: {err}")
    return proc, line.strip().split("=", 1)[1]


def _write_big_file(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "big") + block[8:])


def test_server_streams_200_mb_in_constant_memory(tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    _write_big_file(src, 200)
    proc, url = _start_serve(tmp_path / "store", "--token", TOKEN, "--max-size", "1G")
    try:
        server = psutil.Process(proc.pid)
        baseline = server.memory_info().rss
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    samples.append(server.memory_info().rss)
                except psutil.Error:
                    return
                stop.wait(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            client = HttpRepository(url, TOKEN, timeout_s=60)
            up = client.upload_file(src)
            _, out = client.download_file(up["file"], tmp_path / "back.bin")
        finally:
            stop.set()
            sampler.join(10)
        assert up["size"] == 200 << 20
        assert (tmp_path / "store" / up["sha256"]).stat().st_size == 200 << 20
        assert out.stat().st_size == 200 << 20
        assert len(samples) > 10
        peak = max(samples)
        assert peak < 100 * 2**20, (
            f"server RSS peaked at {peak / 2**20:.1f} MiB (idle {baseline / 2**20:.1f} MiB)"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
    assert code == 0  # SIGTERM is a clean stop
