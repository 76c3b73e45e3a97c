"""The event log writer's file operations: the writer lock, whole writes, crash-safe moves.

Files only, no log format: :mod:`fedsm.log.writer` decides what to write and when; these helpers do
the system calls in the order that keeps a crash from losing or tearing anything.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fedsm.log.read import LogLocked

__all__ = ["fsync_dir", "move_aside", "take_lock", "write_all"]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray) -> None:
    # The views are released on return, so a bytearray buffer can be cleared right after.
    with memoryview(data) as view:
        done, size = 0, len(view)
        while done < size:
            done += os.write(fd, view[done:])


def take_lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            pid = int(text) if text.isdigit() else None
        finally:
            os.close(fd)
        raise LogLocked(path, pid) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def move_aside(path: Path, fd: int, data: bytes, offset: int, kind: str) -> Path:
    """Copy ``data[offset:]`` to a sidecar file, then truncate the log at ``offset``; fsync
    both and the directory, in that order, so a crash in between loses nothing."""
    sidecar = path.with_name(f"{path.name}.{kind}-{offset}")
    n = 0
    while sidecar.exists():
        n += 1
        sidecar = path.with_name(f"{path.name}.{kind}-{offset}.{n}")
    side_fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(side_fd, data[offset:])
        os.fsync(side_fd)
    finally:
        os.close(side_fd)
    fsync_dir(path.parent)
    os.ftruncate(fd, offset)
    os.fsync(fd)
    return sidecar
