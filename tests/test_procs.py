"""Child processes of the command line die with it, even when it is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PARENT = """
import sys, time
from fedsm.cli.procs import Child
child = Child(["repo", "serve", "--root", sys.argv[1], "--port", "0"], name="repo")
child.wait_for_line("repository=", 60)
print(child.proc.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by init) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_a_killed_parent_takes_its_children_with_it(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "repo")], stdout=subprocess.PIPE, text=True
    )
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        end = time.monotonic() + 15
        while _alive(child_pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _alive(child_pid), "the repository server outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if "child_pid" in locals() and _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_a_signal_arriving_inside_the_events_wait_still_sets_it() -> None:
    """The handler of `fedsm repo serve` and `fedsm node start` runs in the main thread,
    which may then hold the stop event's own lock (inside its wait): setting the event there
    would wait forever for that lock. Held here on purpose, in a process of its own."""
    script = """
import signal, threading
from fedsm.cli.procs import signal_setter
stop = threading.Event()
handler = signal_setter(stop)
with stop._cond:  # as inside stop.wait(), before it lets go of the lock
    handler(signal.SIGTERM, None)
print("set" if stop.wait(10) else "not set", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "set", out
