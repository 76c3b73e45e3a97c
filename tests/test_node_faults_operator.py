"""Faults the node's operator meets, each one line and a non-zero exit, never a traceback:
the registry locked by another process (a real ``BEGIN EXCLUSIVE`` held by a child), a full
disk (a real file-size limit on the command, and sqlite's page limit), a plan over
``max_plan_bytes`` (refused, nothing stored), too many plans pending, and a plan file with
CRLF line endings (which plan it is must be chosen: ``--normalise-newlines`` gives what
``fedsm plan hash`` prints, ``--keep-newlines`` what ``--verbatim`` prints).

Every process started here is stopped by its PID."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from plans import PLANS_DIR, plan_bytes, sha256

from fedsm.node.database import DB_FILE, NodeDatabase, RegistryIOError
from fedsm.node.errors import RegistryBusy
from fedsm.node.registry import ApprovalRegistry, PlanTooLarge
from fedsm.node.settings import (
    DEFAULT_BUSY_TIMEOUT_S,
    DEFAULT_MAX_PENDING_PLANS,
    DEFAULT_MAX_PLAN_BYTES,
    NodeDirIOError,
    load_settings,
)

TIMEOUT_S = 120
MiB = 1 << 20

_HOLD = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def fedsm(
    *args: object, env: dict[str, str] | None = None, file_size_limit: int | None = None
) -> subprocess.CompletedProcess:
    def limit() -> None:  # runs in the child: a real "file too large" for its writes
        if file_size_limit is not None:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, hard))

    return subprocess.run(
        [sys.executable, "-m", "fedsm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, **(env or {})},
        preexec_fn=limit if file_size_limit is not None else None,
    )


def ok(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = fedsm(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("fedsm: error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], result.stderr
    return errors[0]


def init(tmp_path: Path, node_id: str = "hosp-a") -> Path:
    node_dir = tmp_path / "node"
    ok("node", "init", "--dir", node_dir, "--id", node_id)
    return node_dir


def registry_bytes(node_dir: Path) -> int:
    """The registry's size on disk: the database and its write-ahead log."""
    files = (node_dir / DB_FILE, node_dir / f"{DB_FILE}-wal")
    return sum(f.stat().st_size for f in files if f.exists())


@contextmanager
def registry_locked(path: Path, hold_s: float = 60.0) -> Iterator[subprocess.Popen]:
    """Another process holding ``BEGIN EXCLUSIVE`` on the registry; killed by its PID."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), str(hold_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def big_plan(size: int) -> bytes:
    """Valid Python, a training plan padded with comments to ``size`` bytes."""
    head = plan_bytes("linear_plan.py")
    line = b"# " + b"x" * 97 + b"\n"
    padding = line * ((size - len(head)) // len(line) + 1)
    return (head + padding)[:size]


# --------------------------------------------------------------------------- a locked registry


def test_a_registry_locked_by_another_process_is_one_line_for_the_operator(tmp_path):
    node_dir = init(tmp_path)
    plan = tmp_path / "plan.py"
    plan.write_bytes(plan_bytes("linear_plan.py"))
    ok("node", "plan", "approve", "--dir", node_dir, plan)
    digest = sha256(plan.read_bytes())
    env = {"FEDSM_REGISTRY_BUSY_TIMEOUT_S": "1"}

    with registry_locked(node_dir / DB_FILE):
        for args in (
            ("plan", "approve", plan),
            ("plan", "reject", digest[:8]),
            ("dataset", "remove", "dataset-x"),
        ):
            started = time.monotonic()
            result = fedsm("node", *args, "--dir", node_dir, env=env)
            took = time.monotonic() - started
            one_line_error(result, "is locked by another process", "gave up after 1 s", "try again")
            assert took < 30  # the 1 s wait, not the default's
        # readers are not held up by a writer (WAL)
        assert "approved" in ok("node", "plan", "list", "--dir", node_dir, env=env).stdout

    # the lock went with the process: the same command works
    ok("node", "plan", "reject", "--dir", node_dir, digest[:8])


def test_the_registry_raises_registry_busy_within_its_busy_timeout(tmp_path):
    path = tmp_path / DB_FILE
    db = NodeDatabase(path, busy_timeout_s=0.5)
    try:
        plans = ApprovalRegistry(db)
        with registry_locked(path):
            started = time.monotonic()
            with pytest.raises(RegistryBusy, match="locked by another process") as caught:
                plans.record_pending(b"x = 1\n", name="x", origin="test")
            took = time.monotonic() - started
            assert 0.4 <= took < 3.0, took
            assert str(path) in str(caught.value)
            assert "\n" not in str(caught.value)
            # reads go on (WAL); opening for writing waits and says so too
            assert plans.status(sha256(b"x = 1\n")) == "unknown"
            with pytest.raises(RegistryBusy):
                NodeDatabase(path, busy_timeout_s=0.2)
        assert plans.record_pending(b"x = 1\n", name="x", origin="test") == "pending"
    finally:
        db.close()
    assert DEFAULT_BUSY_TIMEOUT_S == NodeDatabase(path).busy_timeout_s == 5.0


def test_registry_busy_timeout_is_a_setting(tmp_path):
    node_dir = init(tmp_path)
    assert load_settings(node_dir, env={}).registry_busy_timeout_s == DEFAULT_BUSY_TIMEOUT_S
    settings = load_settings(node_dir, env={"FEDSM_REGISTRY_BUSY_TIMEOUT_S": "0.25"})
    assert settings.registry_busy_timeout_s == 0.25
    for bad in ("0", "inf", "soon"):
        one_line_error(
            fedsm(
                "node",
                "plan",
                "list",
                "--dir",
                node_dir,
                env={"FEDSM_REGISTRY_BUSY_TIMEOUT_S": bad},
            ),
            "registry_busy_timeout_s",
        )


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_line_for_the_operator(tmp_path):
    """A real limit on the size of the files the command writes: sqlite's write of a plan,
    the settings of a new node and the node's key fail as the kernel says, in one line."""
    node_dir = init(tmp_path)
    plan = tmp_path / "plan.py"
    plan.write_bytes(big_plan(400_000))
    limit = registry_bytes(node_dir) + 100_000
    result = fedsm("node", "plan", "approve", "--dir", node_dir, plan, file_size_limit=limit)
    one_line_error(result, "could not read or write the node registry", str(DB_FILE))
    assert "LinearPlan" not in ok("node", "plan", "list", "--dir", node_dir).stdout

    result = fedsm("node", "init", "--dir", tmp_path / "other", file_size_limit=0)
    one_line_error(result, "could not write", "node.toml", "too large")

    (node_dir / "witness_key.pem").unlink()
    result = fedsm("node", "witness", "key", "--dir", node_dir, file_size_limit=0)
    one_line_error(result, "could not read or write", str(node_dir), "too large")


def test_a_full_registry_raises_registry_io_error_and_stores_nothing(tmp_path):
    db = NodeDatabase(tmp_path / DB_FILE)
    try:
        plans = ApprovalRegistry(db)
        with db.read() as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # sqlite's "disk is full"
        source = big_plan(200_000)
        with pytest.raises(RegistryIOError, match="full") as caught:
            plans.record_pending(source, name="big", origin="test")
        assert isinstance(caught.value, NodeDirIOError)
        assert plans.status(sha256(source)) == "unknown"
        with db.read() as conn:
            conn.execute("PRAGMA max_page_count = 1073741823")
        # the connection was left usable: no transaction open
        assert plans.record_pending(source, name="big", origin="test") == "pending"
    finally:
        db.close()


# --------------------------------------------------------------------------- plan size


def test_a_plan_over_max_plan_bytes_is_refused_and_nothing_is_stored(tmp_path):
    node_dir = init(tmp_path)
    huge = big_plan(2 * MiB)
    db = NodeDatabase(node_dir / DB_FILE)
    try:
        plans = ApprovalRegistry(db)
        assert plans.max_plan_bytes == DEFAULT_MAX_PLAN_BYTES == MiB
        before = registry_bytes(node_dir)
        with pytest.raises(PlanTooLarge, match=f"{2 * MiB} bytes.*limit of {MiB} bytes") as ex:
            plans.record_pending(huge, name="huge", origin="status request")
        assert (ex.value.size, ex.value.limit) == (2 * MiB, MiB)
        with pytest.raises(PlanTooLarge):
            plans.decide("approved", source=huge, by="op")
        assert plans.list() == []
        assert registry_bytes(node_dir) < before + 64 * 1024  # not by the plan's 2 MiB
        at_cap = big_plan(MiB)
        assert plans.record_pending(at_cap, name="at-cap", origin="t") == "pending"
    finally:
        db.close()

    plan = tmp_path / "huge.py"
    plan.write_bytes(huge)
    before = registry_bytes(node_dir)
    result = fedsm("node", "plan", "approve", "--dir", node_dir, plan)
    one_line_error(result, "max_plan_bytes", str(2 * MiB))
    assert registry_bytes(node_dir) < before + 64 * 1024
    assert sha256(huge)[:12] not in ok("node", "plan", "list", "--dir", node_dir).stdout

    # the setting raises the cap, in node.toml or the environment
    ok("node", "plan", "approve", "--dir", node_dir, plan, env={"FEDSM_MAX_PLAN_BYTES": "3000000"})
    toml = node_dir / "node.toml"
    assert f"max_plan_bytes = {MiB}\n" in toml.read_text()  # init writes every setting
    toml.write_text(toml.read_text().replace(f"max_plan_bytes = {MiB}", "max_plan_bytes = 100"))
    small = tmp_path / "small.py"
    small.write_bytes(plan_bytes("linear_plan.py"))
    one_line_error(fedsm("node", "plan", "approve", "--dir", node_dir, small), "limit of 100")


def test_a_node_toml_without_the_new_keys_loads_with_their_defaults(tmp_path):
    node_dir = tmp_path / "old-node"
    node_dir.mkdir()
    (node_dir / "node.toml").write_text(
        'node_id = "hosp-old"\napproval_required = true\ntraining_time_limit_s = 60.0\n'
    )
    settings = load_settings(node_dir, env={})
    assert settings.max_plan_bytes == DEFAULT_MAX_PLAN_BYTES
    assert settings.max_pending_plans == DEFAULT_MAX_PENDING_PLANS
    assert settings.registry_busy_timeout_s == DEFAULT_BUSY_TIMEOUT_S
    shown = ok("node", "config", "show", "--dir", node_dir).stdout
    assert f"max_plan_bytes = {MiB}" in shown
    for bad in ("max_plan_bytes = 0", 'max_plan_bytes = "big"', "max_pending_plans = 1.5"):
        (node_dir / "node.toml").write_text(f'node_id = "hosp-old"\n{bad}\n')
        one_line_error(fedsm("node", "config", "show", "--dir", node_dir), bad.split()[0])


def test_pending_plans_are_stored_once_and_capped(tmp_path, caplog):
    db = NodeDatabase(tmp_path / DB_FILE)
    try:
        plans = ApprovalRegistry(db, max_pending_plans=2)
        sources = [f"# plan {n}\n".encode() for n in range(4)]
        for _ in range(3):  # the same digest, many requests: one record
            assert plans.record_pending(sources[0], name="p0", origin="t") == "pending"
        assert plans.record_pending(sources[1], name="p1", origin="t") == "pending"
        with caplog.at_level("WARNING", logger="fedsm.node.registry"):
            assert plans.record_pending(sources[2], name="p2", origin="req-7") == "unknown"
        assert "max_pending_plans" in caplog.text and "req-7" in caplog.text
        assert sorted(p.name for p in plans.list()) == ["p0", "p1"]
        # a known plan still answers its status; a decision frees a place
        assert plans.record_pending(sources[1], name="p1", origin="t") == "pending"
        plans.decide("rejected", sha256=sha256(sources[0]), by="op")
        assert plans.record_pending(sources[2], name="p2", origin="t") == "pending"
        # the operator's own approvals are not capped by the pending count
        assert plans.decide("approved", source=sources[3], by="op").status == "approved"
    finally:
        db.close()


# --------------------------------------------------------------------------- CRLF plans


def test_a_crlf_plan_file_is_approved_as_the_researcher_uploads_it(tmp_path):
    """``fedsm plan hash --out`` wrote the file; it came to the operator with CRLF newlines.
    Without a choice the approval is refused, naming both digests; ``--normalise-newlines``
    approves the digest ``fedsm plan hash`` printed, ``--keep-newlines`` the file's bytes."""
    node_dir = init(tmp_path)
    sent = tmp_path / "sent.py"
    spec = f"{PLANS_DIR / 'linear_plan.py'}:LinearPlan"
    printed = ok("plan", "hash", spec, "--out", sent).stdout.strip()
    assert sha256(sent.read_bytes()) == printed
    crlf = tmp_path / "crlf.py"
    crlf.write_bytes(sent.read_bytes().replace(b"\n", b"\r\n"))
    raw = sha256(crlf.read_bytes())

    for action in ("approve", "reject"):
        refused = fedsm("node", "plan", action, "--dir", node_dir, crlf)
        line = one_line_error(refused, "CRLF", printed, raw, "--normalise-newlines")
        assert "--keep-newlines" in line and f"to {action} {printed[:12]}" in line
    assert "(none)" in ok("node", "plan", "list", "--dir", node_dir).stdout

    approved = ok("node", "plan", "approve", "--dir", node_dir, crlf, "--normalise-newlines")
    assert f"approved training plan {printed}" in approved.stdout
    assert raw in approved.stderr and "warning" in approved.stderr
    shown = ok("node", "plan", "show", "--dir", node_dir, printed[:12]).stdout
    assert "\r" not in shown and "class LinearPlan" in shown

    # a job given training_plan_path=crlf.py uploads the CRs: --verbatim says so
    verbatim = ok("plan", "hash", "--verbatim", f"{crlf}:LinearPlan")
    assert verbatim.stdout.strip() == raw
    assert "CRLF" in verbatim.stderr and "--keep-newlines" in verbatim.stderr
    kept = ok("node", "plan", "approve", "--dir", node_dir, crlf, "--keep-newlines")
    assert f"approved training plan {raw}" in kept.stdout
    listed = ok("node", "plan", "list", "--dir", node_dir, "--json").stdout
    assert printed in listed and raw in listed

    # a lone CR counts as a newline too; a file without CR is not asked about
    cr = tmp_path / "cr.py"
    cr.write_bytes(sent.read_bytes().replace(b"\n", b"\r"))
    one_line_error(fedsm("node", "plan", "approve", "--dir", node_dir, cr), printed)
    lf = ok("node", "plan", "approve", "--dir", node_dir, sent, "--keep-newlines")
    assert "warning" not in lf.stderr
    # with a digest the flags have nothing to choose
    one_line_error(
        fedsm("node", "plan", "approve", "--dir", node_dir, printed[:12], "--keep-newlines"),
        "a digest names one plan",
    )
