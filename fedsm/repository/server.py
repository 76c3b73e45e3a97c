"""``RepositoryServer``: the HTTP file repository behind ``fedsm repo serve``.

The protocol and its request handler live in :mod:`fedsm.repository._http_handler`; this
module binds, runs and stops it.

Why the standard library's ``ThreadingHTTPServer``: the server needs four routes, streaming
in both directions and a thread per connection, which http.server does in a few dozen lines
with no dependency to install, audit or keep up to date in a hospital. It reads request
bodies only as we pull them (so constant memory comes from our 1 MiB loop) and lets us send
downloads with ``socket.sendfile`` (zero copy). Its limits (no TLS, no HTTP/2, a thread per
connection) are fine for a handful of nodes; put a TLS-terminating proxy in front for
deployment across sites. Hostile clients are bounded (see the handler module): strict
framing, at most ``max_connections`` threads, and timeouts on every read and every request.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from types import TracebackType

from fedsm.errors import ConfigurationError
from fedsm.repository._http_handler import RepositoryHTTPServer
from fedsm.repository._store import DigestStore

__all__ = ["RepositoryServer"]

_log = logging.getLogger(__name__)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class RepositoryServer:
    """An HTTP repository serving a content-addressed directory.

    Parameters
    ----------
    root
        The directory that holds the files (created if missing); the same layout as
        :class:`~fedsm.repository.LocalRepository`, so either can open it.
    host
        The address to bind; loopback by default. Binding another address without a token
        is allowed but logged as a warning.
    port
        The port; 0 picks a free one (read it back from :attr:`url`).
    token
        If set, every request must carry ``Authorization: Bearer <token>``.
    max_size
        The largest file accepted, in bytes (default 2 GiB).
    idle_timeout_s
        A kept-alive connection may wait this long between two requests.
    max_connections
        Connections served at once, one thread each (default 64). Past it a new connection
        gets a 503 (which :class:`~fedsm.repository.HttpRepository` retries) and is closed.
    read_timeout_s
        The longest wait for any one read or write on a connection (default 10 s).
    request_timeout_s
        A request's line and headers, and its body, must arrive within this many seconds
        of its start (of the accept for a connection's first request; default 30 s) ...
    min_upload_rate
        ... plus ``Content-Length / min_upload_rate`` seconds for an accepted upload, in
        bytes per second (default 64 KiB/s: a 2 GiB upload may take 9 hours). A request past
        its deadline gets a 408 and the connection is closed.

    Use :meth:`start` / :meth:`stop` or ``with RepositoryServer(...) as server:``.
    """

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_size: int = 2**31,
        idle_timeout_s: float = 60.0,
        max_connections: int = 64,
        read_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
        min_upload_rate: float = 64 * 1024,
    ) -> None:
        if max_size < 0:
            raise ConfigurationError(f"max_size must be >= 0 bytes, not {max_size}")
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be >= 1, not {max_connections}")
        for name, value in (
            ("idle_timeout_s", idle_timeout_s),
            ("read_timeout_s", read_timeout_s),
            ("request_timeout_s", request_timeout_s),
            ("min_upload_rate", min_upload_rate),
        ):
            if not value > 0:
                raise ConfigurationError(f"{name} must be > 0, not {value}")
        if token is not None and (not token or not token.isprintable() or " " in token):
            raise ConfigurationError("the token must be non-empty printable text without spaces")
        self.root = Path(root)
        self.host = host
        self.port = port
        self.token = token
        self.max_size = max_size
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.request_timeout_s = request_timeout_s
        self.min_upload_rate = min_upload_rate
        self._httpd: RepositoryHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8844`` (after :meth:`start`)."""
        if self._httpd is None:
            raise RuntimeError("the repository server is not started: call start() first")
        port = self._httpd.server_address[1]
        return f"http://{_url_host(self.host)}:{port}"

    def start(self) -> RepositoryServer:
        """Bind and serve in a background thread; return self."""
        if self._httpd is not None:
            raise RuntimeError("the repository server is already started")
        try:
            store = DigestStore(self.root)
            store.remove_stale_temporaries()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot use {self.root} as the repository directory: {exc.strerror or exc} "
                "(give --root a writable directory)"
            ) from exc
        try:
            self._httpd = RepositoryHTTPServer(
                (self.host, self.port),
                store,
                token=self.token,
                max_size=self.max_size,
                idle_timeout_s=self.idle_timeout_s,
                max_connections=self.max_connections,
                read_timeout_s=self.read_timeout_s,
                request_timeout_s=self.request_timeout_s,
                min_upload_rate=self.min_upload_rate,
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                "(pick another --port, or 0 for a free one)"
            ) from exc
        if self.token is None and self.host not in ("127.0.0.1", "::1", "localhost"):
            _log.warning(
                "repository on %s without a token: anyone who can reach it can read "
                "and write files; pass a token",
                self.host,
            )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="fedsm-repository", daemon=True
        )
        self._thread.start()
        _log.info(
            "repository serving %s at %s (at most %d connections, %g s per read, %g s per request)",
            store.root,
            self.url,
            self.max_connections,
            self.read_timeout_s,
            self.request_timeout_s,
        )
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting requests, close the socket and wait for the serving thread."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        address = httpd.server_address[:2]
        stopper = threading.Thread(target=httpd.shutdown, name="fedsm-repository-stop")
        stopper.start()
        # serve_forever notices shutdown only when its select() wakes (every 0.5 s): a
        # throwaway connection wakes it now, so stopping is immediate.
        try:
            socket.create_connection(address, timeout=1.0).close()
        except OSError:
            pass
        stopper.join(timeout_s)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> RepositoryServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
