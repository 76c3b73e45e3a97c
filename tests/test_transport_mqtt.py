"""The MQTT bus against a real mosquitto started by the tests (never skipped): the shared bus
contract, then what is particular to MQTT (threads, sessions, last will, expiry, limits...)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker_fixture import mosquitto, mosquitto_session, start_mosquitto  # noqa: F401

from fedsm.core.messages import Message, PingReply, PingRequest, SearchRequest
from fedsm.core.protocol_errors import MessageTooLarge
from fedsm.errors import ConfigurationError
from fedsm.testing.bus import BusContract, Federation
from fedsm.transport import (
    DuplicateClientId,
    MqttBus,
    TlsOptions,
    Topics,
    TransportError,
    parse_broker_url,
)
from fedsm.transport.mosquitto import free_port

R = "researcher-1"
HERE = Path(__file__).parent


class Collector:
    """A handler that records messages and lets a test wait (bounded) for them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.messages: list[Message] = []
        self.threads: list[str] = []

    def __call__(self, message: Message) -> None:
        with self.cond:
            self.messages.append(message)
            self.threads.append(threading.current_thread().name)
            self.cond.notify_all()

    def wait(self, count: int, timeout_s: float = 10.0) -> list[Message]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.messages) >= count, timeout_s)
            assert ok, f"expected {count} messages, got {self.messages}"
            return list(self.messages)

    @property
    def ids(self) -> list[str]:
        with self.cond:
            return [m.request_id for m in self.messages]


class RawClient:
    """A plain paho client: publishes what a buggy or hostile peer would, or watches topics."""

    def __init__(self, port: int, client_id: str | None = None) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"raw-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.received.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def wait(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.received) >= count, timeout_s), self.received
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def ping(i: int | str, node: str = "n1", deadline_s: float = 60.0) -> PingRequest:
    return PingRequest(
        request_id=f"q{i}", researcher_id=R, node_id=node, deadline=time.time() + deadline_s
    )


def pong(message: Message, node: str) -> PingReply:
    return PingReply(
        request_id=message.request_id, researcher_id=message.researcher_id, node_id=node
    )


def answering(bus: MqttBus) -> Collector:
    """Subscribe a handler that answers every ping and records it."""
    seen = Collector()

    def handler(message: Message) -> None:
        seen(message)
        bus.reply(pong(message, bus.participant_id))

    bus.subscribe(handler)
    return seen


class TestMqttBusContract(BusContract):
    """The scenarios every bus passes (fedsm.testing.bus), on the shared test broker; each
    federation has a topic prefix of its own. A raw paho client plays the wire for garbage and
    for a node forging another node's reply on its own reply topic."""

    __test__ = True
    ordered_per_sender = True  # QoS 1, one topic per channel: mosquitto keeps publish order
    max_examples = 10  # each example connects a researcher and three nodes

    @pytest.fixture(autouse=True)
    def _broker(self, mosquitto_session):  # noqa: F811
        self.port = mosquitto_session.port

    def make_federation(self, researcher_ids, node_ids):
        topics = Topics(f"t{uuid.uuid4().hex[:10]}")
        kw = dict(port=self.port, topic_prefix=topics.prefix)
        opened: list[MqttBus] = []
        try:
            for r in researcher_ids:
                opened.append(MqttBus(r, "researcher", **kw))
            for n in node_ids:
                opened.append(MqttBus(n, "node", **kw))
        except BaseException:
            for bus in opened:
                bus.close()
            raise
        raw: list[RawClient] = []

        def publish(topic: str, data: bytes) -> None:
            if not raw:
                raw.append(RawClient(self.port))
            raw[0].publish(topic, data)

        def inject(role: str, participant_id: str, data: bytes) -> None:
            if role == "node":
                publish(topics.request(participant_id), data)
            else:
                publish(topics.reply(participant_id, node_ids[0]), data)

        def teardown() -> None:
            for client in raw:
                client.close()

        return Federation(
            researchers={b.participant_id: b for b in opened if b.role == "researcher"},
            nodes={b.participant_id: b for b in opened if b.role == "node"},
            teardown=teardown,
            inject=inject,
            inject_reply_as=lambda node, researcher, data: publish(
                topics.reply(researcher, node), data
            ),
        )


@pytest.fixture
def prefix() -> str:
    """A topic prefix of its own per test, so tests sharing a broker never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def closing():
    """Collects buses and closes them at the end of the test, whatever happens."""
    buses: list = []
    yield buses
    for bus in reversed(buses):
        bus.close()


def test_handlers_run_on_the_dispatch_thread_and_nagle_is_off(mosquitto_session, prefix, closing):  # noqa: F811
    kw = dict(port=mosquitto_session.port, topic_prefix=prefix)
    researcher = MqttBus(R, "researcher", **kw)
    node = MqttBus("n1", "node", **kw)
    closing += [researcher, node]
    requests = answering(node)
    replies = Collector()
    researcher.subscribe(replies)

    researcher.send("n1", ping(1))

    assert replies.wait(1) == [pong(ping(1), "n1")]
    # Handlers run on the bus's dispatch thread, never on paho's network thread.
    assert replies.threads[0].startswith("fedsm-mqtt-dispatch-researcher")
    assert requests.threads[0].startswith("fedsm-mqtt-dispatch-node")
    # client ids are scoped by the topic prefix: federations sharing a broker never clash
    scope = prefix.replace("/", ".")
    assert researcher.client_id == f"{scope}.researcher-{R}"
    assert node.client_id == f"{scope}.node-n1"
    for bus in (researcher, node):  # Nagle off, or each exchange costs ~40-88 ms
        sock = bus._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_duplicates_reach_the_handler_and_are_not_merged(mosquitto_session, prefix, closing):  # noqa: F811
    kw = dict(port=mosquitto_session.port, topic_prefix=prefix)
    researcher = MqttBus(R, "researcher", **kw)
    node = MqttBus("n1", "node", **kw)
    closing += [researcher, node]
    seen = Collector()
    answered: set[str] = set()

    def idempotent(message: Message) -> None:  # how a node handles duplicates: by request id
        seen(message)
        if message.request_id not in answered:
            answered.add(message.request_id)
            node.reply(pong(message, "n1"))

    node.subscribe(idempotent)
    replies = Collector()
    researcher.subscribe(replies)
    request = ping(1)
    researcher.send("n1", request)
    researcher.send("n1", request)  # a retry with the same request id
    assert seen.wait(2) == [request, request]
    assert replies.wait(1) == [pong(request, "n1")]
    node.reply(pong(request, "n1"))  # a duplicate reply reaches the researcher too
    assert replies.wait(2)[1] == pong(request, "n1")


def test_oversized_message_is_refused_before_sending(mosquitto_session, prefix, closing):  # noqa: F811
    port = mosquitto_session.port
    researcher = MqttBus(R, "researcher", port=port, topic_prefix=prefix)
    closing.append(researcher)
    watcher = RawClient(port)
    try:
        watcher.subscribe(f"{prefix}/#")
        big = SearchRequest(
            request_id="big",
            researcher_id=R,
            node_id="n1",
            deadline=time.time() + 60,
            tags=tuple("x" * 4000 for _ in range(70)),
        )
        with pytest.raises(MessageTooLarge, match="repository"):
            researcher.send("n1", big)
        researcher.send("n1", ping("small"))
        ((topic, payload),) = watcher.wait(1)
        assert topic == f"{prefix}/req/n1" and b"qsmall" in payload
        assert researcher.connected
    finally:
        watcher.close()
    # A smaller client limit applies the same way.
    small = MqttBus("r-small", "researcher", port=port, topic_prefix=prefix, max_message_bytes=200)
    closing.append(small)
    with pytest.raises(MessageTooLarge):
        small.send(
            "n1",
            SearchRequest(
                request_id="s",
                researcher_id="r-small",
                node_id="n1",
                deadline=time.time() + 60,
                tags=("y" * 300,),
            ),
        )


def test_broker_packet_limit_is_checked_too(tmp_path, prefix):
    broker = start_mosquitto(tmp_path, config_extra="max_packet_size 100000")
    researcher = MqttBus(
        R, "researcher", port=broker.port, topic_prefix=prefix, max_message_bytes=10_000_000
    )
    try:
        big = SearchRequest(
            request_id="big",
            researcher_id=R,
            node_id="n1",
            deadline=time.time() + 60,
            tags=tuple("x" * 4000 for _ in range(30)),
        )
        with pytest.raises(MessageTooLarge, match="maximum packet size of 100000"):
            researcher.send("n1", big)
        assert researcher.connected  # not disconnected by the broker: nothing was sent
    finally:
        researcher.close()
        broker.stop()


def test_last_will_reaches_the_researcher_when_a_node_is_killed(
    mosquitto_session,  # noqa: F811
    prefix,
    closing,
):
    port = mosquitto_session.port
    researcher = MqttBus(R, "researcher", port=port, topic_prefix=prefix)
    closing.append(researcher)
    replies = Collector()
    researcher.subscribe(replies)
    changes: list[tuple[str, bool]] = []
    researcher.on_status(lambda node, online: changes.append((node, online)))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "mqtt_node_proc.py"),
            "--port",
            str(port),
            "--node",
            "victim",
            "--prefix",
            prefix,
            "--lifetime",
            "60",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        researcher.wait_online(["victim"], timeout_s=20)
        researcher.send("victim", ping(1, "victim"))
        assert replies.wait(1)[0].node_id == "victim"

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

        researcher.wait_offline(["victim"], timeout_s=10)
        assert "victim" in researcher.offline_nodes()
        assert "victim" not in researcher.online_nodes()
        assert changes == [("victim", True), ("victim", False)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_clean_close_announces_offline_and_late_researchers_see_it(
    mosquitto_session,  # noqa: F811
    prefix,
    closing,
):
    kw = dict(port=mosquitto_session.port, topic_prefix=prefix)
    researcher = MqttBus(R, "researcher", **kw)
    closing.append(researcher)
    node = MqttBus("n1", "node", **kw)
    researcher.wait_online(["n1"], timeout_s=10)
    node.close()
    researcher.wait_offline(["n1"], timeout_s=10)
    late = MqttBus("r-late", "researcher", **kw)
    closing.append(late)
    late.wait_offline(["n1"], timeout_s=10)  # from the retained status
    assert late.online_nodes() == frozenset()


def test_queued_request_survives_a_broker_restart(mosquitto, prefix, closing):  # noqa: F811
    kw = dict(
        port=mosquitto.port,
        topic_prefix=prefix,
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
    )
    MqttBus("n1", "node", **kw).close()  # the node's session (subscriptions) now exists
    researcher = MqttBus(R, "researcher", **kw)
    closing.append(researcher)
    replies = Collector()
    researcher.subscribe(replies)
    researcher.send("n1", ping("before-restart"))  # queued by the broker for the offline node

    mosquitto.restart()
    mosquitto.stop()
    researcher.send("n1", ping("while-down"))  # kept by paho until it reconnects
    mosquitto.start()

    node = MqttBus("n1", "node", **kw)
    closing.append(node)
    seen = answering(node)
    got = seen.wait(2, timeout_s=20)
    assert sorted(m.request_id for m in got) == ["qbefore-restart", "qwhile-down"]
    assert sorted(m.request_id for m in replies.wait(2, timeout_s=20)) == [
        "qbefore-restart",
        "qwhile-down",
    ]


def test_expired_request_is_not_delivered(mosquitto_session, prefix, closing):  # noqa: F811
    kw = dict(port=mosquitto_session.port, topic_prefix=prefix)
    MqttBus("n1", "node", **kw).close()
    researcher = MqttBus(R, "researcher", **kw)
    closing.append(researcher)
    researcher.send("n1", ping("stale", deadline_s=0.5))  # the broker expires it after 1 s
    researcher.send("n1", ping("fresh", deadline_s=60))
    threading.Event().wait(2.2)  # let the stale one expire (bounded, deliberate)
    node = MqttBus("n1", "node", **kw)
    closing.append(node)
    seen = Collector()
    node.subscribe(seen)
    assert seen.wait(1)[0].request_id == "qfresh"
    researcher.send("n1", ping("marker"))
    assert seen.wait(2)[1].request_id == "qmarker"
    assert "qstale" not in seen.ids


def test_two_processes_with_one_id_are_detected(mosquitto_session, prefix, closing):  # noqa: F811
    kw = dict(
        port=mosquitto_session.port,
        topic_prefix=prefix,
        reconnect_min_delay_s=0.05,
        reconnect_max_delay_s=0.2,
    )
    first = MqttBus("twin", "node", **kw)
    second = MqttBus("twin", "node", **kw)
    closing += [first, second]
    deadline = time.monotonic() + 20
    while first.error is None and second.error is None:
        assert time.monotonic() < deadline, "flapping was not detected"
        threading.Event().wait(0.05)
    stopped = first if first.error is not None else second
    assert isinstance(stopped.error, DuplicateClientId)
    assert "node-twin" in str(stopped.error) and "same client id" in str(stopped.error)
    with pytest.raises(DuplicateClientId):
        stopped.reply(pong(ping(1, "twin"), "twin"))


def test_connect_timeout_raises_a_transport_error():
    started = time.monotonic()
    with pytest.raises(TransportError, match="could not reach the broker within 0.5 s"):
        MqttBus("n1", "node", port=free_port(), connect_timeout_s=0.5)
    assert time.monotonic() - started < 5


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigurationError, match="role"):
        MqttBus("n1", "admin")
    with pytest.raises(ConfigurationError, match="session_expiry_s"):
        MqttBus("n1", "node", session_expiry_s=0)
    with pytest.raises(ConfigurationError, match="invalid"):
        MqttBus("n/1", "node")


def test_parse_broker_url():
    assert parse_broker_url("mqtt://host.example") == {
        "host": "host.example",
        "port": 1883,
        "username": None,
        "password": None,
        "tls": None,
    }
    got = parse_broker_url("mqtts://node%401:p%3Ass@10.0.0.5:18883?ca_certs=/etc/ca.pem&prefix=x/y")
    assert got == {
        "host": "10.0.0.5",
        "port": 18883,
        "username": "node@1",
        "password": "p:ss",
        "tls": TlsOptions(ca_certs="/etc/ca.pem"),
        "topic_prefix": "x/y",
    }
    assert parse_broker_url("mqtts://h")["port"] == 8883
    for bad in (
        "http://h",
        "mqtt://",
        "mqtt://h:99999",
        "mqtt://h/path",
        "mqtt://h?ca_certs=x",
        "mqtt://h?prefix=a/+",
    ):
        with pytest.raises(ConfigurationError):
            parse_broker_url(bad)
