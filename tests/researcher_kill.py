"""Run the demo in this process and SIGKILL it at a chosen point.

``python researcher_kill.py RUN_DIR POINT N ROUNDS NODES [BROKER_URL]`` (with a broker URL
the demo runs over MQTT, with its repository server and node processes). POINT is

``<EventType>`` (e.g. ``ReplyReceived``)
    kill right after the N-th event of that type is appended;
``record``
    kill right after the N-th appended record of any type;
``node-setup``
    kill right after the N-th ``fedsm node ...`` set-up step of node-1 finished (MQTT only:
    the other nodes' steps may be anywhere in theirs).

Records are counted in this process, whether appended one by one (``EventLog.append``) or
several in one write (``EventLog.append_all``, whose n events count n); when the N-th falls
inside an ``append_all``, the kill comes right after that call returns. The kill happens after
the record is durable, which is the worst case for a restore: the log knows something that
nothing after it has acted on.

Used by tests/test_job_restore.py, tests/test_demo.py and tests/test_kill_points.py, which
also use :func:`append_hook` to simulate the kill in-process (cheaper than a process each).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fedsm.log import writer as fedsm_log

__all__ = ["append_hook", "kill_after", "main"]

RECORD = "record"
NODE_SETUP = "node-setup"


@contextmanager
def append_hook(
    after: Callable[[Sequence[object]], None],
    *,
    before: Callable[[object, Sequence[object]], None] | None = None,
) -> Iterator[None]:
    """Call ``after(events)`` once each ``EventLog.append`` / ``append_all`` call has returned
    (its records durable), with the events it appended, and ``before(log, events)`` before
    the call. Nested calls (one method built on the other) are reported once, by the
    outermost call."""
    original_append = fedsm_log.EventLog.append
    original_append_all = fedsm_log.EventLog.append_all
    depth = threading.local()

    def wrap(original: Callable, events_of: Callable) -> Callable:
        def wrapper(self, events, *args, **kwargs):  # type: ignore[no-untyped-def]
            level = getattr(depth, "n", 0)
            if level == 0 and before is not None:
                before(self, events_of(events))
            depth.n = level + 1
            try:
                result = original(self, events, *args, **kwargs)
            finally:
                depth.n = level
            if level == 0:
                after(events_of(events))
            return result

        return wrapper

    fedsm_log.EventLog.append = wrap(original_append, lambda e: [e])  # type: ignore[method-assign]
    fedsm_log.EventLog.append_all = wrap(original_append_all, list)  # type: ignore[method-assign]
    try:
        yield
    finally:
        fedsm_log.EventLog.append = original_append  # type: ignore[method-assign]
        fedsm_log.EventLog.append_all = original_append_all  # type: ignore[method-assign]


def kill_after(point: str, nth: int) -> Callable[[Sequence[object]], bool]:
    """A counter for :func:`append_hook`: returns True once the ``nth`` record (``point`` is
    ``record``) or ``nth`` event of type ``point`` has been appended (and on every call
    after)."""
    seen = 0

    def reached(events: Sequence[object]) -> bool:
        nonlocal seen
        if point == RECORD:
            seen += len(events)
        else:
            seen += sum(type(e).__name__ == point for e in events)
        return seen >= nth

    return reached


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_node_setup(nth: int) -> None:
    from fedsm.cli.demo import mqtt

    original = mqtt._run_step
    lock = threading.Lock()
    done = 0

    def run_step(args, node_id):  # type: ignore[no-untyped-def]
        nonlocal done
        original(args, node_id)
        if node_id == "node-1":
            with lock:
                done += 1
                if done == nth:
                    _sigkill()

    mqtt._run_step = run_step  # type: ignore[assignment]


def main(argv: Sequence[str] | None = None) -> None:
    from fedsm.cli.demo.run import DemoConfig, run_demo

    run_dir, point, nth, rounds, nodes, *broker = sys.argv[1:] if argv is None else argv
    transport = {"transport": "mqtt", "broker": broker[0]} if broker else {}
    config = DemoConfig(nodes=int(nodes), rounds=int(rounds), seed=0, **transport)
    if point == NODE_SETUP:
        if not broker:
            raise SystemExit("node-setup kills need the MQTT demo (give a broker URL)")
        _kill_in_node_setup(int(nth))
        run_demo(Path(run_dir), config, say=lambda line: None)
        raise SystemExit(f"the run finished without a {nth}th set-up step of node-1")
    reached = kill_after(point, int(nth))

    def after(events: Sequence[object]) -> None:
        if reached(events):
            _sigkill()

    with append_hook(after):
        run_demo(Path(run_dir), config, say=lambda line: None)
    raise SystemExit(f"the run finished without reaching {point} #{nth}")


if __name__ == "__main__":
    main()
