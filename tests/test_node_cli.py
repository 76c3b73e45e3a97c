"""``fedsm node ...`` run as subprocesses: init, dataset add/list/remove, plan approve/list/
show/reject, config show with environment overrides, and ``start`` on a real broker."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from plans import plan_bytes, sha256, write_csv

from fedsm.core.messages import PingReply, PingRequest
from fedsm.node.database import DB_FILE, NodeDatabase
from fedsm.node.registry import ApprovalRegistry

TIMEOUT_S = 120


def fedsm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    result = fedsm(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_init_and_datasets(tmp_path):
    node_dir = tmp_path / "node"
    assert "initialised node node-cli" in ok("node", "init", "--dir", node_dir, "--id", "node-cli")
    again = fedsm("node", "init", "--dir", node_dir)
    assert again.returncode == 2 and "already holds a node" in again.stderr

    csv = write_csv(tmp_path / "data.csv", rows=30)
    out = ok(
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
        csv,
        "--target",
        "target",
        "--id",
        "ds-1",
    )
    assert "added dataset ds-1 (30 samples" in out
    listed = json.loads(ok("node", "dataset", "list", "--dir", node_dir, "--json"))
    assert [(d["dataset_id"], d["tags"], d["shape"]) for d in listed] == [
        ("ds-1", ["a", "b"], [30, 3])
    ]
    assert "ds-1" in ok("node", "dataset", "list", "--dir", node_dir)
    bad = fedsm(
        "node",
        "dataset",
        "add",
        "--dir",
        node_dir,
        "--name",
        "x",
        "--tags",
        "a",
        "--type",
        "csv",
        "--path",
        csv,
        "--target",
        "no-such-column",
    )
    assert bad.returncode == 2 and "no-such-column" in bad.stderr

    ok("node", "dataset", "remove", "--dir", node_dir, "ds-1")
    assert json.loads(ok("node", "dataset", "list", "--dir", node_dir, "--json")) == []
    missing = fedsm("node", "dataset", "remove", "--dir", node_dir, "ds-1")
    assert missing.returncode == 2 and "no dataset" in missing.stderr


def test_plan_approval_while_the_database_is_open(tmp_path):
    node_dir = tmp_path / "node"
    ok("node", "init", "--dir", node_dir, "--id", "node-cli")
    plan = tmp_path / "plan.py"
    plan.write_bytes(plan_bytes("linear_plan.py"))
    digest = sha256(plan.read_bytes())
    db = NodeDatabase(node_dir / DB_FILE)  # as a running node holds it
    try:
        plans = ApprovalRegistry(db)
        assert plans.status(digest) == "unknown"
        assert digest in ok("node", "plan", "approve", "--dir", node_dir, plan, "--by", "dr-x")
        assert plans.status(digest) == "approved"
        record = plans.get(digest)
        assert (record.decided_by, record.source) == ("dr-x", plan.read_bytes())

        shown = ok("node", "plan", "show", digest, "--dir", node_dir)
        assert "status: approved" in shown and "class LinearPlan" in shown
        listed = json.loads(ok("node", "plan", "list", "--dir", node_dir, "--json"))
        assert [(p["sha256"], p["status"]) for p in listed] == [(digest, "approved")]

        ok("node", "plan", "reject", "--dir", node_dir, "--sha256", digest, "--notes", "no")
        assert plans.status(digest) == "rejected"
        short = digest[:12]  # the table shows short digests
        assert short in ok("node", "plan", "list", "--dir", node_dir, "--status", "rejected")
        assert short not in ok("node", "plan", "list", "--dir", node_dir, "--status", "approved")
    finally:
        db.close()
    unknown = fedsm("node", "plan", "approve", "--dir", node_dir, "--sha256", "0" * 64)
    assert unknown.returncode == 2 and "no training plan" in unknown.stderr


def test_config_show_with_environment_overrides(tmp_path):
    node_dir = tmp_path / "node"
    ok("node", "init", "--dir", node_dir, "--id", "node-cfg")
    env = {"FEDSM_TRAINING_TIME_LIMIT_S": "12.5", "FEDSM_BROKER_PASSWORD": "s3cret"}
    shown = ok("node", "config", "show", "--dir", node_dir, env=env)
    assert 'node_id = "node-cfg"' in shown
    assert "training_time_limit_s = 12.5" in shown
    assert "approval_required = true" in shown
    assert "s3cret" not in shown and 'broker_password = "***"' in shown
    bad = fedsm(
        "node", "config", "show", "--dir", node_dir, env={"FEDSM_APPROVAL_REQUIRED": "false"}
    )
    assert bad.returncode == 2 and "allow_unapproved" in bad.stderr


@pytest.fixture
def broker(tmp_path):
    from fedsm.transport.mosquitto import start_mosquitto

    process = start_mosquitto(tmp_path / "mosquitto")
    yield process
    process.stop()


def test_start_serves_over_mqtt_and_leaves_cleanly(tmp_path, broker):
    from fedsm.transport import MqttBus

    node_dir = tmp_path / "node"
    ok("node", "init", "--dir", node_dir, "--id", "node-mqtt")
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
            str(tmp_path / "repo"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    researcher = MqttBus("researcher-cli", "researcher", host=broker.host, port=broker.port)
    try:
        assert lines.get(timeout=TIMEOUT_S).strip() == "node node-mqtt online"
        replies: queue.Queue = queue.Queue()
        researcher.subscribe(replies.put)
        request = PingRequest(
            request_id="ping-" + uuid.uuid4().hex[:8],
            researcher_id="researcher-cli",
            node_id="node-mqtt",
            deadline=time.time() + 60,
        )
        researcher.send("node-mqtt", request)
        reply = replies.get(timeout=30)
        assert isinstance(reply, PingReply) and reply.request_id == request.request_id
        researcher.wait_online(["node-mqtt"], timeout_s=30)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        researcher.wait_offline(["node-mqtt"], timeout_s=30)
        assert "node-mqtt" in researcher.offline_nodes()
    finally:
        researcher.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
