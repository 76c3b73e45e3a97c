"""The on-disk layout of a content-addressed repository, shared by the local backend and the server.

Layout of a root directory::

    <root>/<sha256>        one file per content, named by the sha256 of its bytes
    <root>/.tmp/           temporary files being written (never served)

Only names that pass :func:`check_digest` are ever joined to the root, so nothing a client
sends can name another path. Files appear under their final name only through an atomic
rename of a fully written, fsynced, digest-checked temporary file.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedsm.repository._files import HashedTempFile, check_digest, commit_temp, copy_and_hash

__all__ = ["DigestStore", "Stored"]

_log = logging.getLogger(__name__)

TMP_DIR_NAME = ".tmp"


@dataclass(frozen=True)
class Stored:
    """The outcome of :meth:`DigestStore.ingest`."""

    sha256: str
    size: int
    created: bool  # False when the content was already stored


class DigestStore:
    """A directory of files named by their sha256.

    Parameters
    ----------
    root
        The directory (created if missing). Its resolved absolute path is kept, so URLs built
        from it are stable whatever the current directory.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.root / TMP_DIR_NAME
        self.tmp_dir.mkdir(exist_ok=True)

    def path_for(self, digest: str) -> Path:
        """The file path of ``digest`` (validated; the file may not exist)."""
        return self.root / check_digest(digest)

    def has(self, digest: str) -> bool:
        """Whether a file with this digest is stored."""
        return self.path_for(digest).is_file()

    def ingest(
        self,
        chunks: Iterable[bytes],
        *,
        expected_digest: str | None = None,
        expected_size: int | None = None,
        max_size: int | None = None,
    ) -> Stored:
        """Stream ``chunks`` into the store and return what was stored.

        With ``expected_digest``, bytes that hash differently raise
        :class:`~fedsm.repository.base.DigestMismatch` and nothing is stored; over
        ``max_size`` bytes raise :class:`~fedsm.repository.base.FileTooLarge`. Exceptions
        raised by ``chunks`` itself propagate, also leaving nothing behind.
        """
        if expected_digest is not None:
            check_digest(expected_digest)
        with HashedTempFile(self.tmp_dir, max_size=max_size) as tmp:
            for chunk in chunks:
                tmp.write(chunk)
            digest = expected_digest or tmp.hexdigest
            tmp.verify(digest, expected_size)
            final = self.path_for(digest)
            existed = final.is_file()
            tmp.commit(final)
            return Stored(sha256=digest, size=tmp.size, created=not existed)

    def ingest_file(self, source: Path) -> Stored:
        """Store a copy of the local file ``source``: copied in the kernel, then hashed.

        Faster than :meth:`ingest` for local files; the digest is computed from the copy
        itself, so what is stored always matches its name.
        """
        tmp, digest, size = copy_and_hash(source, self.tmp_dir)
        try:
            final = self.path_for(digest)
            existed = final.is_file()
            commit_temp(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Stored(sha256=digest, size=size, created=not existed)

    def remove_stale_temporaries(self, older_than_s: float = 24 * 3600.0) -> int:
        """Delete temporary files left by crashed writers; return how many were removed.

        Only files older than ``older_than_s`` are touched, so uploads in progress are safe.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            _log.info("removed %d stale temporary file(s) from %s", removed, self.tmp_dir)
        return removed
