"""``open_repository``: pick the repository backend from a URL or a directory.

This is how a node or a researcher turns one configuration string into a repository:
``http://`` / ``https://`` give an :class:`HttpRepository`, ``file://`` URLs and plain paths a
:class:`LocalRepository`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from fedsm.errors import ConfigurationError
from fedsm.repository.base import Repository
from fedsm.repository.http import HttpRepository
from fedsm.repository.local import LocalRepository

__all__ = ["open_repository"]


def open_repository(
    url_or_dir: str, token: str | None = None, *, download_dir: str | Path | None = None
) -> Repository:
    """Open the repository named by ``url_or_dir``.

    Parameters
    ----------
    url_or_dir
        ``http(s)://host:port`` for a repository server, ``file:///abs/dir`` or a plain
        directory path for a local one.
    token
        The server's bearer token; ignored by local repositories (a directory is protected
        by file permissions, not tokens).
    download_dir
        Where relative download file names go (see the backends).

    Raises :class:`~fedsm.errors.ConfigurationError` for any other URL scheme.
    """
    parts = urlsplit(url_or_dir)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return HttpRepository(url_or_dir, token, download_dir=download_dir)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigurationError(
                f"{url_or_dir!r}: file:// URLs must name a local path (file:///abs/dir)"
            )
        return LocalRepository(unquote(parts.path), download_dir=download_dir)
    if "://" in url_or_dir:
        raise ConfigurationError(
            f"{url_or_dir!r}: unsupported repository scheme {scheme!r} "
            "(use http://, https://, file:// or a directory path)"
        )
    return LocalRepository(url_or_dir, download_dir=download_dir)
