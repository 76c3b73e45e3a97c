"""Content-addressed file repositories: where training plans and parameters travel.

* :class:`LocalRepository` - a directory (the embedded default);
* :class:`HttpRepository` - a ``requests`` client of :class:`RepositoryServer`
  (``fedsm repo serve``);
* :func:`open_repository` - picks one from a URL or a directory path.

Files are named by the sha256 of their bytes; every download is checked against it.
"""

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
    InvalidDigest,
    InvalidRepositoryUrl,
    RepositoryRejected,
    RepositoryUnauthorized,
)
from fedsm.repository.factory import open_repository
from fedsm.repository.http import HttpRepository
from fedsm.repository.local import LocalRepository
from fedsm.repository.server import RepositoryServer

__all__ = [
    "DigestMismatch",
    "FileNotInRepository",
    "FileTooLarge",
    "HttpRepository",
    "InvalidDigest",
    "InvalidRepositoryUrl",
    "LocalRepository",
    "Repository",
    "RepositoryError",
    "RepositoryRejected",
    "RepositoryServer",
    "RepositoryUnauthorized",
    "RepositoryUnreachable",
    "Uploaded",
    "open_repository",
]
