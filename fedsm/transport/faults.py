"""Seeded fault injection for the in-memory bus: drop, duplicate, reorder, delay.

Tests use it to show that the researcher and nodes survive what a real network and broker do
(at-least-once delivery means duplicates; several senders mean reordering; queues mean delay).
Every random choice comes from one ``random.Random(seed)`` per sending bus, so a test that
sends the same messages in the same order sees the same faults every run.

Order of the stages for each message a bus sends: drop? -> duplicate? -> reorder window ->
delay -> delivery. Delays run on a single :class:`DelayTimer` thread owned by the broker.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Faults", "FaultStage", "DelayTimer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Faults:
    """What goes wrong with the messages one bus sends.

    Parameters
    ----------
    drop:
        Probability (0..1) that a message is lost.
    duplicate:
        Probability (0..1) that a message is delivered twice.
    reorder_window:
        Hold up to this many messages, then release them in a shuffled order (0 or 1: off).
        :meth:`MemoryBroker.flush` releases what is still held.
    delay_s:
        Deliver each message this many seconds later, on the broker's timer thread.
    seed:
        Seed of the random choices; same seed and same sends give the same faults.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    reorder_window: int = 0
    delay_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} must be a probability in [0, 1], got {value!r}")
        if self.reorder_window < 0:
            raise ValueError(f"Faults.reorder_window must be >= 0, got {self.reorder_window!r}")
        if self.delay_s < 0:
            raise ValueError(f"Faults.delay_s must be >= 0, got {self.delay_s!r}")

    @property
    def active(self) -> bool:
        """True when any fault is configured."""
        return bool(self.drop or self.duplicate or self.reorder_window > 1 or self.delay_s)


class DelayTimer:
    """One thread that runs callables at their due time (a heap and a condition, no polling)."""

    def __init__(self, name: str = "fedsm-memory-delay") -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the timer thread ``delay_s`` seconds from now."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the delay timer is closed")
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), fn))
            self._cond.notify()

    def run_all_now(self) -> None:
        """Run every pending callable at once, in due order, on the calling thread."""
        with self._cond:
            pending = [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]
        for fn in pending:
            _run_logged(fn)

    def pending(self) -> int:
        """How many callables are waiting."""
        with self._cond:
            return len(self._heap)

    def close(self) -> None:
        """Stop the thread; pending callables are discarded (logged)."""
        with self._cond:
            self._closed = True
            if self._heap:
                log.info("memory bus closed with %d delayed messages undelivered", len(self._heap))
            self._heap.clear()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(10.0)  # a delivery blocked in a handler must not hang close()
            if self._thread.is_alive():
                log.warning("delay timer still delivering after 10 s; not waiting")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                fn = heapq.heappop(self._heap)[2]
            _run_logged(fn)


def _run_logged(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.exception("delayed delivery failed")


class FaultStage:
    """Applies one bus's :class:`Faults` to its outgoing messages (thread-safe)."""

    def __init__(self, faults: Faults, timer: Callable[[], DelayTimer]) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        self._held: list[Callable[[], None]] = []
        self._timer = timer

    def submit(self, deliver: Callable[[], None]) -> None:
        """Pass one delivery through drop, duplicate, reorder and delay."""
        f = self.faults
        with self._lock:
            if f.drop and self._rng.random() < f.drop:
                log.debug("fault injection: message dropped")
                return
            copies = (
                [deliver, deliver]
                if f.duplicate and self._rng.random() < f.duplicate
                else [deliver]
            )
            if f.reorder_window > 1:
                self._held.extend(copies)
                if len(self._held) < f.reorder_window:
                    return
                copies, self._held = self._held, []
                self._rng.shuffle(copies)
        for fn in copies:
            self._after_reorder(fn)

    def flush(self) -> None:
        """Release messages held by the reorder window (shuffled)."""
        with self._lock:
            held, self._held = self._held, []
            self._rng.shuffle(held)
        for fn in held:
            self._after_reorder(fn)

    def _after_reorder(self, fn: Callable[[], None]) -> None:
        if self.faults.delay_s > 0:
            self._timer().call_later(self.faults.delay_s, fn)
        else:
            fn()
