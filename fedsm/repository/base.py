"""The file repository interface: a content-addressed store of plans and parameters.

A file's id is the sha256 of its bytes. ``upload_file`` returns the URL to hand to others
and the digest; ``download_file`` refuses (raises :class:`DigestMismatch`) a file whose bytes
do not hash to the digest in its URL, so a tampered or cut-short file is never used.
"""

from __future__ import annotations

import abc
import tempfile
from pathlib import Path
from typing import TypedDict

from fedsm.errors import FedsmError

__all__ = [
    "Repository",
    "Uploaded",
    "RepositoryError",
    "RepositoryUnreachable",
    "FileNotInRepository",
    "DigestMismatch",
    "FileTooLarge",
]


class Uploaded(TypedDict):
    """What an upload returns: ``file`` is the download URL (the seed's ``['file']``)."""

    file: str
    sha256: str
    size: int


class RepositoryError(FedsmError):
    """Base class of repository failures."""


class RepositoryUnreachable(RepositoryError, ConnectionError):
    """The repository could not be reached (after retries)."""


class FileNotInRepository(RepositoryError, FileNotFoundError):
    """No file with this digest in the repository."""


class DigestMismatch(RepositoryError, ValueError):
    """Bytes that do not hash to the digest they were sent or stored under."""


class FileTooLarge(RepositoryError, ValueError):
    """A file over the repository's size limit."""


class Repository(abc.ABC):
    """Upload and download files by content digest."""

    @abc.abstractmethod
    def upload_file(self, path: str | Path) -> Uploaded:
        """Store the file at ``path``; return its URL and sha256. Idempotent by content."""

    @abc.abstractmethod
    def download_file(self, url: str, filename: str | Path) -> tuple[int, Path]:
        """Fetch ``url`` into ``filename`` after checking its digest; return (status, path).

        ``status`` is 200 on success (the seed's convention); failures raise.
        """

    @abc.abstractmethod
    def exists(self, digest: str) -> bool:
        """Whether a file with this sha256 is stored."""

    @abc.abstractmethod
    def url_for(self, digest: str) -> str:
        """The download URL of the file with this digest (whether or not it exists)."""

    @abc.abstractmethod
    def digest_of_url(self, url: str) -> str:
        """The digest a URL of this repository names (raises for a URL that is not one)."""

    def read_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """The bytes at ``url``, checked against the digest it names, held in memory.

        Raises :class:`FileTooLarge` for a file over ``max_bytes``, and whatever
        :meth:`download_file` raises. This default downloads into a temporary directory
        and reads the file back; a repository that can do better (no file on the way)
        overrides it.
        """
        with tempfile.TemporaryDirectory(prefix="fedsm-read-") as tmp:
            _, path = self.download_file(url, Path(tmp) / "file")
            size = path.stat().st_size
            if size > max_bytes:
                raise FileTooLarge(f"{url} holds {size} bytes, over the limit of {max_bytes}")
            return path.read_bytes()

    def upload_bytes(self, data: bytes) -> Uploaded:
        """Store ``data``; return its URL and sha256 (as :meth:`upload_file`). This default
        writes a temporary file and uploads it; a repository that can store bytes directly
        overrides it."""
        with tempfile.TemporaryDirectory(prefix="fedsm-upload-") as tmp:
            path = Path(tmp) / "file"
            path.write_bytes(data)
            return self.upload_file(path)
