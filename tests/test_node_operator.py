"""The hospital operator's first hour with ``fedsm node``: one ``start`` per node directory
(the second names the PID holding it), a start that exits non-zero when its repository does
not answer or its broker is gone for good, secrets from files, approval from the file the
researcher sent (before any request) with digest prefixes, a locked registry as one line,
listings that open the registry read-only, and ``config show`` as TOML.

Every process started here is stopped by PID; brokers and servers bind 127.0.0.1."""

from __future__ import annotations

import hashlib
import itertools
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from broker_fixture import start_mosquitto
from plans import plan_bytes, sha256

from fedsm.node.database import DB_FILE, NodeDatabase
from fedsm.node.errors import (
    AmbiguousPlanDigest,
    NodeDirLocked,
    NodeStartFailed,
    PlanNotRegistered,
)
from fedsm.node.registry import ApprovalRegistry, plan_classes, short_digests
from fedsm.node.service import NodeDirLock, check_repository, watch_bus
from fedsm.node.settings import load_settings
from fedsm.repository import open_repository
from fedsm.repository.server import RepositoryServer
from fedsm.transport.mosquitto import free_port

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TIMEOUT_S = 120


def fedsm(*args: object, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S):
    return subprocess.run(
        [sys.executable, "-m", "fedsm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def ok(*args: object, env: dict[str, str] | None = None) -> str:
    result = fedsm(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedsm: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], result.stderr


def init(tmp_path: Path, node_id: str = "hosp-a") -> Path:
    node_dir = tmp_path / "node"
    ok("node", "init", "--dir", node_dir, "--id", node_id)
    return node_dir


# --------------------------------------------------------------------------- start


class NodeProcess:
    """``fedsm node start`` as a child: stdout lines in a queue, stderr in a file."""

    def __init__(self, tmp_path: Path, *args: object) -> None:
        self.stderr_path = tmp_path / f"node-{time.monotonic_ns()}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedsm", "node", "start", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [self.lines.put(x.rstrip("\n")) for x in self.proc.stdout],
            daemon=True,
        ).start()

    def expect_line(self, text: str, timeout_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.1, remaining))
            except queue.Empty:
                pytest.fail(f"no line {text!r}; stderr: {self.stderr()}")
            if line == text:
                return
            if remaining <= 0:
                pytest.fail(f"no line {text!r}; stderr: {self.stderr()}")

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def stop(self) -> None:
        """Kill the child by its PID if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._stderr.close()


def test_one_start_per_node_dir_and_exit_when_the_broker_is_gone(tmp_path):
    """A password-protected broker (the password read from a file); a second start on the same
    directory fails at once naming the running node's PID; when the broker goes away for good
    the node exits non-zero instead of idling."""
    passwd = tmp_path / "passwd"
    done = subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwd), "hosp-a", "pw-from-file"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    broker = start_mosquitto(
        tmp_path / "broker", config_extra=f"allow_anonymous false\npassword_file {passwd}"
    )
    node_dir = init(tmp_path)
    secret = tmp_path / "broker-password"
    secret.write_text("pw-from-file\n")
    secret.chmod(0o600)
    url = f"mqtt://hosp-a@{broker.host}:{broker.port}"
    repo = tmp_path / "repo"
    node = None
    try:
        # the wrong password is refused by the broker: the file really is what is used
        wrong = tmp_path / "wrong-password"
        wrong.write_text("nope")
        refused = fedsm(
            "node", "start", "--dir", node_dir, "--broker", url, "--repo", repo,
            "--broker-password-file", wrong,
        )  # fmt: skip
        one_line_error(refused)
        assert "refused" in refused.stderr or "authori" in refused.stderr.lower()

        node = NodeProcess(
            tmp_path, "--dir", node_dir, "--broker", url, "--repo", repo,
            "--broker-password-file", secret, "--give-up-after", "2",
        )  # fmt: skip
        node.expect_line("node hosp-a online")
        assert "password is on the command line" not in node.stderr()

        started = time.monotonic()
        second = fedsm("node", "start", "--dir", node_dir, "--broker", url, "--repo", repo)
        assert time.monotonic() - started < 30  # at once: no torch import, no connection
        one_line_error(second, f"PID {node.proc.pid}", "already running")
        assert node.proc.poll() is None  # the running node is untouched

        broker.stop()  # gone for good
        assert node.proc.wait(timeout=90) == 2, node.stderr()
        node.expect_line("node hosp-a offline", timeout_s=10)
        assert "broker connection was lost" in node.stderr(), node.stderr()
        assert "Traceback" not in node.stderr()
    finally:
        if node is not None:
            node.stop()
        broker.stop()
    # the lock went with the process: the directory can be locked again
    with NodeDirLock(node_dir) as lock:
        assert lock.holder() == os.getpid()


def test_start_checks_that_the_repository_answers(tmp_path):
    node_dir = init(tmp_path)
    nowhere = f"http://127.0.0.1:{free_port()}"
    down = fedsm("node", "start", "--dir", node_dir, "--broker", "mqtt://127.0.0.1:1",
                 "--repo", nowhere)  # fmt: skip
    one_line_error(down, f"the repository at {nowhere} does not answer")

    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    bad_dir = fedsm("node", "start", "--dir", node_dir, "--broker", "mqtt://127.0.0.1:1",
                    "--repo", not_a_dir)  # fmt: skip
    one_line_error(bad_dir, "repository")

    token_file = tmp_path / "token"
    with RepositoryServer(tmp_path / "store", token="right-token") as server:
        token_file.write_text("wrong-token\n")
        wrong = fedsm("node", "start", "--dir", node_dir, "--broker", "mqtt://127.0.0.1:1",
                      "--repo", server.url, "--token-file", token_file)  # fmt: skip
        one_line_error(wrong, "does not answer", "401", "token")

        on_cli = fedsm("node", "start", "--dir", node_dir, "--broker", "mqtt://127.0.0.1:1",
                       "--repo", server.url, "--token", "wrong-token")  # fmt: skip
        one_line_error(on_cli, "401")
        assert "token is on the command line" in on_cli.stderr

        # the right token, from the environment, passes the check
        settings = load_settings(node_dir, env={"FEDSM_REPOSITORY_TOKEN": "right-token"})
        repository = open_repository(server.url, token=settings.repository_token)
        check_repository(repository, server.url)
        with pytest.raises(NodeStartFailed, match="401"):
            check_repository(open_repository(server.url, token=None), server.url)


def test_node_dir_lock_names_its_holder(tmp_path):
    with NodeDirLock(tmp_path) as lock:
        assert lock.holder() == os.getpid()
        with pytest.raises(NodeDirLocked, match=f"PID {os.getpid()}") as info:
            NodeDirLock(tmp_path).acquire()
        assert info.value.pid == os.getpid()
    NodeDirLock(tmp_path).acquire().release()


class FakeBus:
    def __init__(self) -> None:
        self.connected = True
        self.error: Exception | None = None


def test_watch_bus_returns_on_stop_on_a_fatal_error_and_after_the_give_up_time():
    stop = threading.Event()
    bus = FakeBus()
    stop.set()
    assert watch_bus(bus, stop, give_up_after_s=1, poll_s=0.01) is None

    stop.clear()
    bus.error = RuntimeError("taken over")
    assert "taken over" in watch_bus(bus, stop, give_up_after_s=60, poll_s=0.01)

    bus.error, bus.connected = None, False
    started = time.monotonic()
    reason = watch_bus(bus, stop, give_up_after_s=0.2, poll_s=0.01)
    assert "did not come back within 0.2 s" in reason
    assert 0.2 <= time.monotonic() - started < 5

    ticks = itertools.count()

    class Flapping:  # down for less than the give-up time each time: kept
        error = None

        @property
        def connected(self) -> bool:
            n = next(ticks)
            if n > 40:
                stop.set()
            return n % 5 != 0

    assert watch_bus(Flapping(), stop, give_up_after_s=0.05, poll_s=0.01) is None


# --------------------------------------------------------------------------- approval


def test_approve_from_the_researchers_file_before_any_request(tmp_path):
    """The README's order: the operator approves the file the researcher sent, lists plans
    by class and short digest, and names them by a unique digest prefix."""
    node_dir = init(tmp_path)
    plan = tmp_path / "plan.py"
    plan.write_bytes(plan_bytes("linear_plan.py"))
    digest = sha256(plan.read_bytes())

    approved = fedsm("node", "plan", "approve", "--dir", node_dir, plan, "--by", "dr-x")
    assert approved.returncode == 0, approved.stderr
    assert digest in approved.stdout and "LinearPlan" in approved.stdout
    assert "warning" not in approved.stderr

    listed = ok("node", "plan", "list", "--dir", node_dir)
    header, row = listed.splitlines()
    assert header.split()[:3] == ["digest", "class", "status"]
    assert row.split()[:3] == [digest[:12], "LinearPlan", "approved"]
    assert digest not in listed  # short digests

    shown = ok("node", "plan", "show", "--dir", node_dir, digest[:6])
    assert f"sha256: {digest}" in shown and "plan_classes: LinearPlan" in shown
    ok("node", "plan", "reject", "--dir", node_dir, digest[:8].upper(), "--notes", "no")
    assert "rejected" in ok("node", "plan", "list", "--dir", node_dir)
    ok("node", "plan", "approve", "--dir", node_dir, "--sha256", digest[:10])

    # not a training plan: approved with a warning; the file is parsed, never run
    marker = tmp_path / "imported"
    odd = tmp_path / "notes.py"
    odd.write_text(f"open({str(marker)!r}, 'w').close()\nclass Plan:\n    pass\n")
    warned = fedsm("node", "plan", "approve", "--dir", node_dir, odd)
    assert warned.returncode == 0, warned.stderr
    assert "warning" in warned.stderr and "no TorchTrainingPlan subclass" in warned.stderr
    assert not marker.exists()
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    warned = fedsm("node", "plan", "reject", "--dir", node_dir, broken)
    assert warned.returncode == 0 and "not valid Python" in warned.stderr
    assert "(no plan class)" in ok("node", "plan", "list", "--dir", node_dir)

    one_line_error(fedsm("node", "plan", "show", "--dir", node_dir, "ffff0"), "no training plan")
    one_line_error(fedsm("node", "plan", "approve", "--dir", node_dir, "0" * 64), "no training")
    one_line_error(fedsm("node", "plan", "show", "--dir", node_dir, "ab"), "too short")
    one_line_error(
        fedsm("node", "plan", "approve", "--dir", node_dir, tmp_path / "missing.py"),
        "does not exist",
    )


def colliding_sources(digits: int = 4) -> tuple[bytes, bytes]:
    """Two plan sources whose sha256 share their first ``digits`` hex digits."""
    seen: dict[str, bytes] = {}
    for n in itertools.count():
        source = f"# variant {n}\n".encode()
        prefix = hashlib.sha256(source).hexdigest()[:digits]
        if prefix in seen:
            return seen[prefix], source
        seen[prefix] = source
    raise AssertionError  # pragma: no cover


def test_an_ambiguous_prefix_is_a_one_line_error(tmp_path):
    node_dir = init(tmp_path)
    first, second = colliding_sources()
    db = NodeDatabase(node_dir / DB_FILE)
    try:
        plans = ApprovalRegistry(db)
        plans.record_pending(first, name="first", origin="test")
        plans.record_pending(second, name="second", origin="test")
        shared = sha256(first)[:4]
        with pytest.raises(AmbiguousPlanDigest, match="matches several plans"):
            plans.resolve(shared)
        unused = next(p for p in ("ffff", "eeee") if not shared.startswith(p))
        with pytest.raises(PlanNotRegistered):
            plans.resolve(unused)
        assert plans.resolve(sha256(second)[:12]) == sha256(second)
        short = short_digests([sha256(first), sha256(second)], length=4)
        assert len(set(short.values())) == 2
    finally:
        db.close()
    one_line_error(
        fedsm("node", "plan", "approve", "--dir", node_dir, shared), "matches several plans"
    )
    one_line_error(fedsm("node", "plan", "show", "--dir", node_dir, shared), "give more digits")
    assert "pending" in ok("node", "plan", "show", "--dir", node_dir, sha256(first)[:16])


def test_plan_classes_are_found_by_parsing():
    source = b"""
import fedsm.training as ft
from fedsm.training import TorchTrainingPlan

class Helper:
    pass

class Child(Base):
    pass

class Base(TorchTrainingPlan):
    pass

class Other(ft.TorchTrainingPlan):
    pass
"""
    assert plan_classes(source) == ["Child", "Base", "Other"]
    assert plan_classes(b"x = 1\n") == []
    assert plan_classes(b"def (:") is None


# --------------------------------------------------------------------------- the registry


def test_a_locked_registry_is_one_line_and_listings_open_it_read_only(tmp_path):
    node_dir = init(tmp_path)
    plan = tmp_path / "plan.py"
    plan.write_bytes(plan_bytes("linear_plan.py"))
    digest = sha256(plan.read_bytes())
    ok("node", "plan", "approve", "--dir", node_dir, plan)

    # a long write in another process: writers wait and then say so; readers are not held up
    writer = sqlite3.connect(str(node_dir / DB_FILE), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE training_plans SET notes = 'held'")
        started = time.monotonic()
        for args in (
            ("plan", "list"),
            ("plan", "show", digest[:8]),
            ("dataset", "list"),
            ("config", "show"),
        ):
            ok("node", *args, "--dir", node_dir)
        assert time.monotonic() - started < 30  # none waited for the writer's lock
        blocked = fedsm("node", "plan", "reject", "--dir", node_dir, digest[:8])
        one_line_error(blocked, "is locked by another process")
        writer.execute("ROLLBACK")
    finally:
        writer.close()

    # a node holding the file exclusively: even the read-only listings say so in one line
    holder = sqlite3.connect(str(node_dir / DB_FILE), isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("CREATE TABLE hold (x)")
        holder.execute("COMMIT")
        for args in (("plan", "list"), ("dataset", "list"), ("plan", "approve", plan)):
            one_line_error(fedsm("node", *args, "--dir", node_dir), "locked")
    finally:
        holder.close()


def test_readonly_database_refuses_writes(tmp_path):
    NodeDatabase(tmp_path / DB_FILE).close()
    db = NodeDatabase(tmp_path / DB_FILE, readonly=True)
    try:
        assert ApprovalRegistry(db).list() == []
        with pytest.raises(Exception, match="read-only"):
            ApprovalRegistry(db).record_pending(b"x", name="x", origin="t")
    finally:
        db.close()


# --------------------------------------------------------------------------- config


def test_config_show_is_toml_that_round_trips(tmp_path):
    node_dir = init(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("tok-from-file\n")
    env = {
        "FEDSM_BROKER_URL": 'mqtts://broker.example:8883/"odd"\\path',
        "FEDSM_BROKER_PASSWORD": "pw-from-env",
        "FEDSM_REPOSITORY_TOKEN_FILE": str(token_file),
        "FEDSM_TRAINING_TIME_LIMIT_S": "12.5",
        "FEDSM_BROKER_GIVE_UP_S": "inf",
    }
    effective = load_settings(node_dir, env=env)
    assert effective.repository_token == "tok-from-file"

    masked = ok("node", "config", "show", "--dir", node_dir, env=env)
    data = tomllib.loads(masked)
    assert "pw-from-env" not in masked and "tok-from-file" not in masked
    assert data["broker_password"] == "***"
    assert "repository_token" not in data  # from its file, which is named instead
    assert data["repository_token_file"] == str(token_file)
    expected = {k: v for k, v in effective.to_dict().items() if v is not None}
    del expected["repository_token"]
    assert data == expected

    shown = ok("node", "config", "show", "--dir", node_dir, "--show-secrets", env=env)
    other = tmp_path / "other"
    other.mkdir()
    (other / "node.toml").write_text(shown)
    assert load_settings(other, env={}) == effective
