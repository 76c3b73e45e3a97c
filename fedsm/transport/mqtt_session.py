"""Setting up an :class:`~fedsm.transport.mqtt.MqttBus`'s broker session: the paho client, TLS,
the last will, reconnect backoff, ``TCP_NODELAY``, the first connect with its deadline, the
subscriptions, and the errors that end a session.

Choices, each forced by a measured fact (``reference/mqtt-facts.md``):

* ``TCP_NODELAY`` on every (re)connected socket, from paho's socket-open callback: QoS 1
  request-reply takes ~0.6 ms with it on both ends and ~88 ms without.
* ``clean_start=False`` with a session expiry and a stable client id ``<role>-<id>``, so
  requests queued for an offline node survive a broker restart. Two processes with one id
  knock each other off in a loop; the bus notices the repeated "session taken over" and stops
  with :class:`DuplicateClientId` naming the id.
* a node's status topic holds a retained "online"; its last will and its clean close set
  "offline", which is how researchers learn who is online.

The set-up steps are plain functions. The paho callbacks that follow the connection share the
bus's lock and state, so they are methods of :class:`SessionCallbacks`, which ``MqttBus`` mixes
in; the state they share is listed there (``MqttBus.__init__`` creates it).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedsm.transport.base import TransportError
from fedsm.transport.mqtt_inbound import FlapDetector
from fedsm.transport.topics import NODE, STATUS_OFFLINE, STATUS_ONLINE, TlsOptions, Topics

__all__ = [
    "DuplicateClientId",
    "make_client",
    "open_connection",
    "set_nodelay",
    "SessionCallbacks",
]

# The bus's logger: one name for everything an MqttBus logs, so logging set-up keeps matching.
log = logging.getLogger("fedsm.transport.mqtt")


class DuplicateClientId(TransportError):
    """Another process connected with the same client id; the two knock each other off."""


def make_client(
    client_id: str,
    *,
    username: str | None,
    password: str | None,
    tls: TlsOptions | None,
    will_topic: str | None,
    reconnect_min_delay_s: float,
    reconnect_max_delay_s: float,
    max_outgoing: int,
    connect_timeout_s: float,
) -> mqtt.Client:
    """A paho MQTT v5 client that reconnects by itself, not yet connected and without callbacks.

    ``will_topic`` (a node's status topic) gets a retained "offline" last will; paho keeps at
    most ``max_outgoing`` unsent publishes while the broker is away.
    """
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=True,
    )
    if username is not None:
        client.username_pw_set(username, password)
    if tls is not None:
        tls.apply(client)
    if will_topic is not None:
        client.will_set(will_topic, STATUS_OFFLINE, qos=1, retain=True)
    client.reconnect_delay_set(reconnect_min_delay_s, reconnect_max_delay_s)
    client.max_queued_messages_set(max_outgoing)
    client.connect_timeout = connect_timeout_s
    return client


def open_connection(
    client: mqtt.Client,
    host: str,
    port: int,
    *,
    keepalive: int,
    session_expiry_s: int,
    deadline: float,
    timeout_s: float,
    where: str,
) -> None:
    """Open the first connection (``clean_start=False``, a session expiry), retrying a refused
    or unreachable socket with backoff until ``deadline`` (``time.monotonic()``) because the
    broker may still be starting; raise :class:`TransportError` after that, or at once for a
    TLS failure, which does not fix itself. The CONNACK arrives later, on paho's thread."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = int(session_expiry_s)
    delay = 0.05
    while True:
        try:
            client.connect(host, port, keepalive=keepalive, clean_start=False, properties=props)
            return
        except ssl.SSLError as exc:  # a certificate problem does not fix itself: fail now
            raise TransportError(f"{where}: TLS handshake failed: {exc}") from None
        except OSError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError(
                    f"{where}: could not reach the broker within {timeout_s:g} s "
                    f"({exc}); is it running and is the address right?"
                ) from None
            # Waiting between attempts of the first connect (broker still starting).
            threading.Event().wait(min(delay, remaining))
            delay = min(delay * 2, 1.0)


def set_nodelay(sock: Any, where: str) -> None:
    """Turn Nagle's algorithm off on a freshly opened broker socket (see the module docstring);
    a socket without the option (e.g. a unix socket) is left as it is."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:
        log.debug("%s: TCP_NODELAY not set: %s", where, exc)


class SessionCallbacks:
    """The connection side of :class:`~fedsm.transport.mqtt.MqttBus`: the first connect's wait
    for CONNACK and SUBACK, and paho's socket-open, connect, subscribe and disconnect callbacks
    (resubscribe and announce "online" on every reconnect; stop on a duplicate client id).

    A mixin, not a separate object: these callbacks and the bus's publishing and closing share
    one condition variable and the flags below, all set up by ``MqttBus.__init__``. They run on
    paho's network thread and never block there.
    """

    participant_id: str
    role: str
    client_id: str
    host: str
    port: int
    topics: Topics
    _where: str
    _tcp_nodelay: bool
    _flaps: FlapDetector
    _client: mqtt.Client
    _broker_max_packet: int | None  # from the last CONNACK (a plain attribute write)
    _cond: threading.Condition  # guards the fields below
    _ready: bool  # CONNACK ok and every SUBACK in
    _sub_mid: int | None
    _connect_error: str | None
    _fatal: TransportError | None
    _closing: bool
    _connected_at: float | None

    def _connect(self, keepalive: int, session_expiry_s: int, timeout_s: float) -> None:
        """Connect, start paho's network thread and wait until subscribed, or raise."""
        deadline = time.monotonic() + timeout_s
        open_connection(
            self._client,
            self.host,
            self.port,
            keepalive=keepalive,
            session_expiry_s=session_expiry_s,
            deadline=deadline,
            timeout_s=timeout_s,
            where=self._where,
        )
        self._client.loop_start()
        with self._cond:
            while not self._ready and self._connect_error is None and self._fatal is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(
                        f"{self._where}: no CONNACK/SUBACK from the broker within {timeout_s:g} s "
                        "(a TLS port needs mqtts:// / tls=TlsOptions(...); or the broker is "
                        "overloaded)"
                    )
                self._cond.wait(remaining)
            if self._fatal is not None:
                raise self._fatal
            if self._connect_error is not None:
                raise TransportError(f"{self._where}: {self._connect_error}")

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._tcp_nodelay:
            set_nodelay(sock, self._where)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            hint = ""
            if rc.value in (134, 135):  # bad user name or password / not authorized
                hint = "; check the username/password and the broker's password file and ACL"
            with self._cond:
                self._connect_error = f"the broker refused the connection: {rc}{hint}"
                self._cond.notify_all()
            log.error("%s: the broker refused the connection: %s%s", self._where, rc, hint)
            return
        self._broker_max_packet = getattr(props, "MaximumPacketSize", None)
        if self.role == NODE:
            filters = [self.topics.request(self.participant_id), self.topics.broadcast]
        else:
            filters = [self.topics.replies_to(self.participant_id), self.topics.all_status]
        result, mid = client.subscribe([(t, SubscribeOptions(qos=1)) for t in filters])
        with self._cond:
            self._connect_error = None
            self._sub_mid = mid
            self._connected_at = time.monotonic()
        if self.role == NODE:
            client.publish(
                self.topics.status(self.participant_id), STATUS_ONLINE, qos=1, retain=True
            )
        log.info("%s: connected (session present: %s)", self._where, flags.session_present)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], props: Any
    ) -> None:
        failed = [str(c) for c in codes if c.is_failure]
        with self._cond:
            if mid != self._sub_mid:
                return
            if failed:
                self._connect_error = f"the broker refused the subscriptions: {failed}"
                log.error("%s: %s", self._where, self._connect_error)
            else:
                self._ready = True
            self._cond.notify_all()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        now = time.monotonic()
        with self._cond:
            self._ready = False
            uptime = now - self._connected_at if self._connected_at is not None else None
            self._connected_at = None
            self._cond.notify_all()
            if self._closing:
                return
        log.warning("%s: disconnected (%s); reconnecting", self._where, rc)
        if not self._flaps.record(now, uptime, rc, flags.is_disconnect_packet_from_server):
            return
        with self._cond:
            if self._fatal is not None:
                return
            self._fatal = DuplicateClientId(
                f"{self._where}: the connection was taken away {self._flaps.limit} times "
                f"within {self._flaps.window_s:g} s right after connecting: another process "
                f"is probably connected with the same client id {self.client_id!r}. Each "
                "participant id must run in one process only; stop the other one or use a "
                "different id. This bus has stopped."
            )
            self._cond.notify_all()
        log.error("%s", self._fatal)
        client.loop_stop()  # from the network thread this only stops the loop; no join
