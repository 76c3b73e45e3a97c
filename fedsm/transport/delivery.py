"""Handing delivered messages to a participant's handlers, and tracking which nodes are online.

Both buses share these two pieces so they behave the same:

* :class:`HandlerSet` calls every subscribed handler with each delivered message. Messages
  that arrive before the first :meth:`~HandlerSet.add` are kept (bounded) and handed over on
  subscription, so a participant that connects and then subscribes loses nothing. A handler
  that raises is logged; it never breaks delivery to the other handlers or the sender.
* :func:`check_request` / :func:`check_reply` refuse misaddressed outgoing messages.
* :class:`NodeLiveness` is the researcher's view of node status ("online"/"offline"), with
  a bounded wait for a set of nodes to come online and status-change callbacks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from fedsm.core.messages import BROADCAST, Message, Reply, Request
from fedsm.errors import DeadlineExceeded
from fedsm.transport.base import Handler, TransportError

__all__ = [
    "HandlerSet",
    "LivenessQueries",
    "NodeLiveness",
    "StatusHandler",
    "check_request",
    "check_reply",
]

log = logging.getLogger(__name__)

#: Called as ``handler(node_id, online)`` when a node's status changes.
StatusHandler = Callable[[str, bool], None]


class HandlerSet:
    """The handlers of one participant; buffers up to ``max_early`` messages until one exists."""

    def __init__(self, owner: str, *, max_early: int = 10_000) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._handlers: list[Handler] = []
        self._early: deque[Message] = deque()
        self._max_early = max_early

    def add(self, handler: Handler) -> None:
        """Subscribe ``handler``; the first subscriber also receives the buffered messages."""
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        with self._lock:
            self._handlers.append(handler)
            early, self._early = list(self._early), deque()
        for message in early:
            self._call(handler, message)

    def deliver(self, message: Message) -> None:
        """Call every handler with ``message`` (or buffer it while there is none)."""
        with self._lock:
            handlers = list(self._handlers)
            if not handlers:
                if len(self._early) >= self._max_early:
                    dropped = self._early.popleft()
                    log.warning(
                        "%s: no handler subscribed and %d messages buffered; dropping the oldest "
                        "(%s %s)",
                        self._owner,
                        self._max_early,
                        dropped.command,
                        dropped.request_id,
                    )
                self._early.append(message)
                return
        for handler in handlers:
            self._call(handler, message)

    def _call(self, handler: Handler, message: Message) -> None:
        try:
            handler(message)
        except Exception:  # a handler bug must not stop delivery to anyone else
            log.exception(
                "%s: handler %r raised on %s %s",
                self._owner,
                handler,
                message.command,
                message.request_id,
            )


class NodeLiveness:
    """Which nodes are known, and which of them are online (thread-safe)."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._cond = threading.Condition()
        self._status: dict[str, bool] = {}
        self._callbacks: list[StatusHandler] = []

    def set(self, node_id: str, online: bool) -> None:
        """Record a status; callbacks run only when it changes."""
        with self._cond:
            changed = self._status.get(node_id) is not online
            self._status[node_id] = online
            callbacks = list(self._callbacks) if changed else []
            self._cond.notify_all()
        if changed:
            log.info("%s: node %s is %s", self._owner, node_id, "online" if online else "offline")
        for callback in callbacks:
            try:
                callback(node_id, online)
            except Exception:
                log.exception("%s: status handler %r raised", self._owner, callback)

    def add_callback(self, callback: StatusHandler) -> None:
        """Call ``callback(node_id, online)`` on every later status change."""
        with self._cond:
            self._callbacks.append(callback)

    def online(self) -> frozenset[str]:
        """Nodes whose last status is online."""
        with self._cond:
            return frozenset(n for n, up in self._status.items() if up)

    def offline(self) -> frozenset[str]:
        """Nodes seen before whose last status is offline."""
        with self._cond:
            return frozenset(n for n, up in self._status.items() if not up)

    def wait(self, node_ids: Iterable[str], online: bool, timeout_s: float) -> None:
        """Block until all of ``node_ids`` have status ``online``; raise after ``timeout_s``."""
        wanted = set(node_ids)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                missing = {n for n in wanted if self._status.get(n, False) is not online}
                if not missing:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    state = "online" if online else "offline"
                    raise DeadlineExceeded(
                        f"{self._owner}: nodes {sorted(missing)} not {state} after "
                        f"{timeout_s:g} s; "
                        f"online now: {sorted(self._online_unlocked())}"
                    )
                self._cond.wait(remaining)

    def _online_unlocked(self) -> frozenset[str]:
        return frozenset(n for n, up in self._status.items() if up)


def check_request(request: Request, node_id: str) -> None:
    """Refuse a non-request, or one whose ``node_id`` is not where it is being sent."""
    if not isinstance(request, Request):
        raise TypeError(f"expected a protocol Request, got {type(request).__name__}")
    if request.node_id != node_id:
        target = "broadcast" if node_id == BROADCAST else f"send to {node_id!r}"
        raise TransportError(
            f"{request.command} request {request.request_id} has node_id={request.node_id!r} "
            f"but was passed to {target}; build it with node_id={node_id!r}"
        )


def check_reply(reply: Reply, node_id: str) -> None:
    """Refuse a non-reply, or one that claims to come from another node."""
    if not isinstance(reply, Reply):
        raise TypeError(f"expected a protocol Reply, got {type(reply).__name__}")
    if reply.node_id != node_id:
        raise TransportError(
            f"node {node_id!r} cannot send a reply whose node_id is {reply.node_id!r}"
        )


class LivenessQueries:
    """The researcher's liveness questions, answered the same way by every bus from its
    ``_liveness`` (a :class:`NodeLiveness` fed by the transport's own status signals)."""

    _liveness: NodeLiveness

    def online_nodes(self) -> frozenset[str]:
        """Researcher: nodes online now. Always empty for a node."""
        return self._liveness.online()

    def offline_nodes(self) -> frozenset[str]:
        """Researcher: nodes seen before whose last known status is offline."""
        return self._liveness.offline()

    def on_status(self, handler: StatusHandler) -> None:
        """Researcher: call ``handler(node_id, online)`` when a node comes or goes."""
        self._liveness.add_callback(handler)

    def wait_online(self, node_ids: Iterable[str], timeout_s: float = 10.0) -> None:
        """Researcher: block until every node in ``node_ids`` is online, or raise
        :class:`~fedsm.errors.DeadlineExceeded` naming the missing ones after ``timeout_s``."""
        self._liveness.wait(node_ids, True, timeout_s)
