"""Repository errors beyond the shared ones in :mod:`fedsm.repository.base`.

Hierarchy (all under :class:`fedsm.errors.FedsmError`)::

    RepositoryError                  (base)
    +-- RepositoryUnreachable        (base) connection refused/reset, timeouts, 5xx, after retries
    +-- FileNotInRepository          (base) no file with that digest
    +-- DigestMismatch               (base) bytes that do not hash to their digest
    +-- FileTooLarge                 (base) over the size limit
    +-- InvalidDigest                not 64 lowercase hex characters
    +-- InvalidRepositoryUrl         a URL that is malformed or belongs to another repository
    +-- RepositoryUnauthorized       the server refused the bearer token (HTTP 401)
    +-- RepositoryRejected           any other refusal by the server (HTTP 4xx)
"""

from __future__ import annotations

from fedsm.repository.base import RepositoryError

__all__ = [
    "InvalidDigest",
    "InvalidRepositoryUrl",
    "RepositoryRejected",
    "RepositoryUnauthorized",
]


class InvalidDigest(RepositoryError, ValueError):
    """A file id that is not a canonical sha256 hex digest."""


class InvalidRepositoryUrl(RepositoryError, ValueError):
    """A download URL that is malformed or does not belong to this repository."""


class RepositoryUnauthorized(RepositoryError, PermissionError):
    """The repository server refused the request's bearer token (missing or wrong)."""


class RepositoryRejected(RepositoryError):
    """The repository server refused the request for a reason given in the message."""
