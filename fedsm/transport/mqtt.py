"""The MQTT bus: paho-mqtt 2.x (MQTT v5, QoS 1) against a real broker such as mosquitto.

Choices, each forced by a measured fact (``reference/mqtt-facts.md``):

* paho's callbacks only enqueue; handlers run on one dispatch thread per bus. Nothing here
  waits inside a paho callback (``wait_for_publish`` there always times out).
* the encoded size is checked before publishing: an oversized publish gets the client
  disconnected and paho re-sends it after every reconnect.

The session set-up (client, TLS, ``TCP_NODELAY``, first connect, last will, reconnects) is in
:mod:`fedsm.transport.mqtt_session`; the receiving side in :mod:`fedsm.transport.mqtt_inbound`;
the topic layout in :mod:`fedsm.transport.topics`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedsm.core.messages import BROADCAST, Reply, Request
from fedsm.core.protocol import MAX_MESSAGE_BYTES, encode
from fedsm.core.protocol_errors import MessageTooLarge
from fedsm.errors import ConfigurationError
from fedsm.transport.base import Bus, BusClosed, Handler, TransportError
from fedsm.transport.delivery import (
    HandlerSet,
    LivenessQueries,
    NodeLiveness,
    check_reply,
    check_request,
)
from fedsm.transport.mqtt_inbound import FlapDetector, Inbound
from fedsm.transport.mqtt_session import SessionCallbacks, make_client
from fedsm.transport.topics import (
    NODE,
    RESEARCHER,
    STATUS_OFFLINE,
    TlsOptions,
    Topics,
    check_participant,
)

# DuplicateClientId, TlsOptions and parse_broker_url are re-exported: long-standing import paths.
__all__ = ["MqttBus"]

log = logging.getLogger(__name__)

_PACKET_OVERHEAD = 64  # fixed header, topic length, packet id, properties: generous bound


class MqttBus(SessionCallbacks, LivenessQueries, Bus):
    """One participant's MQTT connection.

    The constructor blocks until the broker accepted the connection and the subscriptions
    (so no early reply is missed), or raises :class:`TransportError` after
    ``connect_timeout_s``. Afterwards paho reconnects by itself with exponential backoff
    between ``reconnect_min_delay_s`` and ``reconnect_max_delay_s``; requests and replies
    published meanwhile are kept by paho (bounded by ``max_outgoing``) and sent on reconnect.

    Parameters
    ----------
    participant_id, role:
        The researcher or node id and ``"researcher"`` / ``"node"``. The MQTT client id is
        ``f"{role}-{participant_id}"`` and must be unique on the broker.
    host, port, username, password, tls:
        Where and how to connect; see :func:`~fedsm.transport.topics.parse_broker_url`.
    keepalive:
        Seconds; a dead peer is noticed after about 1.5x this.
    session_expiry_s:
        How long the broker keeps this participant's session (and queued messages) while
        it is disconnected.
    max_message_bytes:
        Encoded size limit; bigger messages raise :class:`MessageTooLarge` before sending.
    topic_prefix:
        First level(s) of every topic.
    tcp_nodelay:
        Leave True; False exists only so the benchmark can show what it costs.
    expire_requests:
        Give each request an MQTT message expiry at its ``deadline`` so the broker does not
        deliver requests nobody waits for any more.
    """

    def __init__(
        self,
        participant_id: str,
        role: str,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        keepalive: int = 30,
        session_expiry_s: int = 3600,
        connect_timeout_s: float = 10.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        topic_prefix: str = "fedsm",
        tcp_nodelay: bool = True,
        reconnect_min_delay_s: float = 1.0,
        reconnect_max_delay_s: float = 30.0,
        close_timeout_s: float = 5.0,
        expire_requests: bool = True,
        max_outgoing: int = 10_000,
        takeover_limit: int = 3,
        takeover_window_s: float = 30.0,
    ) -> None:
        check_participant(participant_id, role)
        if session_expiry_s <= 0:
            raise ConfigurationError(
                "session_expiry_s must be > 0, or queued requests are lost when a node is away"
            )
        self.participant_id = participant_id
        self.role = role
        # The broker knows a connection by its client id: federations sharing a broker under
        # their own topic prefixes must not share ids either (two "node-node-1" would knock
        # each other off). The default prefix keeps the plain id existing sessions use.
        self.client_id = (
            f"{role}-{participant_id}"
            if topic_prefix == "fedsm"
            else f"{topic_prefix.replace('/', '.')}.{role}-{participant_id}"
        )
        self.host, self.port = host, port
        self.max_message_bytes = max_message_bytes
        self.topics = Topics(topic_prefix)
        self._tcp_nodelay = tcp_nodelay
        self._close_timeout_s = close_timeout_s
        self._expire_requests = expire_requests
        self._flaps = FlapDetector(takeover_limit, takeover_window_s)
        self._where = f"{role} {participant_id!r} at {host}:{port}"

        self._handlers = HandlerSet(f"{role} {participant_id}")
        self._liveness = NodeLiveness(f"{role} {participant_id}")
        self._cond = threading.Condition()
        self._ready = False  # CONNACK ok and every SUBACK in
        self._sub_mid: int | None = None
        self._connect_error: str | None = None
        self._fatal: TransportError | None = None
        self._closing = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._broker_max_packet: int | None = None
        self._inflight: dict[int, str] = {}
        self._early_acks: set[int] = set()
        self._connected_at: float | None = None
        self._refused: deque[tuple[str, str]] = deque(maxlen=100)

        client = make_client(
            self.client_id,
            username=username,
            password=password,
            tls=tls,
            will_topic=self.topics.status(participant_id) if role == NODE else None,
            reconnect_min_delay_s=reconnect_min_delay_s,
            reconnect_max_delay_s=reconnect_max_delay_s,
            max_outgoing=max_outgoing,
            connect_timeout_s=connect_timeout_s,
        )
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client

        self._inbound = Inbound(
            participant_id,
            role,
            self.topics,
            self._handlers,
            self._liveness,
            max_message_bytes=max_message_bytes,
            where=self._where,
            thread_name=f"fedsm-mqtt-dispatch-{role}-{participant_id}",
        )
        try:
            self._connect(keepalive, session_expiry_s, connect_timeout_s)
        except BaseException:
            self._shutdown(announce=False)
            raise

    # ------------------------------------------------------------------ Bus

    def send(self, node_id: str, request: Request) -> None:
        """Publish ``request`` on ``node_id``'s request topic (the broker queues it if offline)."""
        self._check_usable(RESEARCHER, "send")
        check_request(request, node_id)
        data = encode(request, max_bytes=self.max_message_bytes)
        self._publish(self.topics.request(node_id), data, expiry_s=self._expiry(request))

    def broadcast(self, request: Request) -> None:
        """Publish ``request`` on the broadcast topic (queued for nodes with a session)."""
        self._check_usable(RESEARCHER, "broadcast")
        check_request(request, BROADCAST)
        data = encode(request, max_bytes=self.max_message_bytes)
        self._publish(self.topics.broadcast, data, expiry_s=self._expiry(request))

    def reply(self, reply: Reply) -> None:
        """Publish ``reply`` on ``<prefix>/reply/<researcher_id>/<this node>``."""
        self._check_usable(NODE, "reply")
        check_reply(reply, self.participant_id)
        self._publish(
            self.topics.reply(reply.researcher_id, self.participant_id),
            encode(reply, max_bytes=self.max_message_bytes),
        )

    def subscribe(self, handler: Handler) -> None:
        """Call ``handler`` for every delivered message, on this bus's dispatch thread."""
        self._handlers.add(handler)

    def wait_offline(self, node_ids: Iterable[str], timeout_s: float = 10.0) -> None:
        """Researcher: block until all ``node_ids`` are known offline (or raise)."""
        self._liveness.wait(node_ids, False, timeout_s)

    @property
    def connected(self) -> bool:
        """True while the broker connection is up and subscribed."""
        with self._cond:
            return self._ready

    @property
    def refused_publishes(self) -> list[tuple[str, str]]:
        """Recent publishes the broker refused, as ``(topic, reason)`` (e.g. an ACL denial)."""
        with self._cond:
            return list(self._refused)

    def close(self) -> None:
        """Announce "offline" (a node), wait up to ``close_timeout_s`` for unacknowledged
        publishes, disconnect cleanly (no last will) and stop the threads. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._shutdown(announce=True)

    @property
    def error(self) -> TransportError | None:
        """The error that stopped this bus for good (e.g. :class:`DuplicateClientId`), if any."""
        with self._cond:
            return self._fatal

    # ------------------------------------------------------------------ publishing

    def _expiry(self, request: Request) -> int | None:
        if not self._expire_requests:
            return None
        seconds = math.ceil(request.deadline - time.time())
        # MQTT's expiry is a 32-bit count of seconds; a deadline beyond it means "no expiry".
        return max(1, seconds) if seconds < 2**32 - 1 else None

    def _publish(
        self, topic: str, data: bytes, *, expiry_s: int | None = None, retain: bool = False
    ) -> None:
        limit = self._broker_max_packet
        if limit is not None and len(data) + len(topic) + _PACKET_OVERHEAD > limit:
            raise MessageTooLarge(
                f"message of {len(data)} bytes does not fit the broker's maximum packet size "
                f"of {limit} bytes; send big things through the file repository"
            )
        props = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        info = self._client.publish(topic, data, qos=1, retain=retain, properties=props)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.info("%s: not connected; %s kept by paho until reconnect", self._where, topic)
        elif info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(
                f"{self._where}: outgoing queue is full (broker unreachable for long?); "
                f"message to {topic} not sent"
            )
        elif info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(
                f"{self._where}: publish to {topic} failed: {mqtt.error_string(info.rc)}"
            )
        with self._cond:
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
            else:
                self._inflight[info.mid] = topic

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        with self._cond:
            topic = self._inflight.pop(mid, None)
            if topic is None:
                self._early_acks.add(mid)
            if rc.is_failure:
                self._refused.append((topic or "?", str(rc)))
            self._cond.notify_all()
        if rc.is_failure:
            log.warning("%s: the broker refused a publish to %s: %s", self._where, topic, rc)

    def _check_usable(self, role: str, what: str) -> None:
        if self._closed:
            raise BusClosed(f"{self._where}: the bus is closed; cannot {what}")
        if self._fatal is not None:
            raise self._fatal
        if self.role != role:
            raise TransportError(f"a {self.role} cannot {what}; only a {role} can")

    # ------------------------------------------------------------------ receiving

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # paho's network thread: never block here, hand over to the dispatch thread.
        self._inbound.put(msg.topic, msg.payload)

    # ------------------------------------------------------------------ closing

    def _shutdown(self, *, announce: bool) -> None:
        with self._cond:
            connected = self._ready
        if announce and connected and self.role == NODE and self._fatal is None:
            try:
                self._publish(self.topics.status(self.participant_id), STATUS_OFFLINE, retain=True)
            except TransportError as exc:
                log.warning("%s: could not announce offline: %s", self._where, exc)
        deadline = time.monotonic() + self._close_timeout_s
        with self._cond:
            while self._inflight and self._ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning(
                        "%s: closing with %d unacknowledged publishes",
                        self._where,
                        len(self._inflight),
                    )
                    break
                self._cond.wait(remaining)
            self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        self._inbound.stop()
