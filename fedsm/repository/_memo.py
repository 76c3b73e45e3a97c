"""Bytes a repository hashed itself, kept in memory by digest while their file is unchanged.

A process that simulates many nodes downloads the same global parameters once per node and
round, and the researcher reads back every node's upload right after it was stored: the
same few files, read and hashed again and again. :class:`VerifiedBytes` keeps the bytes of
such files beside the identity of the file they were stored in (device, inode, size,
modification time). An entry is served only while a ``stat`` of that file still shows the
same identity, so a file replaced or rewritten on disk is read and hashed again (and refused
if it no longer matches its digest); the bytes served are always the bytes that hashed to
the digest. Bounded in bytes (least recently used first out) and thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

__all__ = ["VerifiedBytes"]

#: A file's identity as far as the cache cares: (device, inode, size, mtime in ns).
FileIdentity = tuple[int, int, int, int]


def identity(path: Path) -> FileIdentity | None:
    """The identity of the file at ``path``, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class VerifiedBytes:
    """Digest -> bytes that hash to it, each tied to the file it was stored in.

    Parameters
    ----------
    max_bytes
        Total size kept (0 turns the cache off).
    max_item_bytes
        Larger files are never kept.
    """

    def __init__(self, max_bytes: int = 128 * 2**20, max_item_bytes: int = 48 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.max_item_bytes = min(max_item_bytes, max_bytes)
        self._items: OrderedDict[str, tuple[bytes, FileIdentity]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, digest: str, path: Path, *, last: bool = False) -> bytes | None:
        """The bytes of ``digest`` if kept and the file at ``path`` is still the one they
        were stored in; else None (a stale entry is dropped). ``last``: the caller keeps a
        copy from now on, so the entry is dropped once served."""
        with self._lock:
            item = self._items.get(digest)
        if item is None:
            return None
        data, ident = item
        current = identity(path) == ident
        if not current or last:
            self.drop(digest)
            return data if current else None
        with self._lock:
            if digest in self._items:
                self._items.move_to_end(digest)
        return data

    def put(self, digest: str, data: bytes, path: Path) -> None:
        """Keep ``data`` (which hashed to ``digest``), as stored in the file at ``path``."""
        if len(data) > self.max_item_bytes:
            return
        ident = identity(path)
        if ident is None or ident[2] != len(data):
            return
        with self._lock:
            old = self._items.pop(digest, None)
            if old is not None:
                self._size -= len(old[0])
            self._items[digest] = (data, ident)
            self._size += len(data)
            while self._size > self.max_bytes and self._items:
                _, (gone, _) = self._items.popitem(last=False)
                self._size -= len(gone)

    def drop(self, digest: str) -> None:
        """Forget ``digest``."""
        with self._lock:
            old = self._items.pop(digest, None)
            if old is not None:
                self._size -= len(old[0])

    @property
    def size(self) -> int:
        """Bytes kept now."""
        return self._size
