"""A fault-injecting file layer for tests: make chosen files of this process fail to be created.

A test cannot mount a small tmpfs to fill, so the disk fills by injection: while a
:class:`FaultyDisk` is installed, creating a file or a directory whose path matches one of its
rules raises ``OSError(ENOSPC)`` (or the errno given), as a full disk answers the first write.
The layer patches the three doors files of this process come through: ``os.open`` (tempfile,
the repository's temporary files, atomic JSON writes), ``builtins.open`` (``shutil.copyfile``)
and ``os.mkdir`` (``Path.mkdir``); reads and paths no rule matches pass through untouched.
sqlite writes from C and are never affected.

Usage::

    with FaultyDisk() as disk:
        disk.fill("params", lambda p: p.name.startswith(".params_out"))
        ...            # every write of that kind fails with ENOSPC
        disk.free("params")
        disk.hits["params"]   # how many writes failed
"""

from __future__ import annotations

import builtins
import errno
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FaultyDisk", "under"]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def under(root: Path, *, name_prefix: str = "") -> Callable[[Path], bool]:
    """A rule matching paths inside ``root`` (resolved) whose name starts with ``name_prefix``."""
    base = str(Path(root).resolve())

    def match(path: Path) -> bool:
        return str(path).startswith(base + os.sep) and path.name.startswith(name_prefix)

    return match


class FaultyDisk:
    """Rules (name -> path predicate and errno) checked on every file or directory creation."""

    def __init__(self) -> None:
        self._rules: dict[str, tuple[Callable[[Path], bool], int]] = {}
        self._lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self._saved: tuple[Any, Any, Any] | None = None

    def fill(self, name: str, match: Callable[[Path], bool], err: int = errno.ENOSPC) -> None:
        """From now on, creating a path ``match`` accepts fails with ``err``."""
        with self._lock:
            self._rules[name] = (match, err)

    def free(self, name: str | None = None) -> None:
        """Space is back: drop rule ``name`` (every rule if None)."""
        with self._lock:
            if name is None:
                self._rules.clear()
            else:
                self._rules.pop(name, None)

    def _check(self, path: Any) -> None:
        if isinstance(path, int) or not self._rules:
            return
        try:
            resolved = Path(os.fsdecode(path)).absolute()
        except (TypeError, ValueError):
            return
        with self._lock:
            for name, (match, err) in self._rules.items():
                if match(resolved):
                    self.hits[name] += 1
                    raise OSError(err, os.strerror(err), str(resolved))

    def __enter__(self) -> FaultyDisk:
        real_os_open, real_open, real_mkdir = os.open, builtins.open, os.mkdir
        self._saved = (real_os_open, real_open, real_mkdir)

        def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & _WRITE_FLAGS:
                self._check(path)
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if any(c in mode for c in "wax+"):
                self._check(file)
            return real_open(file, mode, *args, **kwargs)

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            self._check(path)
            return real_mkdir(path, *args, **kwargs)

        os.open, builtins.open, os.mkdir = os_open, open_, mkdir  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        os.open, builtins.open, os.mkdir = self._saved  # type: ignore[assignment]
        self._saved = None
