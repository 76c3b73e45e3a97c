"""sha256, the one way fedsm names content: of bytes, of a file, and the digest's text form.

Every layer may import this module (it sits beside :mod:`fedsm.errors` at the root). The
pure functions, :func:`sha256_hex`, :func:`keyed_sha256_hex` and :func:`is_sha256`, do no
I/O, so the pure core may use them; :func:`sha256_file` reads a file and is for the layers
that do I/O.

A digest's text form is exactly 64 lowercase hex digits, the whole string (no trailing
newline, no upper case): the same rule as ``fedsm.core.fields.HEX64_RE`` used with
``fullmatch``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the module imports nothing that does I/O
    from os import PathLike

__all__ = ["CHUNK_SIZE", "is_sha256", "keyed_sha256_hex", "sha256_file", "sha256_hex"]

#: Bytes read per step by :func:`sha256_file`: constant memory whatever the file size.
CHUNK_SIZE = 1 << 20

_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes | str) -> str:
    """The sha256 (64 lowercase hex) of ``data``; a ``str`` is hashed as its UTF-8 bytes.

    Any bytes-like object (``bytearray``, ``memoryview``) is hashed as its bytes.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def keyed_sha256_hex(key: bytes, data: bytes | str) -> str:
    """HMAC-SHA256 of ``data`` under ``key`` (64 lowercase hex): a digest nobody without the
    key can predict, the same for the same inputs."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def sha256_file(path: str | PathLike[str], *, chunk_size: int = CHUNK_SIZE) -> str:
    """The sha256 (64 lowercase hex) of the file at ``path``, read ``chunk_size`` bytes at a time.

    Raises :class:`OSError` (e.g. :class:`FileNotFoundError`) if the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def is_sha256(value: Any) -> bool:
    """Whether ``value`` is a digest in canonical text form: a ``str`` of exactly 64 lowercase
    hex digits (the whole string; a ``str`` subclass is refused, as the wire codecs do)."""
    return type(value) is str and _HEX64.fullmatch(value) is not None
