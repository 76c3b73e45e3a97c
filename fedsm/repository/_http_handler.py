"""The wire protocol of the HTTP repository: one request handler over a DigestStore.

Protocol (all on ``/files/<sha256>``, ids are 64 lowercase hex or the answer is 400)::

    PUT  /files/<sha256>   body = the file (Content-Length required, 411 without)
                           201 stored / 200 already stored, JSON {"sha256", "size"}
                           400 the body does not hash to <sha256> (nothing stored)
                           413 Content-Length or the bytes read exceed max_size
    GET  /files/<sha256>   200 the bytes (Content-Length, streamed with sendfile) / 404
    HEAD /files/<sha256>   200 with Content-Length / 404 (the client's ``exists``)

With a token, every request needs ``Authorization: Bearer <token>`` (compared in constant
time) or gets 401. Every response carries ``X-Fedsm-Max-Size`` so a client can refuse an
oversized upload before sending it. Errors are JSON ``{"error": code, "message": text}``.

The handler never turns a request path into a file path except through
:func:`~fedsm.digests.is_sha256`, and reads bodies 1 MiB at a time into a
:class:`~fedsm.repository._files.HashedTempFile`, so memory stays constant whatever the size.

Hostile clients (each limit is a :class:`RepositoryHTTPServer` argument):

* **Framing is strict.** ``Content-Length`` is 1 to 18 ASCII digits (no sign, space or
  other digits); repeated Content-Lengths must agree; ``Transfer-Encoding`` is refused
  (411 on a PUT, 400 otherwise); a GET or HEAD with a body, a folded or unparsable header
  line are refused. Such a request gets a 400 (or 411) with a one-line reason and the
  connection is closed at once: its body is never read or drained.
* **Connections are capped.** Past ``max_connections`` a new connection gets a 503 from
  the accepting thread and is closed; no thread is started for it.
* **Time is bounded.** Every read and write waits at most ``read_timeout_s``. A request's
  line, headers and body must all arrive within ``request_timeout_s`` of its start (of the
  accept for a connection's first request), plus ``Content-Length / min_upload_rate`` for
  an accepted body; then it gets a 408 and the connection is closed. Between two requests
  a kept-alive connection may idle ``idle_timeout_s``.
"""

from __future__ import annotations

import hmac
import http.client
import io
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fedsm.digests import is_sha256
from fedsm.repository._files import CHUNK_SIZE
from fedsm.repository._store import DigestStore
from fedsm.repository.base import DigestMismatch, FileTooLarge

__all__ = ["RepositoryHTTPServer"]

_log = logging.getLogger(__name__)

FILES_PREFIX = "/files/"
#: Bytes of an unread request body drained before closing after an early refusal of a
#: well-formed request, so a client that already sent a small body reads our answer
#: instead of a connection reset. A malformed request is never drained.
_DRAIN_LIMIT = 1 << 20
#: A Content-Length: ASCII digits only ([0-9] is not \d), at most 18 (below 2**63).
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
#: Bytes a request line and its headers may take together (http.server alone allows 100
#: header lines of 64 KiB each, 6.5 MB per connection).
_MAX_HEAD_BYTES = 64 * 1024
#: Seconds between two warnings about connections refused over the cap.
_BUSY_LOG_INTERVAL_S = 10.0


class _BodyCutShort(Exception):
    """The client sent fewer bytes than its Content-Length (it went away or timed out)."""


class _RequestTimedOut(TimeoutError):
    """A read waited longer than the read timeout, or the request passed its deadline."""


class _BadFraming(Exception):
    """The request's framing headers cannot be trusted; answered, then the connection closed."""

    def __init__(self, status: HTTPStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def body_length(method: str, headers: Message) -> int | None:
    """The body length a request declares (None: no Content-Length); _BadFraming if unsafe.

    Every rule here exists because a lenient reading lets a request's body be taken for the
    next request (smuggling) or makes the server wait for bytes that never come.
    """
    if headers.defects:
        raise _BadFraming(HTTPStatus.BAD_REQUEST, "bad_header", "a header line is malformed")
    if any("\r" in value or "\n" in value for value in headers.values()):
        raise _BadFraming(
            HTTPStatus.BAD_REQUEST, "bad_header", "folded header lines are not accepted"
        )
    if headers.get_all("Transfer-Encoding"):
        if method == "PUT":
            raise _BadFraming(
                HTTPStatus.LENGTH_REQUIRED,
                "length_required",
                "send the file with a Content-Length header (chunked uploads are not accepted)",
            )
        raise _BadFraming(
            HTTPStatus.BAD_REQUEST, "bad_framing", "Transfer-Encoding is not accepted"
        )
    lengths = set()
    for value in headers.get_all("Content-Length") or []:
        text = value.strip(" \t")
        if not _CONTENT_LENGTH.fullmatch(text):
            raise _BadFraming(
                HTTPStatus.BAD_REQUEST,
                "bad_length",
                "Content-Length must be 1 to 18 ASCII digits",
            )
        lengths.add(int(text))
    if len(lengths) > 1:
        raise _BadFraming(
            HTTPStatus.BAD_REQUEST, "bad_length", "the Content-Length headers disagree"
        )
    length = lengths.pop() if lengths else None
    if length and method != "PUT":
        raise _BadFraming(HTTPStatus.BAD_REQUEST, "bad_length", f"a {method} has no body")
    return length


class _DeadlineReader(io.RawIOBase):
    """The socket's reading side, with a timeout on each read and a deadline per request.

    Each ``readinto`` waits at most ``wait_s``, and never past ``deadline`` (a
    :func:`time.monotonic` time) when one is set. Running out raises
    :class:`_RequestTimedOut` and records why in ``timed_out``.
    """

    def __init__(self, sock: socket.socket, wait_s: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout: float | None = None
        self.wait_s = wait_s
        self.deadline: float | None = None
        self.timed_out: str | None = None
        #: Bytes the request head may still take; None once the head is read.
        self.head_budget: int | None = None

    def readable(self) -> bool:
        return True

    def set_timeout(self, seconds: float) -> None:
        """The socket's timeout (for reads and writes); skips the system call if unchanged."""
        if seconds != self._timeout:
            self._sock.settimeout(seconds)
            self._timeout = seconds

    def readinto(self, buffer: bytearray | memoryview) -> int:
        wait, reason = self.wait_s, f"no byte for {self.wait_s:g} s"
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.timed_out = "the request did not arrive in time"
                raise _RequestTimedOut(self.timed_out)
            if left < wait:
                wait, reason = left, "the request did not arrive in time"
        self.set_timeout(wait)
        try:
            n = self._sock.recv_into(buffer)
        except TimeoutError:
            self.timed_out = reason
            raise _RequestTimedOut(reason) from None
        if self.head_budget is not None:
            self.head_budget -= n
            if self.head_budget < 0:
                raise http.client.LineTooLong(f"request line and headers over {_MAX_HEAD_BYTES}")
        return n


class _Handler(BaseHTTPRequestHandler):
    """One connection; routes ``/files/<sha256>`` to the server's store."""

    protocol_version = "HTTP/1.1"  # keep-alive for the requests session on the client side
    # A response is written as headers, then body: with Nagle's algorithm on, the body waits
    # for the client's delayed ACK of the headers (40 ms on Linux) on every request.
    disable_nagle_algorithm = True
    server: RepositoryHTTPServer
    server_version = "fedsm-repository"
    sys_version = ""

    # -- plumbing -------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()  # no self.timeout: _DeadlineReader and flush_headers set it per call
        self.rfile.close()  # the plain reader: replaced by one with timeouts and a deadline
        self._reader = _DeadlineReader(self.connection, self.server.read_timeout_s)
        self._reader.deadline = time.monotonic() + self.server.request_timeout_s
        self.rfile = io.BufferedReader(self._reader)
        self._requests = 0

    def handle_one_request(self) -> None:
        reader, server = self._reader, self.server
        if self._requests:
            # Kept alive: the next request may take idle_timeout_s to begin, then its clock runs.
            reader.deadline, reader.wait_s = None, server.idle_timeout_s
            try:
                started = bool(self.rfile.peek(1))
            except OSError:  # including the idle timeout
                started = False
            if not started:
                self.close_connection = True
                return
            reader.deadline = time.monotonic() + server.request_timeout_s
            reader.wait_s = server.read_timeout_s
        self._requests += 1
        # What a refusal needs if the request line itself never arrives.
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.1"
        self._answered = False
        reader.timed_out = None
        reader.head_budget = _MAX_HEAD_BYTES
        try:
            super().handle_one_request()  # answers a timeout with nothing: we do, below
        except http.client.LineTooLong:  # raised here only while reading the request line
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request line too long")
            return
        if reader.timed_out is not None:
            self.close_connection = True
            _log.warning("dropped %s: %s", self.address_string(), reader.timed_out)
            if not self._answered:
                try:
                    self._send_json(
                        HTTPStatus.REQUEST_TIMEOUT,
                        {"error": "timeout", "message": reader.timed_out},
                        close=True,
                    )
                except OSError:
                    pass

    def flush_headers(self) -> None:
        # Writes (the headers, then a JSON body or sendfile) wait read_timeout_s per send.
        self._reader.set_timeout(self.server.read_timeout_s)
        super().flush_headers()

    def send_response(self, code: int, message: str | None = None) -> None:
        self._answered = True
        super().send_response(code, message)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, headers too long or too many,
        unknown method): a one-line JSON reason, then the connection is closed."""
        status = HTTPStatus(code)
        text = (message or status.phrase).splitlines()[0]
        if self.request_version == "HTTP/0.9":  # a line without a version: answer with a status
            self.request_version = "HTTP/1.1"
        _log.warning("refused %s: %d %s", self.address_string(), code, text)
        self._body_consumed = True  # never drain what we could not parse
        self._send_json(status, {"error": status.name.lower(), "message": text}, close=True)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: object) -> None:
        _log.info("%s %s", self.address_string(), format % args)

    def _send_json(
        self,
        status: HTTPStatus,
        body: dict[str, object],
        *,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Fedsm-Max-Size", str(self.server.max_size))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _refuse(
        self, status: HTTPStatus, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        """Answer an error; a request whose body was not read also closes the connection."""
        unread = self._unread_body()
        if unread:
            self._drain(unread)
        close = unread > 0 or self._awaiting_continue
        self._send_json(status, {"error": code, "message": message}, close=close, headers=headers)

    def _unread_body(self) -> int:
        if self.command != "PUT" or self._body_consumed or self._awaiting_continue:
            return 0
        return self._length or 0

    def _drain(self, n: int) -> None:
        self._body_consumed = True
        n = min(n, _DRAIN_LIMIT)
        self._extend_deadline(n)
        try:
            while n > 0:
                chunk = self.rfile.read1(min(n, CHUNK_SIZE))
                if not chunk:
                    return
                n -= len(chunk)
        except OSError:  # including a timeout: the answer goes out anyway, then we close
            self._reader.timed_out = None
            return

    def _extend_deadline(self, body_bytes: int) -> None:
        """Give the request time for ``body_bytes`` more at the server's minimum upload rate."""
        if self._reader.deadline is not None and body_bytes:
            self._reader.deadline += body_bytes / self.server.min_upload_rate

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {token}".encode())

    def _digest_from_path(self) -> str | None:
        """The id of ``/files/<id>``, after authorisation; None once an error is answered."""
        if not self._authorized():
            self._refuse(
                HTTPStatus.UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="fedsm-repository"'},
            )
            return None
        if not self.path.startswith(FILES_PREFIX):
            self._refuse(HTTPStatus.NOT_FOUND, "not_found", "only /files/<sha256> is served")
            return None
        digest = self.path[len(FILES_PREFIX) :]
        if not is_sha256(digest):
            self._refuse(
                HTTPStatus.BAD_REQUEST,
                "bad_id",
                "a file id is a sha256: exactly 64 lowercase hex characters",
            )
            return None
        return digest

    # -- per-request state ----------------------------------------------------------------

    def parse_request(self) -> bool:
        self._body_consumed = False
        self._awaiting_continue = False  # the client waits for "100 Continue" before its body
        self._put_target: tuple[str, int] | None = None
        self._framing_ok: bool | None = None  # not checked yet
        self._length: int | None = None
        parsed = super().parse_request()
        self._reader.head_budget = None  # the head is read: what follows is the body
        if parsed and self.request_version == "HTTP/0.9":
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not served")
            return False
        return parsed and self._check_framing()

    def _check_framing(self) -> bool:
        """Content-Length and Transfer-Encoding, before anything reads the body (once per
        request); False once a malformed request is answered (not drained, then closed)."""
        if self._framing_ok is None:
            try:
                self._length = body_length(self.command, self.headers)
                self._framing_ok = True
            except _BadFraming as exc:
                self._framing_ok = False
                self._body_consumed = True  # never drain a body whose length we cannot trust
                _log.warning(
                    "refused %s %s %s: %s (Content-Length %s, Transfer-Encoding %s)",
                    self.address_string(),
                    self.command,
                    self.path[:80],
                    exc.message,
                    ascii(self.headers.get_all("Content-Length"))[:80],
                    ascii(self.headers.get_all("Transfer-Encoding"))[:80],
                )
                self._send_json(exc.status, {"error": exc.code, "message": exc.message}, close=True)
        return self._framing_ok

    def handle_expect_100(self) -> bool:
        """Refuse a PUT before its body is sent when the client asked (``Expect: 100-continue``)."""
        if not self._check_framing():
            return False
        if self.command != "PUT":
            return super().handle_expect_100()
        self._awaiting_continue = True
        self._put_target = self._check_put()
        if self._put_target is None:
            return False
        self._awaiting_continue = False
        return super().handle_expect_100()

    # -- routes ---------------------------------------------------------------------------

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._get_or_head(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._get_or_head(send_body=True)

    def _get_or_head(self, *, send_body: bool) -> None:
        digest = self._digest_from_path()
        if digest is None:
            return
        path = self.server.store.path_for(digest)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            self._refuse(HTTPStatus.NOT_FOUND, "not_found", f"no file {digest} in the repository")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("ETag", f'"{digest}"')
            self.send_header("X-Fedsm-Max-Size", str(self.server.max_size))
            self.end_headers()
            if send_body:
                self.wfile.flush()
                # Zero-copy and constant memory; falls back to read/send where unsupported.
                # Each send waits at most read_timeout_s for the client to take more.
                self.connection.sendfile(f, 0, size)

    def _check_put(self) -> tuple[str, int] | None:
        """Token, id and Content-Length of a PUT: ``(digest, length)``, or None once refused."""
        digest = self._digest_from_path()
        if digest is None:
            return None
        if self._length is None:
            self._refuse(
                HTTPStatus.LENGTH_REQUIRED,
                "length_required",
                "send the file with a Content-Length header (chunked uploads are not accepted)",
            )
            return None
        length = self._length
        if length > self.server.max_size:
            self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too_large",
                f"{length} bytes is over this repository's limit of {self.server.max_size} bytes",
            )
            return None
        return digest, length

    def do_PUT(self) -> None:  # noqa: N802
        target = self._put_target or self._check_put()
        if target is None:
            return
        digest, length = target
        max_size = self.server.max_size
        self._body_consumed = True  # from here on we read the body (or close the connection)
        self._extend_deadline(length)
        try:
            stored = self.server.store.ingest(
                self._body(length),
                expected_digest=digest,
                expected_size=length,
                max_size=max_size,
            )
        except DigestMismatch as exc:
            self._send_json(
                HTTPStatus.BAD_REQUEST, {"error": "digest_mismatch", "message": str(exc)}
            )
            return
        except FileTooLarge as exc:  # cannot happen with a truthful Content-Length
            self._send_json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": "too_large", "message": str(exc)},
                close=True,
            )
            return
        except _RequestTimedOut:  # handle_one_request logs it and answers 408
            self.close_connection = True
            return
        except (_BodyCutShort, TimeoutError, ConnectionError) as exc:
            _log.warning("upload of %s abandoned by the client: %s", digest, exc)
            self.close_connection = True
            return
        except OSError as exc:
            _log.error("cannot store %s: %s", digest, exc)
            self._send_json(
                HTTPStatus.INSUFFICIENT_STORAGE,
                {"error": "storage", "message": f"the server cannot store it: {exc}"},
                close=True,
            )
            return
        status = HTTPStatus.CREATED if stored.created else HTTPStatus.OK
        self._send_json(status, {"sha256": stored.sha256, "size": stored.size})

    def _body(self, length: int) -> Iterator[bytes]:
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read1(min(remaining, CHUNK_SIZE))
            if not chunk:
                raise _BodyCutShort(f"{remaining} of {length} bytes never arrived")
            remaining -= len(chunk)
            yield chunk


class RepositoryHTTPServer(ThreadingHTTPServer):
    """http.server with a thread per connection, at most ``max_connections`` of them.

    The limits are described in the module docstring; all durations are in seconds and
    ``min_upload_rate`` is in bytes per second.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        store: DigestStore,
        *,
        token: str | None,
        max_size: int,
        idle_timeout_s: float,
        max_connections: int = 64,
        read_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
        min_upload_rate: float = 64 * 1024,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.token = token
        self.max_size = max_size
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.request_timeout_s = request_timeout_s
        self.min_upload_rate = min_upload_rate
        self._slots = threading.Lock()
        self._active = 0
        self._busy_refused = 0
        self._busy_logged_at = -_BUSY_LOG_INTERVAL_S
        super().__init__(address, _Handler)

    @property
    def active_connections(self) -> int:
        """Connections being served now (each holds one thread)."""
        return self._active

    def process_request(self, request: socket.socket, client_address: object) -> None:
        with self._slots:
            admitted = self._active < self.max_connections
            if admitted:
                self._active += 1
        if not admitted:
            self._refuse_busy(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._slots:
            self._active -= 1

    def _refuse_busy(self, request: socket.socket, client_address: object) -> None:
        """503 and close, from the accepting thread: never blocks, starts no thread."""
        body = json.dumps(
            {
                "error": "busy",
                "message": f"the repository is serving its maximum of {self.max_connections} "
                "connections; retry shortly",
            }
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\n"
            f"X-Fedsm-Max-Size: {self.max_size}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            request.setblocking(False)
            try:
                request.recv(1 << 16)  # what already arrived, so closing does not reset it
            except OSError:
                pass
            request.send(head + body)
        except OSError:
            pass
        self.shutdown_request(request)
        now = time.monotonic()
        with self._slots:
            self._busy_refused += 1
            if now - self._busy_logged_at < _BUSY_LOG_INTERVAL_S:
                return
            refused, self._busy_refused, self._busy_logged_at = self._busy_refused, 0, now
        _log.warning(
            "%d connection(s) refused with 503 (latest from %s): already serving %d, the "
            "maximum (max_connections)",
            refused,
            client_address,
            self.max_connections,
        )

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-transfer is routine, not a server fault worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            _log.info("client %s went away: %s", client_address, exc)
            return
        _log.exception("unexpected error serving %s", client_address)
