"""``fedsm check node``: the conformance probe against a real ``fedsm node start`` process
(every property passes), against small fake nodes that break one property (the probe fails
naming it), against no node at all, and with arguments it cannot use.

Every process started here (mosquitto, the node, the probe) is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from broker_fixture import Broker, start_mosquitto
from plans import write_csv

from fedsm.core.messages import (
    ListReply,
    ListRequest,
    Message,
    PingReply,
    PingRequest,
    SearchReply,
    SearchRequest,
)
from fedsm.core.protocol import PROTOCOL_VERSION, encode
from fedsm.testing.probe import PROPERTIES
from fedsm.transport import MqttBus

pytestmark = pytest.mark.mqtt

TIMEOUT_S = 120
PROBE_TIMEOUT = "1.5"  # the probe's --timeout: each answer, and the silence after malformed ones


def fedsm(*args: object, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsm", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # past the deadline: stop it by its PID
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check(broker: Broker, node_id: str, *extra: str) -> subprocess.CompletedProcess:
    return fedsm(
        "check",
        "node",
        "--broker",
        broker.url,
        "--node",
        node_id,
        "--timeout",
        PROBE_TIMEOUT,
        *extra,
    )


def results(done: subprocess.CompletedProcess) -> dict[str, dict]:
    listed = json.loads(done.stdout)
    assert [r["property"] for r in listed] == list(PROPERTIES)
    for r in listed:
        assert set(r) == {"property", "ok", "exchange"}
        assert set(r["exchange"]) == {"sent", "received", "detail"}
    return {r["property"]: r for r in listed}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    process = start_mosquitto(tmp_path_factory.mktemp("broker"))
    try:
        yield process
    finally:
        process.stop()  # by PID


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[str]:
    """A real ``fedsm node start`` process with one dataset; yields its node id."""
    tmp = tmp_path_factory.mktemp("node")
    node_dir, node_id = tmp / "node", "node-probed"
    for args in (
        ("node", "init", "--dir", node_dir, "--id", node_id),
        (
            "node",
            "dataset",
            "add",
            "--dir",
            node_dir,
            "--name",
            "bc",
            "--tags",
            "a,b",
            "--type",
            "csv",
            "--path",
            write_csv(tmp / "data.csv", rows=30),
            "--target",
            "target",
            "--id",
            "ds-1",
        ),
    ):
        done = fedsm(*args)
        assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedsm",
            "node",
            "start",
            "--dir",
            str(node_dir),
            "--broker",
            broker.url,
            "--repo",
            str(tmp / "repo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=TIMEOUT_S).strip() == f"node {node_id} online"
        yield node_id
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_a_real_node_passes_every_property(broker: Broker, node: str) -> None:
    done = check(broker, node, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    by_name = results(done)
    assert all(r["ok"] for r in by_name.values()), [r for r in by_name.values() if not r["ok"]]
    # What the fedsm node does with malformed requests: its bus drops them (no reply at all).
    for name in ("wrong-schema-refused", "garbage-refused", "oversized-refused"):
        assert by_name[name]["exchange"]["detail"].startswith("dropped"), by_name[name]
    # The unknown plan is refused (its URL is no repository's), never approved.
    assert "BAD_REQUEST" in by_name["unknown-plan-not-approved"]["exchange"]["detail"]
    assert node in by_name["ping-pong"]["exchange"]["received"]

    text = check(broker, node)
    assert text.returncode == 0, text.stdout + text.stderr
    assert f"{len(PROPERTIES)}/{len(PROPERTIES)} properties pass" in text.stdout
    assert "FAIL" not in text.stdout


class FakeNode:
    """A node on its own MqttBus that answers list and search correctly, ignores everything
    else but ping, and answers ping with a pong that breaks the schema (``variant``)."""

    def __init__(self, broker: Broker, node_id: str, variant: str) -> None:
        self.node_id = node_id
        self.variant = variant
        self.bus = MqttBus(node_id, "node", host=broker.host, port=broker.port)
        self.bus.subscribe(self.handle)

    def handle(self, message: Message) -> None:
        head = {
            "request_id": message.request_id,
            "researcher_id": message.researcher_id,
            "node_id": self.node_id,
        }
        if isinstance(message, ListRequest):
            self.bus.reply(ListReply(**head))
        elif isinstance(message, SearchRequest):
            self.bus.reply(SearchReply(**head))
        elif isinstance(message, PingRequest):
            if self.variant == "missing-field":  # a pong map without node_id
                head.pop("node_id")
                data = msgpack.packb(
                    {"protocol_version": PROTOCOL_VERSION, "command": "pong", **head}
                )
            else:  # "other-node": a valid pong naming another node
                data = encode(PingReply(**{**head, "node_id": "someone-else"}))
            topic = self.bus.topics.reply(message.researcher_id, self.node_id)
            self.bus._client.publish(topic, data, qos=1)  # raw: MqttBus.reply would refuse

    def close(self) -> None:
        self.bus.close()


@pytest.mark.parametrize(
    ("variant", "why"),
    [("missing-field", "'node_id': missing in pong"), ("other-node", "names node 'someone-else'")],
)
def test_a_node_with_a_bad_pong_fails_ping_pong(broker: Broker, variant: str, why: str) -> None:
    fake = FakeNode(broker, f"fake-{variant}", variant)
    try:
        done = check(broker, fake.node_id, "--json")
        text = check(broker, fake.node_id)
    finally:
        fake.close()
    assert done.returncode == 1, done.stdout + done.stderr
    by_name = results(done)
    ping = by_name["ping-pong"]
    assert not ping["ok"]
    assert why in ping["exchange"]["detail"], ping
    assert ping["exchange"]["sent"].startswith("ping ")
    assert "pong on fedsm/reply/" in ping["exchange"]["received"] or variant == "missing-field"
    # Its list and search answers are fine, and the malformed requests were dropped (by its
    # bus) but the pings after them failed as the first did.
    assert by_name["status-online"]["ok"]
    assert by_name["list-well-formed"]["ok"] and by_name["search-well-formed"]["ok"]
    assert not by_name["garbage-refused"]["ok"]
    assert "the ping after it failed" in by_name["garbage-refused"]["exchange"]["detail"]
    # It never answers the plan status: nothing within the timeout.
    plan = by_name["unknown-plan-not-approved"]
    assert not plan["ok"] and plan["exchange"]["received"] == f"nothing within {PROBE_TIMEOUT} s"

    assert text.returncode == 1
    assert "FAIL ping-pong: " in text.stdout and "    sent:     ping " in text.stdout
    assert "PASS list-well-formed" in text.stdout


def test_no_node_fails_with_nothing_within_the_timeout(broker: Broker) -> None:
    done = check(broker, "nobody-here", "--json")
    assert done.returncode == 1, done.stderr
    by_name = results(done)
    assert not any(r["ok"] for n, r in by_name.items() if n != "no-unsolicited-replies")
    assert by_name["ping-pong"]["exchange"]["received"] == f"nothing within {PROBE_TIMEOUT} s"
    assert by_name["status-online"]["exchange"]["detail"] == "no retained status"


def test_arguments_it_cannot_use(tmp_path: Path) -> None:
    bad = fedsm("check", "node", "--broker", "mqtt://127.0.0.1:1", "--node", "n", "--timeout", "0")
    assert bad.returncode == 2 and "timeout" in bad.stderr
    bad = fedsm("check", "node", "--broker", "http://x", "--node", "n")
    assert bad.returncode == 2 and "mqtt://" in bad.stderr
    bad = fedsm("check", "node", "--broker", "mqtt://127.0.0.1:1", "--node", "not/an id")
    assert bad.returncode == 2 and "invalid" in bad.stderr
    # Nothing listens on port 1: the probe cannot run at all (2), within its timeout.
    down = fedsm("check", "node", "--broker", "mqtt://127.0.0.1:1", "--node", "n", timeout=60)
    assert down.returncode == 2 and "could not reach the broker" in down.stderr
