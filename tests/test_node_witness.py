"""Nodes witness the researcher's log: every head a job-scoped request carries is kept in the
node's registry (duplicates once, conflicting hashes both, failing requests too), job-end is
answered, and ``fedsm node witness list/export/key`` hands the heads to an auditor as a
signed witness file. Ends with a real job: each node's last head is the log's last record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from plans import Researcher, head, initial_params, plan_bytes, train_request, write_csv

from fedsm.core.messages import (
    ErrorReply,
    JobEndReply,
    JobEndRequest,
    TrainingPlanStatusReply,
    TrainingPlanStatusRequest,
    TrainReply,
)
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.core.witness import (
    WitnessError,
    WitnessFile,
    decode_witness,
    encode_witness,
    signed_body,
)
from fedsm.node.database import DB_FILE, NodeDatabase
from fedsm.node.executor import InProcessTrainingExecutor
from fedsm.node.node import Node
from fedsm.node.settings import init_node_dir
from fedsm.node.simulate import register_csv_dataset
from fedsm.node.witness import (
    KEY_FILE,
    JobNotWitnessed,
    WitnessStore,
    load_or_create_key,
    public_key_hex,
    sign,
)
from fedsm.repository import LocalRepository
from fedsm.transport import MemoryBroker, MemoryBus

NODE = "node-w"
JOB = "job-w"
TIMEOUT_S = 120


def log_head(seq: int, tag: str = "") -> dict:
    return {"seq": seq, "hash": hashlib.sha256(f"{seq}{tag}".encode()).hexdigest()}


def verify(w: WitnessFile) -> bool:
    """What an auditor runs (with cryptography, not fedsm.node)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not w.public_key or not w.signature:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(w.public_key)).verify(
            bytes.fromhex(w.signature), signed_body(w)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def executor():
    with InProcessTrainingExecutor() as shared:
        yield shared


class World:
    def __init__(self, tmp: Path, executor: InProcessTrainingExecutor) -> None:
        self.tmp = tmp
        self.broker = MemoryBroker()
        self.repo = LocalRepository(tmp / "repo")
        self.node_dir = tmp / NODE
        init_node_dir(self.node_dir, NODE)
        bus = MemoryBus(self.broker, NODE, role="node")
        self.node = Node(self.node_dir, bus=bus, repository=self.repo, executor=executor).start()
        self.dataset = register_csv_dataset(
            self.node, write_csv(tmp / "data.csv"), name="d", tags=["x"], target="target"
        )
        self.researcher = Researcher(self.broker)
        self.linear = plan_bytes("linear_plan.py")
        self.params = initial_params(self.repo, self.linear, "LinearPlan", tmp)

    def ask(self, request):
        return self.researcher.ask(NODE, request)

    def status(self, at: dict | None, **extra) -> TrainingPlanStatusRequest:
        path = self.tmp / "status-plan.py"
        path.write_bytes(self.linear)
        up = self.repo.upload_file(path)
        fields = dict(
            job_id=JOB,
            training_plan_url=up["file"],
            training_plan_sha256=up["sha256"],
            log_head=at,
        )
        return TrainingPlanStatusRequest(**head(NODE), **{**fields, **extra})

    def train(self, at: dict | None, **extra):
        return train_request(
            NODE,
            extra.pop("dataset_id", self.dataset["dataset_id"]),
            self.repo,
            self.linear,
            "LinearPlan",
            self.params,
            self.tmp,
            job_id=JOB,
            log_head=at,
            **extra,
        )

    def end(self, at: dict, job_id: str = JOB, **extra) -> JobEndRequest:
        return JobEndRequest(**head(NODE, **extra), job_id=job_id, status="completed", log_head=at)

    def heads(self, job_id: str = JOB) -> list[tuple[int, str, str]]:
        return [(h.seq, h.hash, h.command) for h in self.node.witness.heads(job_id)]


@pytest.fixture
def world(tmp_path, executor):
    w = World(tmp_path, executor)
    yield w
    w.researcher.close()
    w.node.stop()


def fedsm(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=cwd,
    )


# --------------------------------------------------------------------------- recording


def test_heads_of_status_train_and_job_end_are_kept(world):
    world.node.plans.decide("approved", source=world.linear, by="test")
    before = time.time()
    status = world.ask(world.status(log_head(3)))
    assert isinstance(status, TrainingPlanStatusReply) and status.status == "approved"
    assert isinstance(world.ask(world.train(log_head(5))), TrainReply)
    ended = world.ask(world.end(log_head(7)))
    assert isinstance(ended, JobEndReply)
    assert (ended.job_id, ended.seq, ended.node_id) == (JOB, 7, NODE)
    assert world.heads() == [
        (3, log_head(3)["hash"], "training-plan-status"),
        (5, log_head(5)["hash"], "train"),
        (7, log_head(7)["hash"], "job-end"),
    ]
    kept = world.node.witness.heads(JOB)
    assert all(before <= h.received_at <= time.time() for h in kept)
    # a request without a head (an older researcher) records nothing, and breaks nothing
    assert isinstance(world.ask(world.status(None)), TrainingPlanStatusReply)
    assert len(world.node.witness.heads(JOB)) == 3
    (summary,) = world.node.witness.jobs()
    assert (summary.job_id, summary.researcher_id, summary.heads, summary.highest_seq) == (
        JOB,
        "researcher-test",
        3,
        7,
    )


def test_a_duplicate_head_is_kept_once_with_its_first_time(world):
    first = world.ask(world.end(log_head(4)))
    first_at = world.node.witness.heads(JOB)[0].received_at
    time.sleep(0.01)
    again = world.end(log_head(4))
    world.researcher.bus.send(NODE, again)
    world.researcher.bus.send(NODE, again)  # delivered twice
    assert isinstance(world.researcher.wait(again.request_id), JobEndReply)
    assert isinstance(world.researcher.wait(again.request_id), JobEndReply)
    assert isinstance(first, JobEndReply)
    (kept,) = world.node.witness.heads(JOB)
    assert (kept.seq, kept.received_at) == (4, first_at)


def test_two_hashes_for_one_seq_are_both_kept(world):
    world.ask(world.end(log_head(9)))
    world.ask(world.end(log_head(9, "rewritten")))
    assert sorted(world.heads()) == sorted(
        [
            (9, log_head(9)["hash"], "job-end"),
            (9, log_head(9, "rewritten")["hash"], "job-end"),
        ]
    )


def test_failing_requests_still_leave_their_head(world):
    # the plan is not approved: the train request fails before any training
    refused = world.ask(world.train(log_head(2)))
    assert isinstance(refused, ErrorReply)
    # a dataset the node does not have
    world.node.plans.decide("approved", source=world.linear, by="test")
    missing = world.ask(world.train(log_head(3), dataset_id="no-such-dataset"))
    assert missing.error_number is ErrorNumber.DATASET_NOT_FOUND
    # a status request naming the wrong digest
    wrong = world.ask(world.status(log_head(4), training_plan_sha256="0" * 64))
    assert wrong.error_number is ErrorNumber.PLAN_DIGEST_MISMATCH
    assert [(s, c) for s, _, c in world.heads()] == [
        (2, "train"),
        (3, "train"),
        (4, "training-plan-status"),
    ]


def test_job_end_of_a_job_the_node_never_saw_is_kept_and_answered(world):
    reply = world.ask(world.end(log_head(12), job_id="job-elsewhere"))
    assert isinstance(reply, JobEndReply) and (reply.job_id, reply.seq) == ("job-elsewhere", 12)
    assert world.heads("job-elsewhere") == [(12, log_head(12)["hash"], "job-end")]


def test_a_request_for_another_node_is_not_witnessed(world):
    world.node.handle(
        JobEndRequest(**head("node-other"), job_id=JOB, status="completed", log_head=log_head(1))
    )
    assert world.heads() == []


def test_heads_survive_a_restart(world, executor):
    world.ask(world.end(log_head(6)))
    world.node.stop()
    bus = MemoryBus(world.broker, NODE, role="node")
    world.node = Node(world.node_dir, bus=bus, repository=world.repo, executor=executor).start()
    assert world.heads() == [(6, log_head(6)["hash"], "job-end")]


def test_recording_cost(tmp_path):
    """A head costs one small sqlite write (no fsync on the train path): measured, bounded
    loosely (shared CI cores), printed with -s."""
    db = NodeDatabase(tmp_path / DB_FILE, durable=True)
    store = WitnessStore(db)
    n = 2000
    try:
        start = time.perf_counter()
        for i in range(n):
            store.record(JOB, "r", log_head(i), "train", sync=False)
        per = (time.perf_counter() - start) / n
        start = time.perf_counter()
        for i in range(200):
            store.record(JOB, "r", log_head(i, "end"), "job-end", sync=True)
        synced = (time.perf_counter() - start) / 200
    finally:
        db.close()
    print(f"witness record: {per * 1e6:.0f} us unsynced, {synced * 1e6:.0f} us synced")
    assert per < 0.005


# --------------------------------------------------------------------------- export, signing


def test_export_round_trips_and_its_signature_verifies(world):
    for seq in (1, 2, 3):
        world.ask(world.end(log_head(seq)))
    key = load_or_create_key(world.node_dir)
    w = sign(world.node.witness.witness_file(NODE, JOB), key)
    assert w.public_key == public_key_hex(key) and verify(w)
    data = encode_witness(w)
    back = decode_witness(data)
    assert back == w and verify(back)
    assert [(h.seq, h.hash) for h in back.heads] == [(s, log_head(s)["hash"]) for s in (1, 2, 3)]
    assert back.highest.seq == 3

    # an edited file is refused by its checksum; a re-checksummed one by its signature
    edited = data.replace(log_head(3)["hash"].encode(), log_head(3, "x")["hash"].encode())
    with pytest.raises(WitnessError, match="edited"):
        decode_witness(edited)
    forged = dataclasses.replace(back, heads=back.heads[:2])
    assert not verify(decode_witness(encode_witness(forged)))
    with pytest.raises(JobNotWitnessed, match="never received a head of job job-none"):
        world.node.witness.witness_file(NODE, "job-none")


def test_the_key_is_made_once_private_and_kept(tmp_path):
    key = load_or_create_key(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_hex(load_or_create_key(tmp_path)) == public_key_hex(key)
    assert len(public_key_hex(key)) == 64


# --------------------------------------------------------------------------- CLI


def test_cli_witness_list_export_and_key(tmp_path):
    node_dir = tmp_path / "node"
    init = fedsm("node", "init", "--dir", node_dir, "--id", "node-cli")
    assert init.returncode == 0, init.stderr
    key_hex = fedsm("node", "witness", "key", "--dir", node_dir).stdout.strip()
    assert len(key_hex) == 64 and key_hex in init.stdout
    assert stat.S_IMODE((node_dir / KEY_FILE).stat().st_mode) == 0o600

    empty = fedsm("node", "witness", "list", "--dir", node_dir)
    assert empty.returncode == 0 and "(none)" in empty.stdout

    db = NodeDatabase(node_dir / DB_FILE)  # as a running node holds it
    try:
        store = WitnessStore(db)
        for seq in (2, 5, 8):
            store.record(JOB, "researcher-a", log_head(seq), "train", received_at=1000.0 + seq)
        store.record("job-other", "researcher-a", log_head(1), "job-end", received_at=2000.0)
        listed = fedsm("node", "witness", "list", "--dir", node_dir)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["job_id", "researcher", "heads", "highest_seq", "last_received"]
        rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
        assert rows[JOB] == ["researcher-a", "3", "8", "1970-01-01T00:16:48+00:00"]
        assert rows["job-other"][:3] == ["researcher-a", "1", "1"]

        exported = fedsm("node", "witness", "export", "--dir", node_dir, "--job", JOB, cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr
        out = tmp_path / f"witness-node-cli-{JOB}.json"
        assert exported.stdout.strip() == out.name and out.is_file()
        w = decode_witness(out.read_bytes())
        assert (w.node_id, w.job_id, w.researcher_id) == ("node-cli", JOB, "researcher-a")
        assert [h.seq for h in w.heads] == [2, 5, 8] and w.public_key == key_hex and verify(w)

        chosen = tmp_path / "sub" / "w.json"
        chosen.parent.mkdir()
        again = fedsm("node", "witness", "export", "--dir", node_dir, "--job", JOB, "--out", chosen)
        assert again.returncode == 0 and again.stdout.strip() == str(chosen)
        assert decode_witness(chosen.read_bytes()).heads == w.heads
    finally:
        db.close()

    unknown = fedsm("node", "witness", "export", "--dir", node_dir, "--job", "job-none")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == (
        "fedsm: error: node node-cli never received a head of job job-none"
    )
    nowhere = fedsm("node", "witness", "list", "--dir", tmp_path / "no-node")
    assert nowhere.returncode == 2 and "fedsm: error:" in nowhere.stderr
    assert "Traceback" not in nowhere.stderr

    helped = fedsm("node", "witness", "--help")
    assert helped.returncode == 0 and "export" in helped.stdout and "\x1b" not in helped.stdout


def test_cli_export_asks_whose_job_when_two_researchers_share_an_id(tmp_path):
    node_dir = tmp_path / "node"
    assert fedsm("node", "init", "--dir", node_dir, "--id", "node-cli").returncode == 0
    db = NodeDatabase(node_dir / DB_FILE)
    try:
        WitnessStore(db).record(JOB, "researcher-a", log_head(1), "train")
        WitnessStore(db).record(JOB, "researcher-b", log_head(1, "b"), "train")
    finally:
        db.close()
    both = fedsm("node", "witness", "export", "--dir", node_dir, "--job", JOB, cwd=tmp_path)
    assert both.returncode == 2 and "--researcher" in both.stderr
    one = fedsm(
        "node", "witness", "export", "--dir", node_dir, "--job", JOB, "--researcher",
        "researcher-b", cwd=tmp_path,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    w = decode_witness((tmp_path / one.stdout.strip()).read_bytes())
    assert w.researcher_id == "researcher-b" and [h.hash for h in w.heads] == [
        log_head(1, "b")["hash"]
    ]


def test_cli_on_a_locked_registry_says_so(tmp_path):
    node_dir = tmp_path / "node"
    assert fedsm("node", "init", "--dir", node_dir, "--id", "node-cli").returncode == 0
    holder = sqlite3.connect(str(node_dir / DB_FILE), isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("CREATE TABLE hold (x)")
        holder.execute("COMMIT")  # exclusive locking mode keeps the lock after the commit
        locked = fedsm("node", "witness", "list", "--dir", node_dir)
    finally:
        holder.close()
    assert locked.returncode == 2, locked.stdout
    assert "is locked by another process" in locked.stderr and "Traceback" not in locked.stderr


def test_an_older_registry_without_the_table_is_migrated(tmp_path, executor):
    node_dir = tmp_path / "node"
    init_node_dir(node_dir, NODE)
    NodeDatabase(node_dir / DB_FILE).close()
    with sqlite3.connect(str(node_dir / DB_FILE)) as old:  # as written before witnessing
        old.execute("DROP TABLE witnessed_heads")
    # read-only commands change nothing and see no heads
    listed = fedsm("node", "witness", "list", "--dir", node_dir)
    assert listed.returncode == 0 and "(none)" in listed.stdout, listed.stderr
    unknown = fedsm("node", "witness", "export", "--dir", node_dir, "--job", JOB)
    assert unknown.returncode == 2 and "never received a head" in unknown.stderr
    with sqlite3.connect(str(node_dir / DB_FILE)) as conn:
        assert (
            conn.execute("SELECT name FROM sqlite_master WHERE name='witnessed_heads'").fetchall()
            == []
        )
    # the node opening it adds the table and records
    broker = MemoryBroker()
    node = Node(
        node_dir,
        bus=MemoryBus(broker, NODE, role="node"),
        repository=LocalRepository(tmp_path / "repo"),
        executor=executor,
    ).start()
    researcher = Researcher(broker)
    try:
        reply = researcher.ask(
            NODE, JobEndRequest(**head(NODE), job_id=JOB, status="failed", log_head=log_head(3))
        )
        assert isinstance(reply, JobEndReply)
    finally:
        researcher.close()
        node.stop()
    listed = fedsm("node", "witness", "list", "--dir", node_dir)
    assert listed.returncode == 0 and JOB in listed.stdout


# --------------------------------------------------------------------------- a real job


def test_every_node_witnesses_the_final_head_of_a_real_job(tmp_path):
    from job_world import experiment, make_world

    from fedsm.log.read import scan

    world = make_world(tmp_path, 3)
    try:
        exp = experiment(world, tmp_path / "run", round_limit=2)
        exp.run()
        job_id = exp.job.state.job_id
        log_path = exp.job.log_path
        exp.close()
        last = scan(log_path).records[-1]
        for node in world.nodes:
            w = sign(
                node.witness.witness_file(node.node_id, job_id),
                load_or_create_key(node.node_dir),
            )
            w = decode_witness(encode_witness(w))
            assert verify(w)
            assert (w.highest.seq, w.highest.hash) == (last.seq, last.hash.hex())
            assert w.highest.command == "job-end"
            commands = {h.command for h in w.heads}
            assert {"training-plan-status", "train", "job-end"} <= commands, commands
            # every head lies on the log: same hash at its seq
            chain = {r.seq: r.hash.hex() for r in scan(log_path).records}
            assert all(chain[h.seq] == h.hash for h in w.heads)
    finally:
        world.close()
