"""``HttpRepository``: the ``requests`` client of :class:`~fedsm.repository.RepositoryServer`.

URL form: ``<base>/files/<sha256>``, e.g. ``http://127.0.0.1:8844/files/9f86d0...``.
:meth:`HttpRepository.download_file` accepts only URLs under its own base (same scheme,
host, port and path prefix); anything else raises :class:`InvalidRepositoryUrl`, so a node
never fetches from a server it was not configured for.

Every call has a timeout (``timeout_s`` to connect and between two received bytes) and is
retried ``retries`` times, waiting ``backoff_s * 2**attempt`` (capped at 5 s), on connection
errors, timeouts, 5xx answers and downloads that arrive cut short or with the wrong digest.
4xx answers are not retried: they become typed errors at once. No ``requests`` exception
escapes this module.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests

from fedsm.digests import sha256_file, sha256_hex
from fedsm.errors import ConfigurationError
from fedsm.repository._files import (
    CHUNK_SIZE,
    HashedTempFile,
    check_digest,
    resolve_destination,
)
from fedsm.repository.base import (
    DigestMismatch,
    FileNotInRepository,
    FileTooLarge,
    Repository,
    RepositoryError,
    RepositoryUnreachable,
    Uploaded,
)
from fedsm.repository.errors import (
    InvalidRepositoryUrl,
    RepositoryRejected,
    RepositoryUnauthorized,
)

__all__ = ["HttpRepository"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: ``upload_bytes`` sends up to this many bytes without asking first whether the server
#: has them.
DIRECT_UPLOAD_BYTES = 256 * 1024
_MAX_BACKOFF_S = 5.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: A size header from the server: ASCII digits only (str.isdigit() also accepts "1\u00b2").
_SIZE_HEADER = re.compile(r"[0-9]{1,18}")


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix; ``final`` is raised if none does."""

    def __init__(self, final: RepositoryError) -> None:
        super().__init__(str(final))
        self.final = final


def _origin(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path without trailing slash) of an http(s) URL, for comparison."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(url)
    port = parts.port or _DEFAULT_PORTS[scheme]
    return scheme, parts.hostname.lower(), port, parts.path.rstrip("/")


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
        return str(body.get("message", body))
    except ValueError:
        return response.text[:200] or response.reason


class HttpRepository(Repository):
    """A repository reached over HTTP(S).

    Parameters
    ----------
    url
        The server's base URL, e.g. ``"http://127.0.0.1:8844"``.
    token
        The bearer token the server was started with, if any.
    timeout_s
        Connect timeout and longest silence while reading, for every request.
    retries
        Extra attempts after the first on failures that may be transient.
    backoff_s
        The first wait between attempts; it doubles each time.
    download_dir
        Where :meth:`download_file` puts relative file names (default: the current directory).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        download_dir: str | Path | None = None,
    ) -> None:
        try:
            _origin(url)
        except ValueError:
            raise ConfigurationError(
                f"{url!r} is not an http(s) repository URL (expected e.g. http://127.0.0.1:8844)"
            ) from None
        if urlsplit(url).query or urlsplit(url).fragment:
            raise ConfigurationError(f"{url!r}: a repository base URL has no query or fragment")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ConfigurationError("timeout_s must be > 0, retries and backoff_s >= 0")
        self.base_url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.download_dir = Path(download_dir).expanduser().absolute() if download_dir else None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HttpRepository({self.base_url!r})"

    # -- plumbing -------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        """One session (connection pool) per thread: requests sessions are not thread-safe."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # a proxy from the environment must not see the token
            if self.token is not None:
                session.headers["Authorization"] = f"Bearer {self.token}"
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close the connection pools (the object stays usable: new pools open on demand)."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    def __enter__(self) -> HttpRepository:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _with_retries(self, what: str, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt`` until it succeeds, raises a final error, or retries run out."""
        last: _Retryable | None = None
        for n in range(self.retries + 1):
            if n:
                delay = min(self.backoff_s * 2 ** (n - 1), _MAX_BACKOFF_S)
                _log.info("%s: attempt %d failed (%s); retrying in %.2f s", what, n, last, delay)
                time.sleep(delay)
            try:
                return attempt()
            except _Retryable as exc:
                last = exc
            except requests.RequestException as exc:
                # Connection refused/reset, timeouts, bodies cut short (ChunkedEncodingError).
                last = _Retryable(
                    RepositoryUnreachable(
                        f"{what}: cannot reach the repository at {self.base_url}: {exc}"
                    )
                )
        assert last is not None
        final = last.final
        raise type(final)(f"{final} (gave up after {self.retries + 1} attempts)") from final

    def _check_status(self, response: requests.Response, what: str) -> None:
        """Map an error status to a typed error (5xx retryable, 4xx final)."""
        status = response.status_code
        if status < 400:
            return
        message = f"{what}: the repository answered {status}: {_error_message(response)}"
        if status >= 500:
            raise _Retryable(RepositoryUnreachable(message))
        if status == 401:
            raise RepositoryUnauthorized(message + " (check the repository token)")
        if status == 404:
            raise FileNotInRepository(message)
        if status == 413:
            raise FileTooLarge(message)
        if status == 400 and "digest_mismatch" in response.text:
            raise DigestMismatch(message)
        raise RepositoryRejected(message)

    def _max_size_hint(self, response: requests.Response) -> int | None:
        raw = response.headers.get("X-Fedsm-Max-Size", "").strip()
        return int(raw) if _SIZE_HEADER.fullmatch(raw) else None

    # -- Repository -----------------------------------------------------------------------

    def url_for(self, digest: str) -> str:
        """``<base>/files/<digest>``: the URL of the file with this digest."""
        return f"{self.base_url}/files/{check_digest(digest)}"

    def digest_of_url(self, url: str) -> str:
        """The digest named by ``url`` if it is one of this repository's URLs.

        Raises :class:`InvalidRepositoryUrl` for another scheme, host, port or path prefix,
        or an id that is not a digest.
        """
        try:
            same_origin = _origin(url)[:3] == _origin(self.base_url)[:3]
        except ValueError:
            same_origin = False
        parts = urlsplit(url)
        prefix = _origin(self.base_url)[3] + "/files/"
        digest = parts.path[len(prefix) :] if parts.path.startswith(prefix) else ""
        if not same_origin or parts.query or parts.fragment:
            raise InvalidRepositoryUrl(
                f"{url!r} is not a URL of the repository at {self.base_url} "
                f"(expected {self.base_url}/files/<sha256>); open the repository it belongs to"
            )
        try:
            return check_digest(digest)
        except ValueError:
            raise InvalidRepositoryUrl(
                f"{url!r} does not name a file of {self.base_url}: "
                "expected /files/ followed by a 64-character lowercase sha256"
            ) from None

    def exists(self, digest: str) -> bool:
        """Whether the server stores a file with this sha256 (a HEAD request)."""
        url = self.url_for(digest)

        def attempt() -> bool:
            response = self._session().head(url, timeout=self.timeout_s)
            if response.status_code == 404:
                return False
            self._check_status(response, f"exists({digest})")
            return True

        return self._with_retries(f"exists({digest})", attempt)

    def upload_file(self, path: str | Path) -> Uploaded:
        """Upload the file at ``path``; return ``{"file": url, "sha256": hex, "size": n}``.

        The file is read once to hash it, then (unless the server already has that digest,
        found with a HEAD request) streamed in a PUT. Raises :class:`FileTooLarge` before
        sending anything if the server's advertised limit is smaller than the file,
        :class:`DigestMismatch` if the file changed between hashing and sending, and
        :class:`OSError` if ``path`` cannot be read.
        """
        path = Path(path)
        size = path.stat().st_size
        digest = sha256_file(path, chunk_size=CHUNK_SIZE)

        def put(send: Callable[[Any], None]) -> None:
            with open(path, "rb") as body:
                # requests sends an empty file object chunked, which the server refuses
                # (411): an empty file goes as an empty body with its Content-Length.
                send(body if size else b"")

        return self._upload(digest, size, f"upload of {path.name} ({digest})", put)

    def upload_bytes(self, data: bytes) -> Uploaded:
        """Upload ``data`` (one PUT of the bytes, unless the server has them); see
        :meth:`upload_file`."""
        digest = sha256_hex(data)
        # Bytes just made (a node's trained parameters) are new to the server: asking first
        # (HEAD) whether it has them costs a round trip that sending small ones barely
        # exceeds (the server stores a digest once, and answers 413 over its limit).
        return self._upload(
            digest,
            len(data),
            f"upload of {digest}",
            lambda send: send(data),
            probe_first=len(data) > DIRECT_UPLOAD_BYTES,
        )

    def _upload(
        self,
        digest: str,
        size: int,
        what: str,
        put_body: Callable[[Callable[[Any], None]], None],
        *,
        probe_first: bool = True,
    ) -> Uploaded:
        url = self.url_for(digest)
        result: Uploaded = {"file": url, "sha256": digest, "size": size}
        if not probe_first:
            return self._send(url, size, what, put_body, result)

        def probe() -> int | None:
            response = self._session().head(url, timeout=self.timeout_s)
            if response.status_code == 200:
                return -1
            if response.status_code != 404:
                self._check_status(response, what)
            return self._max_size_hint(response)

        hint = self._with_retries(what, probe)
        if hint == -1:
            _log.debug("%s: already stored, nothing sent", what)
            return result
        if hint is not None and size > hint:
            raise FileTooLarge(
                f"{what}: {size} bytes is over the repository's limit of {hint} bytes"
            )

        return self._send(url, size, what, put_body, result)

    def _send(
        self,
        url: str,
        size: int,
        what: str,
        put_body: Callable[[Callable[[Any], None]], None],
        result: Uploaded,
    ) -> Uploaded:
        def send(body: Any) -> None:
            response = self._session().put(
                url,
                data=body,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(size),
                },
                timeout=self.timeout_s,
            )
            self._check_status(response, what)

        self._with_retries(what, lambda: put_body(send))
        return result

    def read_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """The bytes at ``url``, checked against its digest, in memory (no file on the way);
        a file over ``max_bytes`` raises :class:`FileTooLarge` before more than that is read.
        Retries and errors as :meth:`download_file`."""
        digest = self.digest_of_url(url)
        what = f"download of {digest}"

        def attempt() -> bytes:
            with self._session().get(url, stream=True, timeout=self.timeout_s) as response:
                self._check_status(response, what)
                raw_length = response.headers.get("Content-Length", "")
                length = int(raw_length) if raw_length.isdigit() else None
                if length is not None and length > max_bytes:
                    raise FileTooLarge(f"{what}: {length} bytes, over the limit of {max_bytes}")
                data = bytearray()
                for chunk in response.iter_content(CHUNK_SIZE):
                    data += chunk
                    if len(data) > max_bytes:
                        raise FileTooLarge(f"{what}: more than {max_bytes} bytes")
            if (length is not None and len(data) != length) or sha256_hex(data) != digest:
                raise _Retryable(
                    DigestMismatch(
                        f"{what} from {self.base_url}: {len(data)} bytes that do not hash to "
                        f"{digest} (cut short, corrupted or tampered with)"
                    )
                )
            return bytes(data)

        return self._with_retries(what, self._cut_short_retried(what, attempt))

    def download_file(self, url: str, filename: str | Path) -> tuple[int, Path]:
        """Stream ``url`` into ``filename`` while hashing it; return ``(200, path)``.

        Relative ``filename`` values go into ``download_dir``. The destination appears only
        if the bytes hash to the digest in the URL (written atomically). A download cut short
        or with wrong bytes is retried, and raises :class:`DigestMismatch` if it stays wrong.
        Raises :class:`FileNotInRepository` (404), :class:`RepositoryUnauthorized` (401),
        :class:`InvalidRepositoryUrl` (another repository's URL) and
        :class:`RepositoryUnreachable` (no answer after retries).
        """
        digest = self.digest_of_url(url)
        dest = resolve_destination(filename, self.download_dir)
        what = f"download of {digest}"

        def attempt() -> tuple[int, Path]:
            with self._session().get(url, stream=True, timeout=self.timeout_s) as response:
                self._check_status(response, what)
                raw_length = response.headers.get("Content-Length", "")
                length = int(raw_length) if raw_length.isdigit() else None
                with HashedTempFile(dest.parent) as tmp:
                    for chunk in response.iter_content(CHUNK_SIZE):
                        tmp.write(chunk)
                    try:
                        tmp.verify(digest, length)
                    except DigestMismatch as exc:
                        raise _Retryable(
                            DigestMismatch(f"{what} from {self.base_url}: {exc}")
                        ) from exc
                    tmp.commit(dest)
            return 200, dest

        return self._with_retries(what, self._cut_short_retried(what, attempt))

    def _cut_short_retried(self, what: str, attempt: Callable[[], _T]) -> Callable[[], _T]:
        """``attempt`` with a download cut short (urllib3 noticed fewer bytes than
        Content-Length) turned into a retryable :class:`DigestMismatch`."""

        def mapped() -> _T:
            try:
                return attempt()
            except requests.exceptions.ChunkedEncodingError as exc:
                raise _Retryable(
                    DigestMismatch(
                        f"{what} from {self.base_url}: the transfer was cut short ({exc})"
                    )
                ) from exc

        return mapped
