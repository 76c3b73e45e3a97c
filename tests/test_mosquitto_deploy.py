"""The shipped deployment broker config (deploy/mosquitto/): passwords, topic ACLs, TLS.

The test runs the real ``mosquitto.conf`` and ``acl`` from the repository, with only the file
locations and the listener rewritten to a temporary directory and a free loopback port. The
password file is made with ``mosquitto_passwd`` and the certificates with ``openssl``.
Publishes use QoS 1 so that an ACL refusal is visible (PUBACK "Not authorized").
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker_fixture import ensure_mosquitto, start_mosquitto

from fedsm.core.messages import BROADCAST, Message, PingReply, PingRequest
from fedsm.core.protocol import encode
from fedsm.transport import MqttBus, TlsOptions, TransportError, parse_broker_url
from fedsm.transport.mosquitto import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
PASSWORDS = {
    "researcher": "r-" + uuid.uuid4().hex,
    "node-a": "a-" + uuid.uuid4().hex,
    "node-b": "b-" + uuid.uuid4().hex,
}
NOT_AUTHORIZED = 135


def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(cmd)} failed: {done.stderr}"


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost."""
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(
        [
            "openssl",
            "req",
            "-x509",
            *ec,
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=fedsm test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        d,
    )
    _run(
        [
            "openssl",
            "req",
            *ec,
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        d,
    )
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
        d,
    )


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    ensure_mosquitto()
    for tool in ("mosquitto_passwd", "openssl"):
        assert shutil.which(tool), f"{tool} is needed to test the deployment config"
    root = tmp_path_factory.mktemp("secure")
    etc = root / "etc"
    etc.mkdir()
    make_certs(etc / "certs")
    first = True
    for user, password in PASSWORDS.items():
        _run(
            [
                "mosquitto_passwd",
                *(["-c"] if first else []),
                "-b",
                str(etc / "passwd"),
                user,
                password,
            ],
            root,
        )
        first = False
    shutil.copy(DEPLOY / "acl", etc / "acl")
    port = free_port()
    text = (DEPLOY / "mosquitto.conf").read_text()
    assert "\nlistener 8883\n" in text and "allow_anonymous false" in text
    text = text.replace("/etc/mosquitto/fedsm/", f"{etc}/")
    text = text.replace("/var/lib/mosquitto/", f"{root}/data/")
    text = text.replace("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n")
    (root / "data").mkdir()
    if os.geteuid() == 0:
        text += f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"
    broker = start_mosquitto(root / "run", config=text, port=port)
    broker.ca = str(etc / "certs" / "ca.crt")
    try:
        yield broker
    finally:
        broker.stop()


def bus(broker, user: str, role: str, **kw) -> MqttBus:
    url = f"mqtts://{user}:{PASSWORDS[user]}@127.0.0.1:{broker.port}?ca_certs={broker.ca}"
    return MqttBus(user, role, **parse_broker_url(url), connect_timeout_s=5, **kw)


class Raw:
    """A paho client logged in as some user, recording deliveries and PUBACK reason codes."""

    def __init__(self, broker, user: str) -> None:
        self.cond = threading.Condition()
        self.received: list[str] = []
        self.acks: dict[int, int] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(user, PASSWORDS[user])
        TlsOptions(ca_certs=broker.ca).apply(self.client)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.received.append(msg.topic)
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, rc, props) -> None:
        with self.cond:
            self.acks[mid] = rc.value
            self.cond.notify_all()

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        assert done.wait(5)

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.acks, 5), "no PUBACK"
            return self.acks[info.mid]

    def wait_for(self, topic: str) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: topic in self.received, 5), self.received
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Collector:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ids: list[str] = []

    def __call__(self, message: Message) -> None:
        with self.cond:
            self.ids.append(message.request_id)
            self.cond.notify_all()

    def wait_for(self, request_id: str) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: request_id in self.ids, 5), self.ids
            return list(self.ids)


def ping(i: str, node: str) -> PingRequest:
    return PingRequest(request_id=i, researcher_id="researcher", node_id=node, deadline=1e10)


def test_anonymous_and_wrong_password_clients_are_refused(secure_broker):
    port, ca = secure_broker.port, TlsOptions(ca_certs=secure_broker.ca)
    with pytest.raises(TransportError, match="Not authorized"):
        MqttBus("node-a", "node", port=port, tls=ca, connect_timeout_s=5)
    with pytest.raises(TransportError, match="Not authorized|Bad user name or password"):
        MqttBus(
            "node-a",
            "node",
            port=port,
            tls=ca,
            username="node-a",
            password="wrong",
            connect_timeout_s=5,
        )


def test_plaintext_and_unverified_tls_are_refused(secure_broker):
    port = secure_broker.port
    with pytest.raises(TransportError):
        MqttBus(
            "node-a",
            "node",
            port=port,
            username="node-a",
            password=PASSWORDS["node-a"],
            connect_timeout_s=2,
        )
    with pytest.raises(TransportError, match="TLS handshake failed"):
        MqttBus(
            "node-a",
            "node",
            port=port,
            tls=TlsOptions(),
            username="node-a",
            password=PASSWORDS["node-a"],
            connect_timeout_s=5,
        )


def test_intended_traffic_passes_the_acl(secure_broker):
    researcher = bus(secure_broker, "researcher", "researcher")
    node = bus(secure_broker, "node-a", "node")
    try:
        node.subscribe(
            lambda m: node.reply(
                PingReply(request_id=m.request_id, researcher_id=m.researcher_id, node_id="node-a")
            )
        )
        replies = Collector()
        researcher.subscribe(replies)
        researcher.wait_online(["node-a"], timeout_s=5)  # status write + read allowed
        researcher.send("node-a", ping("direct", "node-a"))
        researcher.broadcast(ping("all", BROADCAST))
        replies.wait_for("direct")
        replies.wait_for("all")
        assert researcher.refused_publishes == [] and node.refused_publishes == []
    finally:
        node.close()
        researcher.close()
    assert not researcher.connected


def test_a_node_cannot_read_another_nodes_requests_or_replies(secure_broker):
    researcher = bus(secure_broker, "researcher", "researcher")
    node_b = bus(secure_broker, "node-b", "node")
    spy = Raw(secure_broker, "node-a")
    try:
        got_b = Collector()
        node_b.subscribe(got_b)
        node_b.subscribe(
            lambda m: node_b.reply(
                PingReply(request_id=m.request_id, researcher_id="researcher", node_id="node-b")
            )
        )
        replies = Collector()
        researcher.subscribe(replies)
        # The broker grants these subscriptions but filters what node-a may read.
        spy.subscribe("fedsm/req/node-b", "fedsm/req/+", "fedsm/reply/#", "fedsm/#")
        researcher.send("node-b", ping("secret", "node-b"))
        got_b.wait_for("secret")
        replies.wait_for("secret")
        researcher.send("node-a", ping("marker", "node-a"))  # published after the secret
        seen = spy.wait_for("fedsm/req/node-a")
        assert "fedsm/req/node-b" not in seen
        assert not any(t.startswith("fedsm/reply/") for t in seen)
    finally:
        spy.close()
        node_b.close()
        researcher.close()


def test_a_node_cannot_publish_as_the_researcher_or_another_node(secure_broker):
    researcher = bus(secure_broker, "researcher", "researcher")
    node_b = bus(secure_broker, "node-b", "node")
    rogue = Raw(secure_broker, "node-a")
    try:
        got_b, replies = Collector(), Collector()
        node_b.subscribe(got_b)
        researcher.subscribe(replies)
        researcher.wait_online(["node-b"], timeout_s=5)
        forged = encode(ping("forged", "node-b"))
        assert rogue.publish("fedsm/req/node-b", forged) == NOT_AUTHORIZED
        assert rogue.publish("fedsm/broadcast", encode(ping("forged", BROADCAST))) == (
            NOT_AUTHORIZED
        )
        spoofed = encode(
            PingReply(request_id="spoof", researcher_id="researcher", node_id="node-b")
        )
        assert rogue.publish("fedsm/reply/researcher/node-b", spoofed) == NOT_AUTHORIZED
        assert rogue.publish("fedsm/status/node-b", b"offline") == NOT_AUTHORIZED
        # What node-a may do is accepted (0 = success, 16 = no matching subscribers).
        own = encode(PingReply(request_id="own", researcher_id="researcher", node_id="node-a"))
        assert rogue.publish("fedsm/reply/researcher/node-a", own) in (0, 16)

        replies.wait_for("own")
        researcher.send("node-b", ping("real", "node-b"))
        assert got_b.wait_for("real") == ["real"]
        assert "spoof" not in replies.ids
        assert "node-b" in researcher.online_nodes()  # the forged "offline" never arrived
    finally:
        rogue.close()
        node_b.close()
        researcher.close()
