"""The receiving side of :class:`~fedsm.transport.mqtt.MqttBus`, and its flapping detector.

:class:`Inbound` owns the dispatch thread. paho's ``on_message`` only puts ``(topic,
payload)`` on its queue (never block paho's network thread); the dispatch thread decodes,
checks that the message belongs on the topic it came on, and calls the handlers. What fails a
check is logged and dropped:

* bytes that do not decode (:class:`~fedsm.core.protocol.MessageDecodeError`);
* a request on a node's topic addressed to another node, or a reply on a request topic;
* a reply whose ``node_id`` is not the topic's node segment (the segment is what the broker's
  ACL vouches for) or whose ``researcher_id`` is not this researcher.

:class:`FlapDetector` recognises two processes that share one client id: each connect takes
the session from the other, so connections keep dying right after they are made.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Any

from fedsm.core.messages import BROADCAST, Message, Reply, Request
from fedsm.core.protocol import decode
from fedsm.core.protocol_errors import MessageDecodeError
from fedsm.transport.delivery import HandlerSet, NodeLiveness
from fedsm.transport.topics import NODE, RESEARCHER, STATUS_OFFLINE, STATUS_ONLINE, Topics

__all__ = ["Inbound", "FlapDetector"]

log = logging.getLogger(__name__)

_STOP = object()
_SESSION_TAKEN_OVER = 142  # MQTT 5 reason code 0x8E
_FLAP_UPTIME_S = 5.0  # a connection lost sooner than this counts towards the flapping check


class Inbound:
    """Queue + dispatch thread that validates incoming messages and hands them to handlers."""

    def __init__(
        self,
        participant_id: str,
        role: str,
        topics: Topics,
        handlers: HandlerSet,
        liveness: NodeLiveness,
        *,
        max_message_bytes: int,
        where: str,
        thread_name: str,
    ) -> None:
        self._me = participant_id
        self._role = role
        self._topics = topics
        self._handlers = handlers
        self._liveness = liveness
        self._max_bytes = max_message_bytes
        self._where = where
        self._queue: queue.Queue[Any] = queue.Queue()  # unbounded: paho's thread must not block
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def put(self, topic: str, payload: bytes) -> None:
        """Called on paho's network thread: enqueue only."""
        self._queue.put((topic, payload))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then end the thread (no join when called from it).

        A handler still blocked after ``timeout_s`` is left behind (daemon thread), logged.
        """
        self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("message dispatch still busy after %.0f s; not waiting", timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self.dispatch(*item)
            except Exception:
                log.exception("%s: failed to dispatch a message on %s", self._where, item[0])

    def dispatch(self, topic: str, payload: bytes) -> None:
        """Validate one incoming message and deliver it (or log and drop it)."""
        parts = self._topics.parse(topic)
        if parts is None:
            log.warning("%s: dropped a message on unexpected topic %s", self._where, topic)
            return
        kind = parts[0]
        if kind == "status":
            if self._role == RESEARCHER:
                self._status(parts[1], payload)
            return
        try:
            message = decode(payload, max_bytes=self._max_bytes)
        except MessageDecodeError as exc:
            log.warning("%s: dropped an undecodable message on %s: %s", self._where, topic, exc)
            return
        if self._accepts(kind, parts, message):
            self._handlers.deliver(message)
        else:
            log.warning(
                "%s: dropped a %s (node_id=%s, researcher_id=%s) that does not belong on topic %s",
                self._where,
                message.command,
                message.node_id,
                message.researcher_id,
                topic,
            )

    def _accepts(self, kind: str, parts: tuple[str, ...], message: Message) -> bool:
        me = self._me
        if self._role == NODE:
            if not isinstance(message, Request):
                return False
            if kind == "req":
                return parts[1] == me and message.node_id == me
            return kind == "broadcast" and message.node_id == BROADCAST
        # A reply's sender is the topic's node segment, which the broker's ACL vouches for.
        return (
            kind == "reply"
            and isinstance(message, Reply)
            and parts[1] == me
            and message.researcher_id == me
            and message.node_id == parts[2]
        )

    def _status(self, node_id: str, payload: bytes) -> None:
        if payload == STATUS_ONLINE:
            self._liveness.set(node_id, True)
        elif payload == STATUS_OFFLINE:
            self._liveness.set(node_id, False)
        elif payload:
            log.warning("%s: ignored status %r of node %s", self._where, payload[:40], node_id)


class FlapDetector:
    """Counts connections taken away right after connecting; trips at ``limit`` in ``window_s``.

    mosquitto 2.0 closes the old connection's socket without a DISCONNECT packet when a second
    client takes its id over, so besides reason code 0x8E "Session taken over", a connection
    lost within a few seconds of its CONNACK counts too. A broker restart counts once.
    """

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: deque[float] = deque()
        self._lock = threading.Lock()

    def record(self, now: float, uptime: float | None, rc: Any, from_server_packet: bool) -> bool:
        """Record one disconnect; True when it looks like a duplicate client id."""
        taken_over = getattr(rc, "value", None) == _SESSION_TAKEN_OVER or (
            not from_server_packet and uptime is not None and uptime < _FLAP_UPTIME_S
        )
        if not taken_over:
            return False
        with self._lock:
            self._events.append(now)
            while self._events and now - self._events[0] > self.window_s:
                self._events.popleft()
            return len(self._events) >= self.limit
