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

``durable=False`` (simulations: the memory demo, benchmarks) drops the fsyncs of those writes
and keeps everything else (temporary file, digest, atomic rename, the check on download).
It also keeps the bytes of the files it stored or checked in memory
(:class:`~fedsm.repository._memo.VerifiedBytes`, bounded), served by :meth:`read_bytes` and
:meth:`download_file` while the stored file is unchanged on disk: the K simulated nodes of a
round read the same global parameters, and the researcher reads back what each node just
stored, without a read and a hash each time. What is served is always bytes that hashed to
the digest.
That is safe against the death of the process, as the simulated nodes' registries are
(``NodeDatabase(durable=False)``): a file renamed into place is whole in the kernel's page
cache whatever happens to the process, so a killed simulation resumes to the same digest.
Only a crash of the machine can lose such a file's bytes, and then the digest check refuses
it instead of handing out wrong parameters.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fedsm.digests import is_sha256, sha256_hex
from fedsm.repository._files import (
    check_digest,
    commit_temp,
    copy_and_hash,
    resolve_destination,
    write_file,
    write_temp,
)
from fedsm.repository._memo import VerifiedBytes
from fedsm.repository._store import DigestStore, Stored
from fedsm.repository.base import (
    DigestMismatch,
    FileNotInRepository,
    FileTooLarge,
    Repository,
    Uploaded,
)
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
    durable
        fsync every file written (uploads and downloads) and its directory; ``False`` for
        simulations (see the module docstring: safe against a killed process, not a crashed
        machine), which also keeps checked bytes in memory.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        download_dir: str | Path | None = None,
        durable: bool = True,
    ) -> None:
        self._store = DigestStore(root)
        self._root_text = str(self._store.root)
        self.download_dir = Path(download_dir).expanduser().absolute() if download_dir else None
        self.durable = durable
        self._memo = VerifiedBytes() if not durable else VerifiedBytes(max_bytes=0)

    @property
    def root(self) -> Path:
        """The repository's resolved absolute directory."""
        return self._store.root

    def __repr__(self) -> str:
        if not self.durable:
            return f"LocalRepository({str(self.root)!r}, durable=False)"
        return f"LocalRepository({str(self.root)!r})"

    def url_for(self, digest: str) -> str:
        """``file://<root>/<digest>``: the URL of the file with this digest."""
        return f"{self.root.as_uri()}/{check_digest(digest)}"

    def upload_file(self, path: str | Path) -> Uploaded:
        """Copy the file at ``path`` into the repository (copied in the kernel, the copy hashed).

        Returns ``{"file": url, "sha256": digest, "size": n}``. Uploading the same content
        twice stores it once. Raises :class:`OSError` if ``path`` cannot be read.
        """
        if self.durable:
            stored = self._store.ingest_file(Path(path))
        else:
            stored = self._ingest_unsynced(Path(path))
        _log.debug(
            "stored %s (%d bytes, %s) from %s",
            stored.sha256,
            stored.size,
            "new" if stored.created else "already present",
            path,
        )
        return {"file": self.url_for(stored.sha256), "sha256": stored.sha256, "size": stored.size}

    def _ingest_unsynced(self, source: Path) -> Stored:
        """``DigestStore.ingest_file`` without the fsyncs (``durable=False``)."""
        tmp, digest, size = copy_and_hash(source, self._store.tmp_dir)
        try:
            final = self._store.path_for(digest)
            existed = final.is_file()
            commit_temp(tmp, final, sync=False)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Stored(sha256=digest, size=size, created=not existed)

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
        # The URLs this repository hands out name its resolved root exactly: only another
        # spelling of a directory needs resolving (a system call per path component).
        parent = path.parent
        if not is_sha256(path.name) or (
            str(parent) != self._root_text and parent.resolve() != self.root
        ):
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
        # Whoever downloads keeps a copy from now on (the researcher its replies' parameters):
        # the bytes are served once more and not kept, so memory stays flat across rounds.
        kept = self._memo.get(digest, source, last=True)
        if kept is not None:
            # A copy of its own, never another name of the stored file: whoever rewrites that
            # file in place must not change what the caller keeps (its evidence).
            write_file(dest, kept, sync=self.durable)
            return 200, dest
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
            commit_temp(tmp, dest, sync=self.durable)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return 200, dest

    def exists(self, digest: str) -> bool:
        """Whether a file with this digest is stored (raises InvalidDigest for a bad id)."""
        return self._store.has(digest)

    def read_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """The bytes at ``url`` (one of this repository's), checked against their digest,
        without a file on the way; see :meth:`Repository.read_bytes`."""
        digest = self.digest_of_url(url)
        source = self._store.path_for(digest)
        kept = self._memo.get(digest, source)
        if kept is not None:
            if len(kept) > max_bytes:
                raise FileTooLarge(
                    f"file {digest} holds {len(kept)} bytes, over the limit of {max_bytes}"
                )
            return kept
        try:
            with source.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > max_bytes:
                    raise FileTooLarge(
                        f"file {digest} holds {size} bytes, over the limit of {max_bytes}"
                    )
                data = fh.read()
        except FileNotFoundError:
            raise FileNotInRepository(
                f"no file {digest} in the local repository at {self.root}"
            ) from None
        if sha256_hex(data) != digest:
            raise DigestMismatch(
                f"the stored file {source} hashes to another digest than {digest}: it was "
                "corrupted or tampered with on disk; upload the original again"
            )
        self._memo.put(digest, data, source)
        return data

    def upload_bytes(self, data: bytes) -> Uploaded:
        """Store ``data`` (written once, never copied); see :meth:`Repository.upload_bytes`."""
        digest = sha256_hex(data)
        final = self._store.path_for(digest)
        if self._memo.get(digest, final) is None:
            tmp = write_temp(self._store.tmp_dir, data)
            try:
                commit_temp(tmp, final, sync=self.durable)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._memo.put(digest, data, final)
        return {"file": self.url_for(digest), "sha256": digest, "size": len(data)}
