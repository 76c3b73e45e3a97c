"""What ``fedsm node start`` needs around a :class:`~fedsm.node.node.Node` to run as a service.

* :class:`NodeDirLock`: one running node per node directory. The lock is an ``flock`` on
  ``node.lock`` (released by the kernel when the process dies, so a crash never leaves a stale
  lock) and the file holds the holder's PID, which a second start names in its error.
* :func:`check_repository`: the repository answers (a lookup of a digest nobody stores) before
  the node says it is online, so a wrong URL or token is one clear error at start, not a
  failed training an hour later.
* :func:`watch_bus`: waits for a stop signal while watching the bus; a bus that stopped for
  good (another process took the connection) or was disconnected longer than the give-up
  time ends the wait, so the node exits non-zero instead of idling unreachable.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from fedsm.node.errors import NodeDirLocked, NodeStartFailed
from fedsm.repository.base import Repository, RepositoryError
from fedsm.transport.base import Bus

__all__ = ["LOCK_FILE", "NodeDirLock", "check_repository", "watch_bus"]

LOCK_FILE = "node.lock"
_PROBE_DIGEST = "0" * 64  # the sha256 of nothing anyone uploads


class NodeDirLock:
    """An exclusive, non-blocking lock on a node directory, held while the node runs.

    :meth:`acquire` raises :class:`NodeDirLocked` (naming the PID that holds it) at once
    when another process holds it. Use as a context manager.
    """

    def __init__(self, node_dir: str | Path) -> None:
        self.path = Path(node_dir) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The PID written by the process holding (or that last held) the lock, if any."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def acquire(self) -> NodeDirLock:
        import fcntl

        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = self.holder()
            for _ in range(20):  # the holder may not have written its PID yet
                if pid is not None:
                    break
                time.sleep(0.05)
                pid = self.holder()
            who = f"process {pid}" if pid is not None else "another process"
            raise NodeDirLocked(
                f"the node directory {self.path.parent} is in use: a node is already running "
                f"on it (PID {pid if pid is not None else 'unknown'}, holding {self.path}); "
                f"stop {who} first, or use another node directory",
                pid,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (the file stays: removing it would race a new holder)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> NodeDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_repository(repository: Repository, where: str) -> None:
    """Raise :class:`NodeStartFailed` unless ``repository`` answers a lookup.

    ``where`` names it in the message (its URL or directory). A local repository must also
    be writable: the node uploads its results there.
    """
    try:
        repository.exists(_PROBE_DIGEST)
    except (RepositoryError, OSError) as exc:
        raise NodeStartFailed(f"the repository at {where} does not answer: {exc}") from None
    root = getattr(repository, "root", None)
    if isinstance(root, Path) and not os.access(root, os.W_OK | os.X_OK):
        raise NodeStartFailed(
            f"the repository directory {root} is not writable by this user; the node "
            "uploads its results there"
        )


def watch_bus(
    bus: Bus, stop: threading.Event, *, give_up_after_s: float, poll_s: float = 1.0
) -> str | None:
    """Wait until ``stop`` is set (return None) or the bus has stopped (return why).

    The bus has stopped when it reports a fatal ``error`` (e.g. another process connected
    with the same id), or when it stayed disconnected for ``give_up_after_s`` seconds.
    Buses without ``connected`` / ``error`` (in-memory ones) are only waited on.
    """
    down_since: float | None = None
    while not stop.wait(poll_s):
        error = getattr(bus, "error", None)
        if error is not None:
            return f"the bus stopped: {error}"
        connected = getattr(bus, "connected", True)
        now = time.monotonic()
        if connected:
            down_since = None
        elif down_since is None:
            down_since = now
        elif now - down_since >= give_up_after_s:
            return (
                f"the broker connection was lost and did not come back within "
                f"{give_up_after_s:g} s (broker_give_up_s / --give-up-after)"
            )
    return None
