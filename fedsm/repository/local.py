"""``LocalRepository``: a content-addressed directory, the embedded default.

URL form
--------
A file's URL is ``file://<absolute root>/<sha256>`` (the root percent-encoded as by
:meth:`pathlib.Path.as_uri`), which is also where the file actually lives, e.g.
``file:///var/fedsm/repo/9f86d0...``. :meth:`LocalRepository.download_file` accepts only
URLs of that form whose directory is this repository's root; anything else (an ``http://``
URL, another directory, a malformed id) raises :class:`InvalidRepositoryUrl`.

Every write is atomic (temporary file, fsync, rename) and every download re-hashes the stored
bytes, so a file corrupted or tampered with on disk is refused, never handed out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fedsm.digests import is_sha256
from fedsm.repository._files import (
    check_digest,
    commit_temp,
    copy_and_hash,
    resolve_destination,
)
from fedsm.repository._store import DigestStore
from fedsm.repository.base import DigestMismatch, FileNotInRepository, Repository, Uploaded
from fedsm.repository.errors import InvalidRepositoryUrl

__all__ = ["LocalRepository"]

_log = logging.getLogger(__name__)


class LocalRepository(Repository):
    """A repository in a local directory (shared file system or a single machine).

    Parameters
    ----------
    root
        The repository directory, created if missing.
    download_dir
        Where :meth:`download_file` puts relative file names (default: the current directory).
    """

    def __init__(self, root: str | Path, *, download_dir: str | Path | None = None) -> None:
        self._store = DigestStore(root)
        self.download_dir = Path(download_dir).expanduser().absolute() if download_dir else None

    @property
    def root(self) -> Path:
        """The repository's resolved absolute directory."""
        return self._store.root

    def __repr__(self) -> str:
        return f"LocalRepository({str(self.root)!r})"

    def url_for(self, digest: str) -> str:
        """``file://<root>/<digest>``: the URL of the file with this digest."""
        return f"{self.root.as_uri()}/{check_digest(digest)}"

    def upload_file(self, path: str | Path) -> Uploaded:
        """Copy the file at ``path`` into the repository (copied in the kernel, the copy hashed).

        Returns ``{"file": url, "sha256": digest, "size": n}``. Uploading the same content
        twice stores it once. Raises :class:`OSError` if ``path`` cannot be read.
        """
        stored = self._store.ingest_file(Path(path))
        _log.debug(
            "stored %s (%d bytes, %s) from %s",
            stored.sha256,
            stored.size,
            "new" if stored.created else "already present",
            path,
        )
        return {"file": self.url_for(stored.sha256), "sha256": stored.sha256, "size": stored.size}

    def digest_of_url(self, url: str) -> str:
        """The digest named by ``url`` if it is one of this repository's URLs.

        Raises :class:`InvalidRepositoryUrl` for another scheme, host or directory, or an id
        that is not a digest.
        """
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise InvalidRepositoryUrl(
                f"{url!r} is not a URL of the local repository at {self.root} "
                f"(expected {self.root.as_uri()}/<sha256>); open the repository it belongs to"
            )
        if parts.query or parts.fragment:
            raise InvalidRepositoryUrl(f"{url!r}: a repository URL has no query or fragment")
        path = Path(unquote(parts.path))
        if not is_sha256(path.name) or path.parent.resolve() != self.root:
            raise InvalidRepositoryUrl(
                f"{url!r} does not name a file of the local repository at {self.root} "
                f"(expected {self.root.as_uri()}/<sha256>)"
            )
        return path.name

    def download_file(self, url: str, filename: str | Path) -> tuple[int, Path]:
        """Copy the file at ``url`` to ``filename``, checking its digest; return ``(200, path)``.

        Relative ``filename`` values go into ``download_dir``. The destination is written
        atomically and only if the stored bytes hash to the digest in the URL; otherwise
        :class:`DigestMismatch` is raised and the destination is left untouched. Raises
        :class:`FileNotInRepository` for an unknown digest and :class:`InvalidRepositoryUrl`
        for a URL of another repository.
        """
        digest = self.digest_of_url(url)
        source = self._store.path_for(digest)
        dest = resolve_destination(filename, self.download_dir)
        try:
            tmp, actual, _ = copy_and_hash(source, dest.parent)
        except FileNotFoundError as exc:
            if exc.filename is not None and Path(exc.filename) == source:
                raise FileNotInRepository(
                    f"no file {digest} in the local repository at {self.root}"
                ) from exc
            raise
        try:
            if actual != digest:
                raise DigestMismatch(
                    f"the stored file {source} hashes to {actual}, not to {digest}: it was "
                    "corrupted or tampered with on disk; upload the original again"
                )
            commit_temp(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return 200, dest

    def exists(self, digest: str) -> bool:
        """Whether a file with this digest is stored (raises InvalidDigest for a bad id)."""
        return self._store.has(digest)
