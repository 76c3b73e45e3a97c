"""A conformance probe of a live node over MQTT (``fedsm check node``).

The probe connects to the broker as a researcher of its own (a fresh, random researcher id
unless one is given) on a raw MQTT v5 client: it publishes bytes on the node's request topic
itself, so it can send what :class:`~fedsm.transport.mqtt.MqttBus` would refuse to encode, and
it records every byte that arrives on its reply topic, decodable or not, so a reply that
breaks the schema is shown as it came.

What it sends changes nothing on the node: ping, list, search with a random tag, and the
plan status of a random digest under a URL no repository serves (no log head, so no witness
record; the node cannot download the plan, so it records no pending plan either). It never
sends a train request. Every request carries an MQTT message expiry of the probe's timeout,
so the broker does not hand a probe request to a node that comes back later.

Then malformed and foreign requests, each followed by a ping: a ping whose ``deadline`` is a
string, an unknown command, an unsupported protocol version, garbage bytes, a request over
:data:`~fedsm.core.protocol.MAX_MESSAGE_BYTES`, a ping addressed to another node on this
node's topic, and a ping carrying another researcher's id.

What a malformed request should get: nothing. A fedsm node's bus decodes before the node sees
anything, and drops (logs) what does not decode or does not belong on the topic (see
:mod:`fedsm.transport.base`): it never learns whom to answer. The probe also accepts a
refusal, an ``error`` reply with ``BAD_REQUEST`` (or ``UNKNOWN_COMMAND`` /
``PROTOCOL_VERSION_MISMATCH`` where that is the fault), from a node that parses further;
any other answer fails, and so does a node that stops answering ping afterwards. A reply to
another researcher's request must never reach the probe's topic, and nothing may arrive on
the probe's topic that answers none of its requests.

Each property is a :class:`PropertyResult` naming the exchange: what was sent and what came
back (or ``nothing within S s``). Every wait has a deadline of ``timeout_s``.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedsm.core.messages import (
    ErrorReply,
    ListReply,
    ListRequest,
    Message,
    PingReply,
    PingRequest,
    Reply,
    Request,
    SearchReply,
    SearchRequest,
    TrainingPlanStatusReply,
    TrainingPlanStatusRequest,
)
from fedsm.core.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode, encode
from fedsm.core.protocol_errors import ErrorNumber, MessageDecodeError
from fedsm.errors import ConfigurationError
from fedsm.transport.base import TransportError
from fedsm.transport.mqtt_session import set_nodelay
from fedsm.transport.topics import (
    STATUS_ONLINE,
    TlsOptions,
    Topics,
    check_participant,
    parse_broker_url,
)

__all__ = ["PROPERTIES", "PropertyResult", "probe_node", "format_results"]

#: Every property the probe checks, in the order it reports them.
PROPERTIES: dict[str, str] = {
    "status-online": "the node's retained status topic says online",
    "ping-pong": "a ping gets a pong naming the node, on the node's reply topic",
    "list-well-formed": "a list gets a well-formed list-reply naming the node, without paths",
    "search-well-formed": "a search for a random tag gets an empty search-reply naming the node",
    "unknown-plan-not-approved": "the status of an unknown plan is unknown/pending or an error, "
    "never approved",
    "wrong-schema-refused": "a ping with a field of the wrong type is dropped or refused "
    "(BAD_REQUEST) and the node still answers ping",
    "unknown-command-refused": "a request of an unknown command is dropped or refused and the "
    "node still answers ping",
    "protocol-version-refused": "a ping of an unsupported protocol version is dropped or "
    "refused and the node still answers ping",
    "garbage-refused": "bytes that are not msgpack get no answer and the node still answers ping",
    "oversized-refused": "a request over the protocol's size limit is dropped or refused and "
    "the node still answers ping",
    "other-node-request-ignored": "a ping addressed to another node, on this node's topic, "
    "is not answered",
    "foreign-researcher-isolated": "a request carrying another researcher's id is never "
    "answered on the probe's topic",
    "no-unsolicited-replies": "everything on the probe's reply topic answers one of its requests",
}

#: The plan URL of the status probe: a scheme no repository serves, so the node downloads
#: nothing (and records nothing) whatever its repository.
_NO_PLAN_URL = "fedsm-probe:/no-such-plan/"
_LIST_FORBIDDEN_KEYS = ("path",)  # what a node must not tell a researcher about a dataset
_SHOW = 400  # characters of a message shown in an exchange


@dataclass(frozen=True)
class PropertyResult:
    """One property's verdict and the exchange behind it (``sent``, ``received``, ``detail``)."""

    property: str
    ok: bool
    exchange: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"property": self.property, "ok": self.ok, "exchange": dict(self.exchange)}


@dataclass
class _Received:
    """One MQTT message that reached the probe: raw bytes, the map they hold (if msgpack), the
    decoded message (if valid) or why it is not."""

    topic: str
    payload: bytes
    body: Any = None
    message: Message | None = None
    error: str | None = None

    @classmethod
    def of(cls, topic: str, payload: bytes) -> _Received:
        rec = cls(topic, payload)
        try:
            rec.message = decode(payload)
        except MessageDecodeError as exc:
            rec.error = str(exc)
        try:
            rec.body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:  # not msgpack at all
            rec.body = None
        return rec

    @property
    def request_id(self) -> str | None:
        if self.message is not None:
            return self.message.request_id
        if isinstance(self.body, dict) and isinstance(self.body.get("request_id"), str):
            return self.body["request_id"]
        return None

    def describe(self) -> str:
        if self.message is not None:
            body: Any = {"command": self.message.command, **self.message.to_dict()}
            return f"{self.message.command} on {self.topic}: {_cut(body)}"
        what = _cut(self.body) if self.body is not None else _cut(self.payload)
        return f"undecodable message on {self.topic} ({self.error}): {what}"


def _cut(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


# --------------------------------------------------------------------------- MQTT


class _Wire:
    """A raw MQTT v5 client: publishes bytes (QoS 1, waiting for the PUBACK), records every
    message that arrives on its subscriptions. No reconnects: a probe that lost its broker
    says so instead of re-sending."""

    def __init__(
        self,
        client_id: str,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        tls: TlsOptions | None,
        timeout_s: float,
    ) -> None:
        self.timeout_s = timeout_s
        self._where = f"probe {client_id!r} at {host}:{port}"
        self._cond = threading.Condition()
        self._inbox: list[_Received] = []
        self._connected: bool | None = None  # None until the CONNACK
        self._connect_error: str | None = None
        self._subacks: dict[int, list[Any]] = {}
        self._pubacks: dict[int, Any] = {}
        self.max_packet: int | None = None
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            tls.apply(client)
        client.connect_timeout = timeout_s
        client.on_socket_open = lambda c, u, sock: set_nodelay(sock, self._where)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client
        try:
            client.connect(host, port, keepalive=max(5, math.ceil(timeout_s * 3)), clean_start=True)
        except OSError as exc:
            raise TransportError(f"{self._where}: could not reach the broker: {exc}") from None
        client.loop_start()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if not self._cond.wait_for(lambda: self._connected is not None, _left(deadline)):
                self.close()
                raise TransportError(f"{self._where}: no CONNACK within {timeout_s:g} s")
            if not self._connected:
                error = self._connect_error
                self.close()
                raise TransportError(f"{self._where}: the broker refused the connection: {error}")

    # paho's network thread: record and notify only.
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self._connected = not rc.is_failure
            self._connect_error = None if self._connected else str(rc)
            self.max_packet = getattr(props, "MaximumPacketSize", None)
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self._connected = False
            self._connect_error = f"disconnected: {rc}"
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._subacks[mid] = list(codes)
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self._pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        rec = _Received.of(msg.topic, bytes(msg.payload))
        with self._cond:
            self._inbox.append(rec)
            self._cond.notify_all()

    @property
    def connected(self) -> bool:
        with self._cond:
            return bool(self._connected)

    def subscribe(self, topic: str) -> str | None:
        """Subscribe (QoS 1); None when granted, else why not."""
        result, mid = self._client.subscribe(topic, options=SubscribeOptions(qos=1))
        if result != mqtt.MQTT_ERR_SUCCESS:
            return mqtt.error_string(result)
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, _left(deadline)):
                return f"no SUBACK within {self.timeout_s:g} s"
            failed = [str(c) for c in self._subacks.pop(mid) if c.is_failure]
        return f"refused: {failed}" if failed else None

    def publish(self, topic: str, data: bytes, *, expiry_s: int) -> str | None:
        """Publish and wait for the PUBACK; None when the broker took it, else why not."""
        if not self.connected:
            return f"not sent: not connected ({self._connect_error})"
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = expiry_s
        info = self._client.publish(topic, data, qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return f"not sent: {mqtt.error_string(info.rc)}"
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            if not self._cond.wait_for(
                lambda: info.mid in self._pubacks or not self._connected, _left(deadline)
            ):
                return f"no PUBACK within {self.timeout_s:g} s"
            rc = self._pubacks.pop(info.mid, None)
        if rc is None:
            return f"connection lost before the PUBACK ({self._connect_error})"
        return f"the broker refused it: {rc}" if rc.is_failure else None

    def wait_for(self, match: Callable[[_Received], bool], deadline: float) -> _Received | None:
        """The first message received so far or until ``deadline`` (monotonic) that matches."""
        with self._cond:
            found: list[_Received] = []

            def seen() -> bool:
                found[:] = [r for r in self._inbox if match(r)]
                return bool(found)

            self._cond.wait_for(seen, _left(deadline))
            return found[0] if found else None

    def received(self) -> list[_Received]:
        with self._cond:
            return list(self._inbox)

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# --------------------------------------------------------------------------- the probe


def _hex(n: int = 12) -> str:
    return uuid.uuid4().hex[:n]


@dataclass
class _Sent:
    """A request the probe published: its request id (None for garbage) and what it was."""

    request_id: str | None
    what: str
    error: str | None = None  # why it could not be sent
    at: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        return self.what if self.error is None else f"{self.what} [{self.error}]"


class _Probe:
    def __init__(
        self, wire: _Wire, topics: Topics, node_id: str, me: str, other: str, timeout_s: float
    ) -> None:
        self.wire = wire
        self.topics = topics
        self.node = node_id
        self.me = me
        self.other = other
        self.timeout_s = timeout_s
        self.results: list[PropertyResult] = []
        self.sent_ids: set[str] = set()
        self.reply_prefix = f"{topics.prefix}/reply/{me}/"
        self._foreign_topic = topics.reply(other, node_id)
        self._foreign_sub: str | None = "not subscribed"

    # ----------------------------------------------------------------- plumbing

    def _nothing(self) -> str:
        return f"nothing within {self.timeout_s:g} s"

    def _record(self, name: str, ok: bool, sent: str, received: str, detail: str) -> None:
        self.results.append(
            PropertyResult(name, ok, {"sent": sent, "received": received, "detail": detail})
        )

    def _head(self, **overrides: Any) -> dict[str, Any]:
        head: dict[str, Any] = {
            "request_id": f"probe-{_hex()}",
            "researcher_id": self.me,
            "node_id": self.node,
            "deadline": time.time() + self.timeout_s,
        }
        head.update(overrides)
        return head

    def _send_bytes(self, data: bytes, request_id: str | None, what: str) -> _Sent:
        if request_id is not None:
            self.sent_ids.add(request_id)
        error = self.wire.publish(
            self.topics.request(self.node), data, expiry_s=max(1, math.ceil(self.timeout_s))
        )
        return _Sent(request_id, f"{what} ({len(data)} bytes)", error)

    def _send(self, request: Request, *, max_bytes: int = MAX_MESSAGE_BYTES) -> _Sent:
        data = encode(request, max_bytes=max_bytes)
        what = f"{request.command} {_cut({'command': request.command, **request.to_dict()})}"
        return self._send_bytes(data, request.request_id, what)

    def _reply_to(self, request_id: str) -> Callable[[_Received], bool]:
        return lambda r: r.topic.startswith(self.reply_prefix) and r.request_id == request_id

    def _await(self, sent: _Sent) -> _Received | None:
        if sent.error is not None or sent.request_id is None:
            return None
        return self.wire.wait_for(self._reply_to(sent.request_id), sent.at + self.timeout_s)

    def _fault(self, rec: _Received | None, expected: type[Reply], sent: _Sent) -> str | None:
        """Why ``rec`` is not a well-formed ``expected`` reply from the node, or None."""
        if sent.error is not None:
            return f"the request could not be sent: {sent.error}"
        if rec is None:
            return f"no reply: {self._nothing()}"
        if rec.message is None:
            return f"the reply does not decode: {rec.error}"
        message = rec.message
        if not isinstance(message, expected):
            if isinstance(message, ErrorReply):
                return f"an error reply ({_code_name(message.code)}): {message.message[:200]}"
            return f"expected a {expected.command}, got a {message.command}"
        if message.node_id != self.node:
            return f"the reply names node {message.node_id!r}, not {self.node!r}"
        if rec.topic != self.topics.reply(self.me, self.node):
            return f"the reply came on {rec.topic}, not {self.topics.reply(self.me, self.node)}"
        if message.researcher_id != self.me:
            return f"the reply names researcher {message.researcher_id!r}, not {self.me!r}"
        return None

    def _received(self, rec: _Received | None) -> str:
        return self._nothing() if rec is None else rec.describe()

    # ----------------------------------------------------------------- properties

    def run(self) -> list[PropertyResult]:
        self._status()
        self._ping()
        self._list()
        self._search()
        self._plan_status()
        refusals = self._refusals()
        self._settle(refusals)
        self._unsolicited()
        order = list(PROPERTIES)
        return sorted(self.results, key=lambda r: order.index(r.property))

    def _status(self) -> None:
        topic = self.topics.status(self.node)
        error = self.wire.subscribe(topic)
        if error is not None:
            self._record("status-online", False, f"subscribe {topic}", "-", error)
            return
        rec = self.wire.wait_for(lambda r: r.topic == topic, time.monotonic() + self.timeout_s)
        if rec is None:
            received, ok, detail = self._nothing(), False, "no retained status"
        else:
            received = _cut(rec.payload)
            ok = rec.payload == STATUS_ONLINE
            detail = "online" if ok else f"expected {STATUS_ONLINE!r}"
        self._record("status-online", ok, f"subscribe {topic}", received, detail)

    def _ping(self) -> None:
        sent = self._send(PingRequest(**self._head()))
        rec = self._await(sent)
        fault = self._fault(rec, PingReply, sent)
        detail = fault or "pong naming the node"
        self._record("ping-pong", fault is None, sent.describe(), self._received(rec), detail)

    def _list(self) -> None:
        sent = self._send(ListRequest(**self._head()))
        rec = self._await(sent)
        fault = self._fault(rec, ListReply, sent)
        if fault is None:
            assert rec is not None and isinstance(rec.message, ListReply)
            fault = _dataset_fault(rec.message.datasets)
        detail = fault or "well-formed list-reply naming the node"
        self._record(
            "list-well-formed", fault is None, sent.describe(), self._received(rec), detail
        )

    def _search(self) -> None:
        tag = f"fedsm-probe-{_hex()}"
        sent = self._send(SearchRequest(**self._head(), tags=(tag,)))
        rec = self._await(sent)
        fault = self._fault(rec, SearchReply, sent)
        if fault is None:
            assert rec is not None and isinstance(rec.message, SearchReply)
            datasets = rec.message.datasets
            fault = _dataset_fault(datasets) or (
                f"{len(datasets)} dataset(s) match the random tag {tag!r}" if datasets else None
            )
        detail = fault or "empty search-reply naming the node"
        self._record(
            "search-well-formed", fault is None, sent.describe(), self._received(rec), detail
        )

    def _plan_status(self) -> None:
        digest = os.urandom(32).hex()
        request = TrainingPlanStatusRequest(
            **self._head(),
            job_id=f"fedsm-probe-job-{_hex()}",
            training_plan_url=_NO_PLAN_URL + digest,
            training_plan_sha256=digest,
        )
        sent = self._send(request)
        rec = self._await(sent)
        fault = self._fault(rec, TrainingPlanStatusReply, sent)
        detail = ""
        if fault is None:
            assert rec is not None and isinstance(rec.message, TrainingPlanStatusReply)
            reply = rec.message
            if reply.training_plan_sha256 != digest or reply.job_id != request.job_id:
                fault = "the reply names another plan or job than asked"
            elif reply.status not in ("unknown", "pending"):
                fault = f"a random, unknown plan has status {reply.status!r}"
            else:
                detail = f"status {reply.status!r}"
        elif rec is not None and isinstance(rec.message, ErrorReply):
            error = rec.message
            fault = self._fault(rec, ErrorReply, sent)
            if fault is None and (error.code == ErrorNumber.INTERNAL or error.error_number is None):
                fault = f"an error reply ({_code_name(error.code)}): {error.message[:200]}"
            if fault is None:
                detail = f"refused ({_code_name(error.code)}): approval not granted"
        self._record(
            "unknown-plan-not-approved",
            fault is None,
            sent.describe(),
            self._received(rec),
            fault or detail,
        )

    def _refusals(self) -> list[tuple[str, _Sent, frozenset[int], _Sent]]:
        """Send each malformed or foreign request, each followed by a ping, without waiting
        (the broker keeps one publisher's messages in order, so a pong says the node lived
        through everything sent before its ping); returns ``(property, sent, accepted error
        codes, ping sent)``."""
        bad_request = frozenset({ErrorNumber.BAD_REQUEST})

        def wrong_schema() -> _Sent:
            head = self._head()
            body = self._body(PingRequest(**head))
            body["deadline"] = "not-a-number"
            return self._send_bytes(_pack(body), head["request_id"], f"ping {_cut(body)}")

        def unknown_command() -> _Sent:
            head = self._head()
            body = {"protocol_version": PROTOCOL_VERSION, "command": "fedsm-probe-no-such", **head}
            return self._send_bytes(_pack(body), head["request_id"], f"unknown {_cut(body)}")

        def protocol_version() -> _Sent:
            head = self._head()
            body = self._body(PingRequest(**head))
            body["protocol_version"] = "999"
            return self._send_bytes(_pack(body), head["request_id"], f"ping {_cut(body)}")

        def garbage() -> _Sent:
            # 0xc1 is never used by msgpack: no decoder can read this.
            return self._send_bytes(b"\xc1" + os.urandom(63), None, "garbage bytes 0xc1...")

        def oversized() -> _Sent:
            tags = tuple(f"{i:04d}-" + "x" * 3990 for i in range(70))  # > 256 KiB encoded
            request = SearchRequest(**self._head(), tags=tags)
            data = encode(request, max_bytes=2**31)
            limit = self.wire.max_packet
            if limit is not None and len(data) + 256 > limit:
                return _Sent(
                    request.request_id,
                    f"search of {len(data)} bytes",
                    f"the broker's maximum packet size is {limit} bytes: it refuses this itself",
                )
            what = f"search request_id={request.request_id} with {len(tags)} tags of 4 kB"
            return self._send_bytes(data, request.request_id, what)

        def other_node() -> _Sent:
            return self._send(PingRequest(**self._head(node_id=f"fedsm-probe-node-{_hex()}")))

        def foreign() -> _Sent:
            return self._send(PingRequest(**self._head(researcher_id=self.other)))

        bad: list[tuple[str, Callable[[], _Sent], frozenset[int]]] = [
            ("wrong-schema-refused", wrong_schema, bad_request),
            (
                "unknown-command-refused",
                unknown_command,
                bad_request | {ErrorNumber.UNKNOWN_COMMAND},
            ),
            (
                "protocol-version-refused",
                protocol_version,
                bad_request | {ErrorNumber.PROTOCOL_VERSION_MISMATCH},
            ),
            ("garbage-refused", garbage, bad_request),
            ("oversized-refused", oversized, bad_request),
            ("other-node-request-ignored", other_node, frozenset()),
            ("foreign-researcher-isolated", foreign, frozenset()),
        ]
        # Subscribing to the other researcher's topic only shows where the node answered
        # (a broker's ACL may well refuse it): never part of a verdict.
        self._foreign_sub = self.wire.subscribe(self._foreign_topic)
        out = []
        for name, send, codes in bad:
            sent = send()
            ping = self._send(PingRequest(**self._head()))
            out.append((name, sent, codes, ping))
        return out

    def _body(self, request: Request) -> dict[str, Any]:
        body = msgpack.unpackb(encode(request), raw=False)
        assert isinstance(body, dict)
        return body

    def _settle(self, refusals: list[tuple[str, _Sent, frozenset[int], _Sent]]) -> None:
        """Wait out the timeout after the last malformed request, then judge each."""
        last = max((ping.at for _, _, _, ping in refusals), default=time.monotonic())
        self.wire.wait_for(lambda r: False, last + self.timeout_s)  # a bounded quiet period
        for name, sent, codes, ping in refusals:
            pong = self._await(ping)  # its deadline has passed: what came by then
            replies = []
            if sent.request_id is not None:
                replies = [r for r in self.wire.received() if self._reply_to(sent.request_id)(r)]
            lines = [r.describe() for r in replies]
            fault = None
            if (
                name == "oversized-refused"
                and sent.error is not None
                and sent.error.startswith("the broker's")
            ):
                self._record(name, True, sent.what, "-", sent.error)
                continue
            if sent.error is not None:
                fault = f"the request could not be sent: {sent.error}"
            for rec in replies:
                if name == "foreign-researcher-isolated":
                    fault = f"a reply to researcher {self.other!r} reached the probe's topic"
                    break
                msg = rec.message
                if not isinstance(msg, ErrorReply) or msg.code not in codes:
                    allowed = ", ".join(_code_name(c) for c in sorted(codes)) or "none"
                    fault = f"answered (only silence or an error reply {allowed} may follow)"
                    break
            ping_fault = self._fault(pong, PingReply, ping)
            if fault is None and ping_fault is not None:
                fault = f"the ping after it failed: {ping_fault}"
            if fault is None:
                detail = "refused with an error reply" if replies else "dropped"
                if name == "foreign-researcher-isolated":
                    detail = self._foreign_note(sent)
                detail += "; the node still answers ping"
            received = "; ".join(lines) or f"nothing within {self.timeout_s:g} s"
            self._record(
                name,
                fault is None,
                f"{sent.describe()}; then {ping.describe()}",
                f"{received}; to the ping: {self._received(pong)}",
                fault or detail,
            )

    def _foreign_note(self, sent: _Sent) -> str:
        if self._foreign_sub is not None:
            return (
                f"nothing on the probe's topic (its own topic {self._foreign_topic} not "
                f"watched: {self._foreign_sub})"
            )
        seen = any(
            r.topic == self._foreign_topic and r.request_id == sent.request_id
            for r in self.wire.received()
        )
        where = "answered on its own topic" if seen else "not answered on its own topic either"
        return f"nothing on the probe's topic ({where})"

    def _unsolicited(self) -> None:
        stray = [
            r
            for r in self.wire.received()
            if r.topic.startswith(self.reply_prefix) and r.request_id not in self.sent_ids
        ]
        self._record(
            "no-unsolicited-replies",
            not stray,
            f"{len(self.sent_ids)} requests with known ids (and garbage bytes)",
            "; ".join(r.describe() for r in stray[:5]) or "nothing else",
            f"{len(stray)} message(s) answer no request of the probe"
            if stray
            else "every reply answers one of the probe's requests",
        )


def _pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _code_name(code: int) -> str:
    try:
        return f"{ErrorNumber(code).name} {code}"
    except ValueError:
        return f"unknown code {code}"


def _dataset_fault(datasets: tuple[dict[str, Any], ...]) -> str | None:
    for d in datasets:
        if not isinstance(d.get("dataset_id"), str) or not d["dataset_id"]:
            return f"a dataset without a dataset_id: {_cut(d)}"
        tags = d.get("tags")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return f"dataset {d['dataset_id']!r} has no list of string tags: {_cut(d)}"
        leaked = [k for k in _LIST_FORBIDDEN_KEYS if k in d]
        if leaked:
            return f"dataset {d['dataset_id']!r} tells the researcher its {leaked}"
    return None


# --------------------------------------------------------------------------- entry points


def probe_node(
    broker_url: str,
    node_id: str,
    *,
    token: str | None = None,
    timeout_s: float = 5.0,
    researcher_id: str | None = None,
) -> list[PropertyResult]:
    """Probe the node ``node_id`` through the broker at ``broker_url``; one result per
    property of :data:`PROPERTIES`, in that order.

    ``token`` is the probe's broker password (its username is the URL's, else the probe's
    researcher id). Raises :class:`~fedsm.errors.ConfigurationError` for bad arguments and
    :class:`~fedsm.transport.base.TransportError` when the broker cannot be reached.
    """
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigurationError(f"the timeout must be a positive number of seconds: {timeout_s}")
    check_participant(node_id, "node")
    me = researcher_id or f"fedsm-probe-{_hex()}"
    check_participant(me, "researcher")
    other = f"fedsm-probe-other-{_hex()}"
    args = parse_broker_url(broker_url)
    username, password = args["username"], args["password"]
    if token is not None:
        password = token
        username = username if username is not None else me
    topics = Topics(args.get("topic_prefix", "fedsm"))
    wire = _Wire(
        f"probe-{me}-{_hex(6)}",
        host=args["host"],
        port=args["port"],
        username=username,
        password=password,
        tls=args["tls"],
        timeout_s=timeout_s,
    )
    try:
        error = wire.subscribe(topics.replies_to(me))
        if error is not None:
            raise TransportError(f"the probe could not subscribe to its reply topic: {error}")
        return _Probe(wire, topics, node_id, me, other, timeout_s).run()
    finally:
        wire.close()


def format_results(results: list[PropertyResult]) -> str:
    """The results as lines for a person: PASS/FAIL per property, the exchange of failures."""
    lines = []
    for r in results:
        lines.append(f"{'PASS' if r.ok else 'FAIL'} {r.property}: {r.exchange['detail']}")
        if not r.ok:
            lines.append(f"    sent:     {r.exchange['sent']}")
            lines.append(f"    received: {r.exchange['received']}")
    passed = sum(r.ok for r in results)
    lines.append(f"{passed}/{len(results)} properties pass")
    return "\n".join(lines)
