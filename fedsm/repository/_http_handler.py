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
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fedsm.digests import is_sha256
from fedsm.repository._files import CHUNK_SIZE
from fedsm.repository._store import DigestStore
from fedsm.repository.base import DigestMismatch, FileTooLarge

__all__ = ["RepositoryHTTPServer"]

_log = logging.getLogger(__name__)

FILES_PREFIX = "/files/"
#: Bytes of an unread request body drained before closing after an early refusal, so a
#: client that already sent a small body reads our answer instead of a connection reset.
_DRAIN_LIMIT = 1 << 20


class _BodyCutShort(Exception):
    """The client sent fewer bytes than its Content-Length (it went away or timed out)."""


class _Handler(BaseHTTPRequestHandler):
    """One connection; routes ``/files/<sha256>`` to the server's store."""

    protocol_version = "HTTP/1.1"  # keep-alive for the requests session on the client side
    server: RepositoryHTTPServer
    server_version = "fedsm-repository"
    sys_version = ""

    # -- plumbing -------------------------------------------------------------------------

    def setup(self) -> None:
        # StreamRequestHandler applies this as the socket timeout: a stalled client cannot
        # hold a thread forever.
        self.timeout = self.server.idle_timeout_s
        super().setup()

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
        try:
            return max(0, int(self.headers.get("Content-Length", "0")))
        except ValueError:
            return _DRAIN_LIMIT

    def _drain(self, n: int) -> None:
        self._body_consumed = True
        n = min(n, _DRAIN_LIMIT)
        try:
            while n > 0:
                chunk = self.rfile.read1(min(n, CHUNK_SIZE))
                if not chunk:
                    return
                n -= len(chunk)
        except OSError:
            return

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
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        """Refuse a PUT before its body is sent when the client asked (``Expect: 100-continue``)."""
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
                self.connection.sendfile(f, 0, size)

    def _check_put(self) -> tuple[str, int] | None:
        """Token, id and Content-Length of a PUT: ``(digest, length)``, or None once refused."""
        digest = self._digest_from_path()
        if digest is None:
            return None
        if "Transfer-Encoding" in self.headers or "Content-Length" not in self.headers:
            self._refuse(
                HTTPStatus.LENGTH_REQUIRED,
                "length_required",
                "send the file with a Content-Length header (chunked uploads are not accepted)",
            )
            return None
        raw_length = self.headers["Content-Length"].strip()
        if not raw_length.isdigit():
            self._refuse(HTTPStatus.BAD_REQUEST, "bad_length", "Content-Length is not a number")
            return None
        length = int(raw_length)
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
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store = store
        self.token = token
        self.max_size = max_size
        self.idle_timeout_s = idle_timeout_s
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-transfer is routine, not a server fault worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            _log.info("client %s went away: %s", client_address, exc)
            return
        _log.exception("unexpected error serving %s", client_address)
