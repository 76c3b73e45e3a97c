"""Child processes of the command line (repository server, node processes): start one, wait
for the line that says it is ready (with a deadline), and stop it for sure."""

from __future__ import annotations

import functools
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from fedsm.errors import DeadlineExceeded

__all__ = ["Child", "free_port", "signal_setter"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies, so that a
    researcher killed with SIGKILL does not leave node or repository processes behind (they
    would hold the client ids and the port a resumed run needs).

    Linux sends it when the thread that started the child ends, so start long-lived children
    from a thread that lives as long as they should. A parent killed between the fork and the
    prctl is noticed here (the child has been re-parented): the child ends at once."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the children outlive a killed parent
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def signal_setter(event: threading.Event) -> Callable[[int, object], None]:
    """A signal handler that sets ``event`` (for SIGTERM/SIGINT).

    It sets it from a new thread: a handler runs in the main thread between two bytecodes,
    possibly while that thread holds the event's own lock (inside ``event.wait``), and
    setting it there would wait for that lock forever (a SIGTERM that never stops the
    process)."""

    def on_signal(signum: int, frame: object) -> None:
        threading.Thread(target=event.set, name="fedsm-signal", daemon=True).start()

    return on_signal


class Child:
    """A ``python -m fedsm ...`` child whose stdout lines are read by a thread into a queue.

    The child gets SIGTERM if this process dies (Linux), and :meth:`stop` ends it otherwise.
    It runs in a session of its own, so a Ctrl-C in the terminal reaches this process only:
    this process decides when and in what order its children stop (with SIGTERM).
    """

    def __init__(self, args: Sequence[str], *, name: str, env: dict[str, str] | None = None):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedsm", *args],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=(
                functools.partial(_die_with_parent, os.getpid())
                if sys.platform.startswith("linux")
                else None
            ),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        """The first stdout line starting with ``prefix``; raise if the child dies or times out."""
        import time

        end = time.monotonic() + timeout_s
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise DeadlineExceeded(
                    f"{self.name} exited with code {self.proc.wait()} before printing {prefix!r}"
                )
            if line.startswith(prefix):
                return line
        raise DeadlineExceeded(f"{self.name} did not print {prefix!r} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        return int(self.proc.returncode)
