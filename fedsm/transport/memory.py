"""The in-process bus: the embedded default for ``fedsm demo`` and simulations, and for tests.

A :class:`MemoryBroker` plays the MQTT broker's part inside one process and each participant
holds a :class:`MemoryBus` on it. Semantics match :class:`~fedsm.transport.mqtt.MqttBus`:

* every message is encoded and decoded on the way (same validation and size limit as on the
  wire; a handler never shares a mutable object with the sender);
* messages for a participant that is not connected (yet, or any more) are queued, bounded,
  and delivered when it connects, like a persistent MQTT session;
* a node is online from construction until :meth:`MemoryBus.close`; researchers see that
  through :meth:`MemoryBus.online_nodes` / :meth:`MemoryBus.offline_nodes`.

Without faults, delivery is a direct call of the receiver's handlers in the sender's thread:
no thread, queue, sleep or poll is added. With :class:`~fedsm.transport.faults.Faults`, a
bus's outgoing messages may be dropped, duplicated, reordered or delayed (seeded).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from fedsm.core.messages import BROADCAST, Message, Reply, Request
from fedsm.core.protocol import MAX_MESSAGE_BYTES, decode, encode
from fedsm.core.protocol_errors import MessageDecodeError
from fedsm.transport.base import Bus, BusClosed, Handler, TransportError
from fedsm.transport.delivery import (
    HandlerSet,
    LivenessQueries,
    NodeLiveness,
    check_reply,
    check_request,
)
from fedsm.transport.faults import DelayTimer, Faults, FaultStage
from fedsm.transport.topics import NODE, RESEARCHER, check_participant

__all__ = ["MemoryBroker", "MemoryBus"]

log = logging.getLogger(__name__)

_Key = tuple[str, str]  # (role, participant id)


class MemoryBroker:
    """The in-process hub that :class:`MemoryBus` instances connect to.

    Parameters
    ----------
    faults:
        Default faults for buses created without their own.
    max_pending:
        Messages kept per participant that is not connected; past it the oldest is dropped
        with a warning (mosquitto's ``max_queued_messages`` does the same).
    max_message_bytes:
        Encoded size limit of one message.
    forward_unknown:
        Called with ``((role, participant id), encoded message)`` for a message to a
        participant with no bus here, instead of queueing it: a broker bridged to another
        process's broker (:mod:`fedsm.node.hosts`) hands those messages over.
    """

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        max_pending: int = 10_000,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        forward_unknown: Callable[[tuple[str, str], bytes], None] | None = None,
    ) -> None:
        self.faults = faults
        self.forward_unknown = forward_unknown
        self.max_pending = max_pending
        self.max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._buses: dict[_Key, MemoryBus] = {}
        self._pending: dict[_Key, deque[bytes]] = {}
        self._known_nodes: set[str] = set()
        self._stages: list[FaultStage] = []
        self._timer: DelayTimer | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    def flush(self) -> None:
        """Release every message held by a reorder window and run every pending delay now."""
        with self._lock:
            stages = list(self._stages)
        for stage in stages:
            stage.flush()
        timer = self._timer
        if timer is not None:
            timer.run_all_now()

    def pending(self, role: str, participant_id: str) -> int:
        """How many messages wait for a participant that is not connected."""
        with self._lock:
            return len(self._pending.get((role, participant_id), ()))

    def deliver_raw(self, role: str, participant_id: str, data: bytes) -> None:
        """Hand ``data`` to a participant as if it came off the wire (tests feed garbage here)."""
        self._deliver((role, participant_id), bytes(data))

    def attach_remote(
        self, role: str, participant_id: str, forward: Callable[[bytes], None]
    ) -> Callable[[], None]:
        """Connect a participant that lives in another process: messages to it are handed
        to ``forward`` (encoded, as on a wire) and, for a node, researchers see it online
        until the returned function detaches it."""
        remote = _RemoteBus(role, participant_id, forward)
        self._connect(remote)  # type: ignore[arg-type]  # what _connect uses of a bus
        return lambda: self._disconnect(remote)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the delay timer thread. Buses are closed by their owners."""
        with self._lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()

    def __enter__(self) -> MemoryBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ used by MemoryBus

    def _delay_timer(self) -> DelayTimer:
        with self._lock:
            if self._closed:
                raise TransportError("the memory broker is closed; no delayed delivery")
            if self._timer is None:
                self._timer = DelayTimer()
            return self._timer

    def _stage(self, faults: Faults) -> FaultStage:
        stage = FaultStage(faults, self._delay_timer)
        with self._lock:
            self._stages.append(stage)
        return stage

    def _connect(self, bus: MemoryBus) -> None:
        key = (bus.role, bus.participant_id)
        with self._lock:
            if key in self._buses:
                raise TransportError(
                    f"another {bus.role} bus with id {bus.participant_id!r} is already connected "
                    "to this broker; close it first or pick a different id"
                )
            self._buses[key] = bus
            queued = self._pending.pop(key, deque())
            researchers = self._researchers()
            if bus.role == NODE:
                self._known_nodes.add(bus.participant_id)
            else:
                for node_id in self._known_nodes:
                    bus._liveness.set(node_id, (NODE, node_id) in self._buses)
        if bus.role == NODE:
            for researcher in researchers:
                researcher._liveness.set(bus.participant_id, True)
        for data in queued:
            bus._receive(data)

    def _disconnect(self, bus: MemoryBus) -> None:
        key = (bus.role, bus.participant_id)
        with self._lock:
            if self._buses.get(key) is bus:
                del self._buses[key]
            researchers = self._researchers()
        if bus.role == NODE:
            for researcher in researchers:
                researcher._liveness.set(bus.participant_id, False)

    def _researchers(self) -> list[MemoryBus]:
        return [b for (role, _), b in self._buses.items() if role == RESEARCHER]

    def _broadcast_targets(self) -> list[_Key]:
        with self._lock:
            return [(NODE, n) for n in sorted(self._known_nodes)]

    def _deliver(self, key: _Key, data: bytes) -> None:
        with self._lock:
            bus = self._buses.get(key)
            if bus is None and self.forward_unknown is not None:
                forward = self.forward_unknown
            elif bus is None:
                queue = self._pending.setdefault(key, deque())
                if len(queue) >= self.max_pending:
                    queue.popleft()
                    log.warning(
                        "%s %s is not connected and %d messages wait for it; dropped the oldest",
                        key[0],
                        key[1],
                        self.max_pending,
                    )
                queue.append(data)
                return
            else:
                forward = None
        if forward is not None:
            forward(key, data)
            return
        bus._receive(data)


class _RemoteBus:
    """Stands in a broker for a participant of another process (see ``attach_remote``)."""

    def __init__(self, role: str, participant_id: str, forward: Callable[[bytes], None]) -> None:
        check_participant(participant_id, role)
        self.role = role
        self.participant_id = participant_id
        self._forward = forward
        self._liveness = NodeLiveness(f"remote {role} {participant_id}")

    def _receive(self, data: bytes) -> None:
        self._forward(data)


class MemoryBus(LivenessQueries, Bus):
    """One participant's connection to a :class:`MemoryBroker`.

    Parameters
    ----------
    broker:
        The hub shared by everyone in this process.
    participant_id:
        The researcher id or node id (the protocol's id syntax).
    role:
        ``"researcher"`` (sends requests, receives replies) or ``"node"`` (the reverse).
    faults:
        Faults applied to the messages *this* bus sends; defaults to the broker's.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        participant_id: str,
        role: str,
        *,
        faults: Faults | None = None,
    ) -> None:
        check_participant(participant_id, role)
        self.participant_id = participant_id
        self.role = role
        self._broker = broker
        self._handlers = HandlerSet(f"{role} {participant_id}")
        self._liveness = NodeLiveness(f"{role} {participant_id}")
        faults = faults if faults is not None else broker.faults
        self._stage = broker._stage(faults) if faults is not None and faults.active else None
        self._closed = False
        self._close_lock = threading.Lock()
        broker._connect(self)

    # ------------------------------------------------------------------ Bus

    def send(self, node_id: str, request: Request) -> None:
        """Deliver ``request`` to ``node_id`` (queued if that node is not connected)."""
        self._check_open(RESEARCHER, "send")
        check_request(request, node_id)
        data = encode(request, max_bytes=self._broker.max_message_bytes)
        self._submit([(NODE, node_id)], data)

    def broadcast(self, request: Request) -> None:
        """Deliver ``request`` to every node that ever connected (queued for offline ones)."""
        self._check_open(RESEARCHER, "broadcast")
        check_request(request, BROADCAST)
        data = encode(request, max_bytes=self._broker.max_message_bytes)
        self._submit(self._broker._broadcast_targets(), data)

    def reply(self, reply: Reply) -> None:
        """Deliver ``reply`` to the researcher it names (queued if not connected)."""
        self._check_open(NODE, "reply")
        check_reply(reply, self.participant_id)
        data = encode(reply, max_bytes=self._broker.max_message_bytes)
        self._submit([(RESEARCHER, reply.researcher_id)], data)

    def subscribe(self, handler: Handler) -> None:
        """Call ``handler`` for each delivered message, in the deliverer's thread."""
        self._handlers.add(handler)

    def close(self) -> None:
        """Disconnect; a node shows as offline to researchers. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._broker._disconnect(self)

    # ------------------------------------------------------------------ internals

    def _check_open(self, role: str, what: str) -> None:
        if self._closed:
            raise BusClosed(f"{self.role} bus {self.participant_id!r} is closed; cannot {what}")
        if self.role != role:
            raise TransportError(f"a {self.role} cannot {what}; only a {role} can")

    def _submit(self, keys: list[_Key], data: bytes) -> None:
        deliver = self._broker._deliver
        if self._stage is None:
            for key in keys:
                deliver(key, data)
            return
        for key in keys:
            self._stage.submit(_bind(deliver, key, data))

    def _receive(self, data: bytes) -> None:
        if self._closed:
            log.debug("%s %s closed; dropped a message", self.role, self.participant_id)
            return
        try:
            message = decode(data, max_bytes=self._broker.max_message_bytes)
        except MessageDecodeError as exc:
            log.warning(
                "%s %s dropped an undecodable message: %s", self.role, self.participant_id, exc
            )
            return
        if not _addressed_to(message, self.role, self.participant_id):
            log.warning(
                "%s %s dropped a misaddressed %s (node_id=%s, researcher_id=%s)",
                self.role,
                self.participant_id,
                message.command,
                message.node_id,
                message.researcher_id,
            )
            return
        self._handlers.deliver(message)


def _bind(deliver: Callable[[_Key, bytes], None], key: _Key, data: bytes) -> Callable[[], None]:
    return lambda: deliver(key, data)


def _addressed_to(message: Message, role: str, participant_id: str) -> bool:
    if role == NODE:
        return isinstance(message, Request) and message.node_id in (participant_id, BROADCAST)
    return isinstance(message, Reply) and message.researcher_id == participant_id
