"""Reliability over MQTT: the demo with real node and repository processes on a private broker.

(b) node-2 is killed with SIGKILL once it has received its round-2 request (its witness of
    the request is in its registry) and before it answered, then started again: the
    researcher sees it come back online and sends it the same request again.
(c) the broker is restarted mid-round 2 (a clean stop, and a crash: SIGKILL, nothing saved).
(d) a hostile participant on the broker during the whole run: garbage, oversized payloads,
    wrong schema, replayed requests and replies, spoofed replies for another node, and
    request ids claimed on the nodes' request topics.

Each run ends on the digest of a quiet run (the memory demo's: the MQTT demo ends on the same
bits) and its log verifies. Every process a test starts is stopped by the test, by its PID.

Reproduce: ``.venv/bin/python -m pytest -q tests/test_reliability_mqtt.py`` (mosquitto is
installed by the fixture if missing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack
import paho.mqtt.client as mqtt
import psutil
import pytest
from broker_fixture import mosquitto  # noqa: F401
from researcher_kill import append_hook

from fedsm.cli import main as cli_main
from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.cli.procs import Child
from fedsm.core.messages import ErrorReply, TrainReply, TrainRequest
from fedsm.core.protocol import decode, encode
from fedsm.log import scan

ROUNDS, NODES = 3, 3
MEMORY = DemoConfig(nodes=NODES, rounds=ROUNDS, seed=0)


def mqtt_config(broker: str) -> DemoConfig:
    return dataclasses.replace(MEMORY, transport="mqtt", broker=broker, reply_deadline_s=60.0)


@pytest.fixture(scope="module")
def quiet_digest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final digest of a quiet run (memory demo; the MQTT demo ends on the same bits)."""
    return run_demo(
        tmp_path_factory.mktemp("quiet"), MEMORY, say=lambda s: None
    ).final_params_sha256


# --------------------------------------------------------------------------- helpers


def _names(run_dir: Path) -> list[str]:
    return [type(r.event).__name__ for r in scan(run_dir / "researcher" / "job.log").records]


def _verify(run_dir: Path) -> None:
    out = io.StringIO()
    log_path = run_dir / "researcher" / "job.log"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli_main(
            ["replay", str(log_path), "--verify", "--repo", str(run_dir / "repository")]
        )
    assert code == 0, out.getvalue()[-2000:]


def _count(node_dir: Path, sql: str) -> int:
    """A count from a node's registry, read-only (0 while it cannot be read)."""
    try:
        conn = sqlite3.connect(f"{(node_dir / 'node.sqlite').as_uri()}?mode=ro", uri=True)
        try:
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def _witnessed_trains(node_dir: Path) -> int:
    return _count(node_dir, "SELECT COUNT(*) FROM witnessed_heads WHERE command = 'train'")


def _cached(node_dir: Path) -> int:
    return _count(node_dir, "SELECT COUNT(*) FROM reply_cache")


def _node_process(node_dir: Path) -> psutil.Process:
    """The ``fedsm node start --dir NODE_DIR`` child of this process."""
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            if "start" in cmd and str(node_dir) in cmd:
                return proc
    raise AssertionError(f"no node process for {node_dir}")


def _wait_for(what: str, ready: Callable[[], bool], timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _on_round_sent(round_number: int, act: Callable[[], None]) -> Callable[[Sequence], None]:
    """An append hook that starts ``act`` in a thread when round ``round_number`` is sent."""
    started = threading.Event()

    def after(events: Sequence[object]) -> None:
        for event in events:
            if type(event).__name__ == "RoundSent" and getattr(event, "round", 0) == round_number:
                if not started.is_set():
                    started.set()
                    threading.Thread(target=act, name="fault", daemon=True).start()

    return after


def _run(run_dir: Path, broker: str, after: Callable[[Sequence], None]) -> str:
    with append_hook(after):
        result = run_demo(run_dir, mqtt_config(broker), say=lambda s: None)
    return result.final_params_sha256


# --------------------------------------------------------------------------- (b) node restart


@pytest.mark.mqtt
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_killed_mid_round_and_restarted_ends_on_the_quiet_digest(
    tmp_path: Path,
    quiet_digest: str,
    mosquitto,  # noqa: F811
) -> None:
    run_dir = (tmp_path / "run").resolve()
    node_dir = run_dir / "nodes" / "node-2"
    seen: dict[str, object] = {}
    errors: list[str] = []
    done = threading.Event()
    restarted: list[Child] = []

    def kill_and_restart() -> None:
        try:
            node = _node_process(node_dir)
            cmd = node.cmdline()
            workers = node.children(recursive=True)
            # Its training worker frozen from the moment round 2 is sent, node-2 receives the
            # request and can not answer it (a round trains in milliseconds: a kill aimed
            # between the two would be a race).
            assert workers, "node-2 has no training worker to hold"
            for worker in workers:
                worker.send_signal(signal.SIGSTOP)
            _wait_for("node-2 to receive round 2", lambda: _witnessed_trains(node_dir) >= 2)
            node.send_signal(signal.SIGKILL)
            for proc in [node, *workers]:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                with contextlib.suppress(psutil.Error):
                    proc.wait(10)
            seen["cached_at_kill"] = _cached(node_dir)  # 1: round 2 was not answered yet
            token = json.loads((run_dir / "mqtt.json").read_text())["repository_token"]
            args = cmd[cmd.index("fedsm") + 1 :]
            # Started from this thread, which lives until the test ends (the child gets
            # SIGTERM when the thread that started it ends).
            child = Child(args, name="node-2 again", env={"FEDSM_REPOSITORY_TOKEN": token})
            restarted.append(child)
            child.wait_for_line("node node-2 online", 60)
            seen["restarted_at"] = time.monotonic()
        except BaseException as exc:  # reported by the test
            errors.append(f"{type(exc).__name__}: {exc}")
        done.wait(300)
        for child in restarted:
            child.stop()

    thread_after = _on_round_sent(2, kill_and_restart)
    started = time.monotonic()
    try:
        digest = _run(run_dir, mosquitto.url, thread_after)
    finally:
        done.set()
        time.sleep(0.2)
        for child in restarted:  # never left behind, even if the thread is stuck
            child.stop()
    assert not errors, errors
    assert seen.get("cached_at_kill") == 1, seen  # killed before it answered round 2
    names = _names(run_dir)
    print(f"\nnode restart: {time.monotonic() - started:.1f} s, log {Counter(names)}")
    assert "RoundResent" in names, names
    assert "NodeFailed" not in names and "RoundTimedOut" not in names, names
    assert digest == quiet_digest
    _verify(run_dir)


# --------------------------------------------------------------------------- (c) broker restart


@pytest.mark.mqtt
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", ["stop", "crash"])
def test_the_broker_restarted_mid_round_ends_on_the_quiet_digest(
    tmp_path: Path,
    quiet_digest: str,
    mosquitto,  # noqa: F811
    how: str,
) -> None:
    run_dir = (tmp_path / "run").resolve()
    errors: list[str] = []

    def restart_broker() -> None:
        try:
            nodes = [run_dir / "nodes" / f"node-{k}" for k in range(1, NODES + 1)]
            _wait_for("a node to receive round 2", lambda: max(map(_witnessed_trains, nodes)) >= 2)
            if how == "crash":
                mosquitto.kill()
            else:
                mosquitto.stop()
            time.sleep(1.0)
            mosquitto.start()
        except BaseException as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    digest = _run(run_dir, mosquitto.url, _on_round_sent(2, restart_broker))
    assert not errors, errors
    names = _names(run_dir)
    print(f"\nbroker {how}: {time.monotonic() - started:.1f} s, log {Counter(names)}")
    assert "NodeFailed" not in names and "RoundTimedOut" not in names, names
    assert digest == quiet_digest
    _verify(run_dir)


# --------------------------------------------------------------------------- (d) hostile


EVIL = "researcher-evil"
MAX_SENDS = 1500
OVERSIZED = 600 * 1024  # over the protocol's 256 KiB, under the broker's packet limit


class Hostile:
    """A raw paho client that sniffs everything (``#``: no ACL on this broker) and attacks
    what it learns, each kind a bounded number of times; ``sent`` counts them by kind."""

    def __init__(self, port: int) -> None:
        self.sent: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._seen_topics: set[str] = set()
        self._requests: list[tuple[str, bytes, TrainRequest]] = []
        self._replies: list[tuple[str, bytes, TrainReply]] = []
        self._rounds_seen: set[int] = set()
        self._ours: set[bytes] = set()  # digests of what we published (not news to us)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"hostile-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("#", qos=0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _publish(self, kind: str, topic: str, payload: bytes) -> None:
        with self._lock:
            if sum(self.sent.values()) >= MAX_SENDS:
                return
            self.sent[kind] += 1
            self._ours.add(hashlib.sha256(payload).digest())
        self.client.publish(topic, payload, qos=1)

    # Everything runs on paho's network thread: what is learnt is attacked at once.
    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        if msg.topic.count("/") < 2 or msg.payload in (b"online", b"offline"):
            return
        with self._lock:
            if hashlib.sha256(msg.payload).digest() in self._ours:
                return
        try:
            message = decode(msg.payload)
        except Exception:  # noqa: BLE001 - our own garbage, echoed back to us
            return
        if message.researcher_id == EVIL:
            return  # the answers to our own claims
        if isinstance(message, TrainRequest) and "/req/" in msg.topic:
            self._on_request(msg.topic, msg.payload, message)
        elif isinstance(message, (TrainReply, ErrorReply)) and "/reply/" in msg.topic:
            if isinstance(message, TrainReply):
                self._on_reply(msg.topic, msg.payload, message)

    def _first_contact(self, topic: str, prefix: str, request: TrainRequest) -> None:
        if topic in self._seen_topics:
            return
        self._seen_topics.add(topic)
        reply_topic = f"{prefix}/reply/{request.researcher_id}/{request.node_id}"
        for target in (topic, f"{prefix}/broadcast", reply_topic):
            for i in range(20):
                self._publish("garbage", target, os.urandom(1 + i * 37))
            for _ in range(2):
                self._publish("oversized", target, b"\x81" + b"\x00" * OVERSIZED)
            body = request.to_dict()
            wrong = [
                {"command": "train", "request_id": 5},
                {**body, "round": "two"},
                {**body, "seed": -1, "training_args": [1, 2]},
                {**body, "command": "no-such-command"},
                {**body, "protocol_version": 999},
            ]
            for bad in wrong:
                self._publish("wrong schema", target, msgpack.packb(bad, use_bin_type=True))

    def _on_request(self, topic: str, payload: bytes, request: TrainRequest) -> None:
        prefix = topic.rsplit("/req/", 1)[0]
        self._first_contact(topic, prefix, request)
        # another researcher claims the id, with other content (served as its own)
        claim = dataclasses.replace(request, researcher_id=EVIL, seed=request.seed + 1)
        self._publish("claimed id (other researcher)", topic, encode(claim))
        # ids of coming rounds, as train request ids used to be made (job, round, node):
        # claimed in the researcher's name with other content (no longer the real ids)
        for later in (request.round + 1, request.round + 2):
            digest = hashlib.sha256(f"{request.job_id}\x00{later}\x00{request.node_id}".encode())
            claimed = dataclasses.replace(
                request,
                request_id=f"train-{digest.hexdigest()[:32]}",
                round=later,
                seed=request.seed + 7,
            )
            self._publish("pre-claimed future id", topic, encode(claimed))
        with self._lock:
            new_round = request.round not in self._rounds_seen
            self._rounds_seen.add(request.round)
            old_requests = [r for r in self._requests if r[2].round < request.round]
            old_replies = [r for r in self._replies if r[2].round < request.round]
            self._requests.append((topic, payload, request))
        if new_round:  # replay what earlier rounds said, once per new round
            for old_topic, old_payload, _ in old_requests:
                self._publish("replayed request", old_topic, old_payload)
            for old_topic, old_payload, _ in old_replies:
                self._publish("replayed reply", old_topic, old_payload)

    def _on_reply(self, topic: str, payload: bytes, reply: TrainReply) -> None:
        with self._lock:
            self._replies.append((topic, payload, reply))
        base, node = topic.rsplit("/", 1)
        others = [f"node-{k}" for k in range(1, NODES + 1) if f"node-{k}" != node]
        for other in others:
            # this reply again, on another node's topic (the topic names the sender)
            self._publish("spoofed reply (other node's topic)", f"{base}/{other}", payload)
            # a reply in another node's name, on that node's topic, for no request sent
            forged = dataclasses.replace(
                reply, node_id=other, request_id=f"train-{uuid.uuid4().hex}"
            )
            self._publish("spoofed reply (unknown request)", f"{base}/{other}", encode(forged))
            # an error in that node's name from our own segment
            error = ErrorReply(
                request_id=reply.request_id,
                researcher_id=reply.researcher_id,
                node_id=other,
                code=999,
                message="spoofed",
                job_id=reply.job_id,
                round=reply.round,
            )
            self._publish("spoofed reply (own topic)", f"{base}/hostile", encode(error))


@pytest.mark.mqtt
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_hostile_participant_does_not_change_the_outcome(
    tmp_path: Path,
    quiet_digest: str,
    mosquitto,  # noqa: F811
) -> None:
    run_dir = (tmp_path / "run").resolve()
    hostile = Hostile(mosquitto.port)
    started = time.monotonic()
    try:
        digest = _run(run_dir, mosquitto.url, lambda events: None)
    finally:
        hostile.close()
    names = _names(run_dir)
    print(
        f"\nhostile: {time.monotonic() - started:.1f} s, {sum(hostile.sent.values())} sent: "
        f"{dict(hostile.sent)}; log {Counter(names)}"
    )
    for kind in (
        "garbage",
        "oversized",
        "wrong schema",
        "claimed id (other researcher)",
        "pre-claimed future id",
        "replayed request",
        "replayed reply",
        "spoofed reply (other node's topic)",
        "spoofed reply (unknown request)",
        "spoofed reply (own topic)",
    ):
        assert hostile.sent[kind] > 0, (kind, dict(hostile.sent))
    assert "NodeFailed" not in names and "RoundTimedOut" not in names, names
    assert digest == quiet_digest
    _verify(run_dir)
