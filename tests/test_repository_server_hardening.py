"""The HTTP repository server against hostile clients: framing, connection cap, timeouts.

Every test starts its own RepositoryServer on 127.0.0.1 (a free port) with short limits and
talks to it over raw sockets, so the server sees bytes exactly as written. Every loop that
sends traffic is bounded and every socket is closed. "Fast" means well under the server's
read timeout: an answer that arrives first was not waiting to drain a body.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from email.message import Message
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from fedsm.cli import main as cli_main
from fedsm.errors import ConfigurationError
from fedsm.repository import HttpRepository, RepositoryServer
from fedsm.repository._http_handler import _BadFraming, body_length

TOKEN = "s3cret-token"
ID = "e" * 64


@contextmanager
def _server(tmp_path: Path, **limits: float) -> Iterator[RepositoryServer]:
    with RepositoryServer(tmp_path / "store", token=TOKEN, max_size=16 << 20, **limits) as srv:
        yield srv


def _address(server: RepositoryServer) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _head(method: str = "PUT", path: str = f"/files/{ID}", *lines: str) -> bytes:
    """A request head with the token; ``lines`` are raw header lines, sent as latin-1."""
    text = f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    return (text + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode("latin-1")


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, bool]:
    """Everything the server sends within ``limit_s``; (bytes, whether it closed)."""
    data = b""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:  # bounded by limit_s
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _exchange(server: RepositoryServer, head: bytes, limit_s: float = 3.0) -> tuple[bytes, float]:
    """Send ``head`` and no body; (the answer, seconds until the server closed)."""
    with socket.create_connection(_address(server), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(head)
        data, closed = _read_until_closed(sock, limit_s)
        elapsed = time.monotonic() - start
    assert closed, f"the server kept the connection open; it sent {data[:200]!r}"
    return data, elapsed


def _status_and_json(answer: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _no_traceback(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "\n" not in record.getMessage(), record.getMessage()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RepositoryServer]:
    # A 5 s read timeout: an answer that waited to drain a body would take 5 s.
    with _server(tmp_path, read_timeout_s=5.0, request_timeout_s=5.0) as srv:
        yield srv


# -- framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        ["Content-Length: 1\u00b2"],  # superscript two as one latin-1 byte: str.isdigit() is True
        ["Content-Length: 1\u00c2\u00b2"],  # the same, sent as UTF-8
        ["Content-Length: \u00d9\u00a3"],  # ARABIC-INDIC DIGIT THREE, sent as UTF-8
        ["Content-Length: -5"],
        ["Content-Length: +5"],
        ["Content-Length:  5 5"],
        ["Content-Length: 5,5"],
        ["Content-Length: 0x10"],
        ["Content-Length: "],
        ["Content-Length: " + "9" * 31],
        ["Content-Length: 5", "Content-Length: 6"],
    ],
    ids=[
        "superscript-latin1",
        "superscript-utf8",
        "arabic-digit",
        "minus",
        "plus",
        "space-inside",
        "list",
        "hex",
        "empty",
        "huge",
        "two-different",
    ],
)
def test_malformed_content_length_is_400_at_once_without_draining(
    server: RepositoryServer,
    tmp_path: Path,
    lines: list[str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    answer, elapsed = _exchange(server, _head("PUT", f"/files/{ID}", *lines))
    status, body = _status_and_json(answer)
    assert status == 400
    assert body["error"] == "bad_length"
    assert "\n" not in body["message"]
    assert elapsed < 1.0, f"answered after {elapsed:.2f} s: it waited for a body"
    assert b"Connection: close" in answer
    assert [p for p in (tmp_path / "store").iterdir() if p.is_file()] == []
    _no_traceback(caplog, capfd)
    assert any("refused" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@pytest.mark.parametrize(
    ("method", "lines", "status", "code"),
    [
        ("PUT", ["Transfer-Encoding: chunked"], 411, "length_required"),
        ("PUT", ["Transfer-Encoding: chunked", "Content-Length: 5"], 411, "length_required"),
        ("GET", ["Transfer-Encoding: chunked"], 400, "bad_framing"),
        ("GET", ["Content-Length: 5"], 400, "bad_length"),
        ("HEAD", ["Content-Length: 5"], 400, "bad_length"),
        ("PUT", ["Content-Length : 5"], 400, "bad_header"),
        ("PUT", ["X-A: 1", " Content-Length: 5"], 400, "bad_header"),
    ],
    ids=["chunked", "chunked-and-length", "get-chunked", "get-body", "head-body", "space", "fold"],
)
def test_other_unsafe_framing_is_refused_and_closed(
    server: RepositoryServer,
    method: str,
    lines: list[str],
    status: int,
    code: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    answer, elapsed = _exchange(server, _head(method, f"/files/{ID}", *lines))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == status
    if method != "HEAD":
        assert json.loads(body)["error"] == code
    assert elapsed < 1.0
    _no_traceback(caplog, capfd)


def test_identical_repeated_content_lengths_are_one_length(server: RepositoryServer) -> None:
    data = b"abc"
    digest = hashlib.sha256(data).hexdigest()
    head = _head("PUT", f"/files/{digest}", "Content-Length: 3", "Content-Length:  3 ")
    with socket.create_connection(_address(server), timeout=5) as sock:
        sock.sendall(head + data)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 201")


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /files/x\r\n\r\n",
        b"GET /files/x HTTP/9.9\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /x HTTP/1.1\r\n" + b"X-A: 1\r\n" * 3000 + b"\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    ],
    ids=["garbage", "http-0.9", "version", "long-header", "many-headers", "long-line"],
)
def test_http_servers_own_refusals_are_one_line_json_and_close(
    server: RepositoryServer,
    raw: bytes,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    with socket.create_connection(_address(server), timeout=5) as sock:
        try:
            sock.sendall(raw)
        except OSError:  # the server may answer and close before taking it all
            pass
        answer, closed = _read_until_closed(sock, 3.0)
    assert closed
    status, body = _status_and_json(answer)
    assert 400 <= status < 506
    assert "\n" not in body["message"]
    _no_traceback(caplog, capfd)


def test_body_length_rules() -> None:
    def headers(*pairs: tuple[str, str]) -> Message:
        message = Message()
        for name, value in pairs:
            message[name] = value
        return message

    assert body_length("PUT", headers()) is None
    assert body_length("PUT", headers(("Content-Length", "0"))) == 0
    assert body_length("PUT", headers(("Content-Length", "007"))) == 7
    assert body_length("GET", headers(("Content-Length", "0"))) == 0
    assert body_length("PUT", headers(("Content-Length", "9" * 18))) == int("9" * 18)
    for bad in ("9" * 19, "\u0663", "1\u00b2", "\uff15", "5 5", "-0", "5\r\n 5"):
        with pytest.raises(_BadFraming):
            body_length("PUT", headers(("Content-Length", bad)))


# -- connection cap ---------------------------------------------------------------------------


def test_connections_over_the_cap_get_503_without_a_thread(tmp_path: Path) -> None:
    cap = 8
    with _server(tmp_path, max_connections=cap, read_timeout_s=10.0, request_timeout_s=20.0) as srv:
        address = _address(srv)
        httpd = srv._httpd
        assert httpd is not None
        baseline = threading.active_count()
        with ExitStack() as stack:
            socks = []
            for _ in range(cap + 50):  # bounded: cap + 50 idle connections
                sock = stack.enter_context(socket.create_connection(address, timeout=5))
                socks.append(sock)
            for _ in range(100):  # up to 2 s for the server to accept them all
                if httpd.active_connections == cap:
                    break
                time.sleep(0.02)
            time.sleep(0.2)
            assert httpd.active_connections == cap
            assert threading.active_count() <= baseline + cap + 2
            # Those past the cap were answered 503 and closed by the accepting thread.
            answer, closed = _read_until_closed(socks[-1], 1.0)
            assert closed and answer.startswith(b"HTTP/1.1 503"), answer
            assert _status_and_json(answer)[1]["error"] == "busy"
            start = time.monotonic()
            with socket.create_connection(address, timeout=5) as extra:
                extra.sendall(_head("HEAD", f"/files/{ID}"))
                answer, closed = _read_until_closed(extra, 1.0)
            assert answer.startswith(b"HTTP/1.1 503") and closed
            assert time.monotonic() - start < 0.5
        for _ in range(250):  # up to 5 s for the handlers to see their connections closed
            if httpd.active_connections == 0:
                break
            time.sleep(0.02)
        assert httpd.active_connections == 0
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(_head("HEAD", f"/files/{ID}"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 404")


# -- timeouts ---------------------------------------------------------------------------------


def _dribble_until_closed(
    server: RepositoryServer, head: bytes, tail: bytes, every_s: float, limit_s: float
) -> tuple[bytes, float]:
    """Send ``head``, then ``tail`` a byte every ``every_s``; (answer, seconds to close)."""
    with socket.create_connection(_address(server), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(head)
        for i in range(len(tail)):  # bounded by the tail and by limit_s
            answer, closed = _read_until_closed(sock, every_s)
            if closed or time.monotonic() - start > limit_s:
                break
            try:
                sock.sendall(tail[i : i + 1])
            except OSError:
                closed = True
                break
        elapsed = time.monotonic() - start
    assert closed, f"still open after {elapsed:.1f} s"
    return answer, elapsed


def test_a_slow_body_is_cut_at_the_request_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with _server(tmp_path, read_timeout_s=1.0, request_timeout_s=2.0) as srv:
        head = _head("PUT", f"/files/{ID}", "Content-Length: 100")
        answer, elapsed = _dribble_until_closed(srv, head, b"x" * 100, 0.3, limit_s=8.0)
    assert 1.8 <= elapsed < 3.0, elapsed
    assert _status_and_json(answer) == (
        408,
        {"error": "timeout", "message": "the request did not arrive in time"},
    )
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []
    _no_traceback(caplog, capfd)


def test_slow_headers_are_cut_at_the_request_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with _server(tmp_path, read_timeout_s=1.0, request_timeout_s=2.0) as srv:
        head = f"PUT /files/{ID} HTTP/1.1\r\nHost: x\r\n".encode()
        answer, elapsed = _dribble_until_closed(srv, head, b"X-Slow: " + b"y" * 100, 0.3, 8.0)
    assert 1.8 <= elapsed < 3.0, elapsed
    assert answer.startswith(b"HTTP/1.1 408")
    _no_traceback(caplog, capfd)


def test_a_stalled_body_or_silent_connection_is_cut_at_the_read_timeout(tmp_path: Path) -> None:
    with _server(tmp_path, read_timeout_s=0.5, request_timeout_s=5.0) as srv:
        answer, elapsed = _exchange(srv, _head("PUT", f"/files/{ID}", "Content-Length: 100"))
        assert answer.startswith(b"HTTP/1.1 408") and 0.4 <= elapsed < 1.5, elapsed
        answer, elapsed = _exchange(srv, b"")
        assert answer.startswith(b"HTTP/1.1 408") and 0.4 <= elapsed < 1.5, elapsed


def test_a_kept_alive_connection_gets_a_fresh_deadline_per_request(tmp_path: Path) -> None:
    limits = {"read_timeout_s": 0.5, "request_timeout_s": 1.0, "idle_timeout_s": 3.0}
    with _server(tmp_path, **limits) as srv:
        with socket.create_connection(_address(srv), timeout=5) as sock:
            for _ in range(2):  # the pause is longer than a request may take, shorter than idle
                sock.sendall(_head("HEAD", f"/files/{ID}"))
                answer, closed = _read_until_closed(sock, 0.3)
                assert answer.startswith(b"HTTP/1.1 404") and not closed
                time.sleep(1.5)
            start = time.monotonic()
            answer, closed = _read_until_closed(sock, 5.0)
            assert closed and answer == b""  # idle for idle_timeout_s: closed without a word
            assert time.monotonic() - start < 3.0


def test_an_upload_longer_than_the_request_timeout_at_a_fair_rate_is_stored(
    tmp_path: Path,
) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    digest = hashlib.sha256(data).hexdigest()
    limits = {"read_timeout_s": 1.0, "request_timeout_s": 0.5, "min_upload_rate": 1 << 20}
    with _server(tmp_path, **limits) as srv:
        with socket.create_connection(_address(srv), timeout=5) as sock:
            start = time.monotonic()
            sock.sendall(_head("PUT", f"/files/{digest}", f"Content-Length: {len(data)}"))
            for i in range(0, len(data), 1 << 16):  # 32 pieces over about 1.3 s
                sock.sendall(data[i : i + (1 << 16)])
                time.sleep(0.04)
            answer, _ = _read_until_closed(sock, 2.0)
            assert time.monotonic() - start > 1.0  # longer than request_timeout_s alone
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    assert (tmp_path / "store" / digest).read_bytes() == data


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limits",
    [
        {"max_connections": 0},
        {"read_timeout_s": 0},
        {"request_timeout_s": -1},
        {"min_upload_rate": 0},
        {"idle_timeout_s": 0},
    ],
)
def test_limits_must_be_positive(tmp_path: Path, limits: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RepositoryServer(tmp_path, **limits)  # type: ignore[arg-type]


def test_cli_refuses_bad_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "r")
    assert cli_main(["repo", "serve", "--root", root, "--max-connections", "0"]) == 2
    assert "max_connections" in capsys.readouterr().err
    assert cli_main(["repo", "serve", "--root", root, "--read-timeout", "-1"]) == 2
    assert "read_timeout_s" in capsys.readouterr().err


# -- the client -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "hint"),
    [("1024", 1024), (" 7 ", 7), ("1\u00b2", None), ("-5", None), ("\u0663", None), ("", None)],
)
def test_the_client_reads_the_max_size_header_strictly(value: str, hint: int | None) -> None:
    response = requests.Response()
    response.headers["X-Fedsm-Max-Size"] = value
    with HttpRepository("http://127.0.0.1:9", None) as client:
        assert client._max_size_hint(response) == hint
