"""The audit (``fedsm replay LOG --verify --repo DIR``) on real demo runs, clean and tampered.

One demo run is made per module; every test that tampers works on its own copy of the run
directory. Each tampering must be caught by a precise finding (check, seq, expected, found).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from fedsm.audit.checks import AuditFinding, RepositoryAudit, check_plan
from fedsm.audit.replay import CHECKS, add_arguments, run, verify_all
from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.core import events as ev
from fedsm.log.format import encode_frame
from fedsm.log.read import Record, scan
from fedsm.log.writer import EventLog
from fedsm.repository import LocalRepository, RepositoryServer

NODES, ROUNDS = 3, 3


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("audit") / "run"
    run_demo(run_dir, DemoConfig(nodes=NODES, rounds=ROUNDS), say=lambda _line: None)
    return run_dir


@pytest.fixture
def run_copy(demo_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(demo_run, copy)
    return copy


def _log(run_dir: Path) -> Path:
    return run_dir / "researcher" / "job.log"


def _repo(run_dir: Path) -> Path:
    return run_dir / "repository"


def _replay(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = io.StringIO()
    code = run(parser.parse_args(list(argv)), out=out, err=io.StringIO())
    return code, out.getvalue()


def _audit(run_dir: Path) -> list[AuditFinding]:
    with RepositoryAudit(LocalRepository(_repo(run_dir))) as audit:
        return [f for f in verify_all(_log(run_dir), (*CHECKS, *audit.checks)) if f.error]


def _record(records: list[Record], kind: type, **match: object) -> Record:
    hits = [
        r
        for r in records
        if isinstance(r.event, kind) and all(getattr(r.event, k) == v for k, v in match.items())
    ]
    assert len(hits) == 1, (kind, match, hits)
    return hits[0]


def _rewrite(log: Path, change: Callable[[list[tuple[float, ev.Event]]], list]) -> None:
    """Write the log again, from scratch, with ``change`` applied to its (ts, event) list:
    a valid hash chain, so only the audit's other checks can object."""
    items = [(r.ts, r.event) for r in scan(log).records]
    log.unlink()
    with EventLog.open(log, durability="never") as out:
        for ts, event in change(items):
            out.append(event, ts=ts)


def _frames(log: Path) -> tuple[bytes, list[tuple[int, int]]]:
    """The log's bytes and each record's (start, end) offsets."""
    data = log.read_bytes()
    spans = []
    for r in scan(log).records:
        (length,) = struct.unpack_from("<I", data, r.offset)
        spans.append((r.offset, r.offset + 8 + length))
    return data, spans


# --------------------------------------------------------------------------- clean run


def test_a_clean_run_verifies_with_and_without_the_repository(demo_run: Path) -> None:
    code, text = _replay(str(_log(demo_run)), "--verify", "--repo", str(_repo(demo_run)))
    assert code == 0, text
    assert "not checked: artifacts" not in text and "artifacts and aggregates" in text
    assert "not checked: witnesses" in text  # no --witness: against its writer, unchecked
    code, text = _replay(str(_log(demo_run)), "--verify")
    assert code == 0, text
    assert "not checked: artifacts" in text and "not checked: recompute" in text
    code, text = _replay(str(_log(demo_run)), "--verify", "--json")
    report = json.loads(text)
    assert report["ok"] is True and report["findings"] == []
    assert [c["check"] for c in report["not_checked"]] == ["artifacts", "recompute", "witnesses"]


def test_the_audit_reads_every_artifact_and_recomputes_every_round(demo_run: Path) -> None:
    records = scan(_log(demo_run)).records
    with RepositoryAudit(LocalRepository(_repo(demo_run))) as audit:
        assert audit.check_artifacts(_log(demo_run)) == []
        assert audit.check_aggregates(_log(demo_run)) == []
        fetched = {d for d, p in audit._fetched.items() if isinstance(p, Path)}
    trained = {r.event.round for r in records if isinstance(r.event, ev.RoundSent)}
    validated = {
        r.event.round
        for r in records
        if isinstance(r.event, ev.RoundSent) and not r.event.do_training
    }
    replies = {
        r.event.params_sha256
        for r in records
        if isinstance(r.event, ev.ReplyReceived) and r.event.round in trained - validated
    }
    aggregates = {r.event.params_sha256 for r in records if isinstance(r.event, ev.Aggregated)}
    assert len(replies) == NODES * ROUNDS and len(aggregates) == ROUNDS
    # the demo's final validation: every node validated the last aggregate, trained nothing
    assert validated == {ROUNDS + 1}
    final = {
        r.event.params_sha256
        for r in records
        if isinstance(r.event, ev.ReplyReceived) and r.event.round in validated
    }
    assert final == {max(records, key=lambda r: r.seq).event.params_sha256}
    assert replies | aggregates <= fetched


def test_the_log_names_artifacts_by_digest_only(demo_run: Path) -> None:
    records = scan(_log(demo_run)).records
    for r in records:
        data = ev.encode_event(r.event)["data"]
        assert not {"url", "params_url"} & set(data), r.event.type_name
        assert type(r.event).version == ev.EVENT_TYPES[r.event.type_name].version
    raw = _log(demo_run).read_bytes()
    assert b"file://" not in raw and str(demo_run).encode() not in raw
    plan = _record(records, ev.TrainingPlanUploaded).event
    assert (_repo(demo_run) / plan.sha256).is_file()


def test_a_moved_run_directory_audits(run_copy: Path, demo_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "moved-run"
    moved.parent.mkdir()
    shutil.move(run_copy, moved)
    assert not run_copy.exists() and str(demo_run) not in str(moved)
    assert _audit(moved) == []
    code, text = _replay(str(_log(moved)), "--verify", "--repo", str(_repo(moved)))
    assert code == 0 and "not checked: artifacts" not in text, text


def test_a_server_repository_is_audited_by_digest_not_by_recorded_url(demo_run: Path) -> None:
    # The log names artifacts by digest; the auditor is given an http server of the store.
    with RepositoryServer(_repo(demo_run), host="127.0.0.1", port=0, token="t0k") as server:
        code, text = _replay(
            str(_log(demo_run)), "--verify", "--repo", server.url, "--token", "t0k"
        )
        assert code == 0, text
        code, text = _replay(
            str(_log(demo_run)), "--verify", "--repo", server.url, "--token", "wrong"
        )
    assert code == 1
    refused = [line for line in text.splitlines() if "refused or did not answer" in line]
    assert len(refused) == 2, text  # one per repository check, not one per artifact


# --------------------------------------------------------------------------- tampering


def test_a_node_params_file_changed_by_one_byte(run_copy: Path) -> None:
    records = scan(_log(run_copy)).records
    reply = _record(records, ev.ReplyReceived, round=2, node_id="node-2")
    aggregated = _record(records, ev.Aggregated, round=2)
    stored = _repo(run_copy) / reply.event.params_sha256
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))

    findings = _audit(run_copy)
    assert [(f.check, f.seq) for f in findings] == [
        ("artifacts", reply.seq),
        ("recompute", aggregated.seq),
    ]
    assert findings[0].expected == f"a file with sha256 {reply.event.params_sha256}"
    assert findings[0].found == f"a file with sha256 {hashlib.sha256(data).hexdigest()}"
    assert "parameters node-2 sent in round 2" in findings[0].what
    assert "hash to another digest" in findings[0].what
    code, text = _replay(str(_log(run_copy)), "--verify", "--repo", str(_repo(run_copy)), "--json")
    report = json.loads(text)
    assert code == 1 and report["ok"] is False
    assert [c["check"] for c in report["not_checked"]] == ["witnesses"]
    assert [(f["check"], f["seq"], f["expected"], f["found"]) for f in report["findings"]] == [
        (f.check, f.seq, f.expected, f.found) for f in findings
    ]
    # The log alone can't see it: listed as not checked, not passed.
    code, text = _replay(str(_log(run_copy)), "--verify")
    assert code == 0 and "not checked: artifacts" in text


def test_a_field_changed_with_its_checksum_recomputed_breaks_the_chain(run_copy: Path) -> None:
    log = _log(run_copy)
    records = scan(log).records
    reply = _record(records, ev.ReplyReceived, round=1, node_id="node-1")
    data, spans = _frames(log)
    start, end = spans[reply.seq - 1]
    payload = msgpack.unpackb(data[start + 8 : end], raw=False)
    payload["data"]["sample_size"] += 1000  # claim more samples, for more weight
    frame = encode_frame(msgpack.packb(payload, use_bin_type=True))
    log.write_bytes(data[:start] + frame + data[end:])

    code, text = _replay(str(log), "--verify", "--json")
    report = json.loads(text)
    errors = [f for f in report["findings"] if f["error"]]
    assert code == 1
    assert [(f["seq"], f["what"]) for f in errors] == [
        (reply.seq + 1, "hash chain broken: prev is not the hash of the record before")
    ]


def test_a_record_removed(run_copy: Path) -> None:
    log = _log(run_copy)
    data, spans = _frames(log)
    gone = 7
    start, end = spans[gone - 1]
    log.write_bytes(data[:start] + data[end:])
    code, text = _replay(str(log), "--verify")
    assert code == 1
    assert f"seq {gone + 1}: sequence broken: expected seq {gone}, found seq {gone + 1}" in text
    assert f"seq {gone + 1}: hash chain broken" in text


def test_two_records_swapped(run_copy: Path) -> None:
    log = _log(run_copy)
    data, spans = _frames(log)
    (a0, a1), (b0, b1) = spans[11 - 1], spans[12 - 1]
    log.write_bytes(data[:a0] + data[b0:b1] + data[a0:a1] + data[b1:])
    code, text = _replay(str(log), "--verify")
    assert code == 1
    assert "seq 12: sequence broken: expected seq 11, found seq 12" in text
    assert "seq 11: sequence broken: expected seq 13, found seq 11" in text


def test_an_aggregate_replaced_by_another_valid_file_is_caught_by_recomputation(
    run_copy: Path,
) -> None:
    log = _log(run_copy)
    records = scan(log).records
    aggregated = _record(records, ev.Aggregated, round=2)
    # A valid params file of the right shape that is in the repository: a node's update.
    forged = _record(records, ev.ReplyReceived, round=2, node_id="node-3").event.params_sha256
    original = aggregated.event.params_sha256

    def forge(items: list[tuple[float, ev.Event]]) -> list[tuple[float, ev.Event]]:
        out = []
        for ts, event in items:
            if getattr(event, "params_sha256", None) == original:
                event = dataclasses.replace(event, params_sha256=forged)
            out.append((ts, event))
        return out

    _rewrite(log, forge)
    # The log itself is impeccable: chain, lifecycle, plan.
    code, text = _replay(str(log), "--verify")
    assert code == 0, text
    findings = _audit(run_copy)
    assert [(f.check, f.seq) for f in findings] == [("recompute", aggregated.seq)]
    assert findings[0].expected == forged and findings[0].found == original


# --------------------------------------------------------------------------- lifecycle, plan


def test_a_reply_counted_twice_is_a_lifecycle_finding(run_copy: Path) -> None:
    log = _log(run_copy)
    reply = _record(scan(log).records, ev.ReplyReceived, round=2, node_id="node-1")

    def duplicate(items: list[tuple[float, ev.Event]]) -> list[tuple[float, ev.Event]]:
        at = reply.seq  # right after the original
        return [*items[:at], (items[at - 1][0], reply.event), *items[at:]]

    _rewrite(log, duplicate)
    code, text = _replay(str(log), "--verify")
    assert code == 1
    assert f"seq {reply.seq + 1}: lifecycle: ReplyReceived is not allowed" in text
    assert "node 'node-1' already replied in round 2" in text


def test_a_round_aggregated_without_quorum_is_a_lifecycle_finding(run_copy: Path) -> None:
    log = _log(run_copy)

    def below_quorum(items: list[tuple[float, ev.Event]]) -> list[tuple[float, ev.Event]]:
        out: list[tuple[float, ev.Event]] = []
        for ts, event in items:
            if isinstance(event, ev.ReplyReceived) and event.round == 1:
                if event.node_id != "node-1":
                    continue
            if isinstance(event, ev.Aggregated) and event.round == 1:
                out.append((ts, ev.RoundTimedOut(round=1, missing=("node-2", "node-3"))))
                event = dataclasses.replace(
                    event, nodes=("node-1",), weights={"node-1": event.weights["node-1"]}
                )
            out.append((ts, event))
        return out

    _rewrite(log, below_quorum)
    code, text = _replay(str(log), "--verify")
    assert code == 1
    assert "lifecycle: Aggregated is not allowed" in text
    assert "1 replies, fewer than min_nodes 2" in text


@pytest.mark.parametrize("required", [True, False])
def test_a_contribution_from_a_node_that_did_not_approve_the_plan(
    run_copy: Path, required: bool
) -> None:
    log = _log(run_copy)

    def reject(items: list[tuple[float, ev.Event]]) -> list[tuple[float, ev.Event]]:
        out = []
        for ts, event in items:
            if isinstance(event, ev.ApprovalChecked):
                event = dataclasses.replace(
                    event,
                    statuses={**event.statuses, "node-2": "rejected"},
                    approval_required={**event.approval_required, "node-2": required},
                )
            out.append((ts, event))
        return out

    _rewrite(log, reject)
    records = scan(log).records
    replies = [
        r.seq
        for r in records
        if isinstance(r.event, ev.ReplyReceived) and r.event.node_id == "node-2"
    ]
    findings = check_plan(log)
    # every round node-2 ran the plan in: the trained ones and the final validation
    assert [f.seq for f in findings] == replies and len(replies) == ROUNDS + 1
    assert all(f.expected == "approved" and f.found == "rejected" for f in findings)
    assert all(f.error is required for f in findings)
    code, _text = _replay(str(log), "--verify")
    assert code == (1 if required else 0)


def test_approval_of_another_plan_than_the_uploaded_one(run_copy: Path) -> None:
    log = _log(run_copy)
    records = scan(log).records
    uploaded = _record(records, ev.TrainingPlanUploaded).event.sha256
    other = "ab" * 32

    def swap_plan(items: list[tuple[float, ev.Event]]) -> list[tuple[float, ev.Event]]:
        return [
            (
                ts,
                dataclasses.replace(e, plan_sha256=other)
                if isinstance(e, ev.ApprovalChecked)
                else e,
            )
            for ts, e in items
        ]

    _rewrite(log, swap_plan)
    checked = _record(scan(log).records, ev.ApprovalChecked)
    findings = check_plan(log)
    assert [(f.seq, f.expected, f.found) for f in findings] == [(checked.seq, uploaded, other)]


def test_a_node_reporting_another_plan_and_a_version_1_reply(run_copy: Path) -> None:
    log = _log(run_copy)
    records = scan(log).records
    uploaded = _record(records, ev.TrainingPlanUploaded).event.sha256
    other = "cd" * 32

    def change(items: list[tuple[float, ev.Event]]) -> list[tuple[float, ev.Event]]:
        out = []
        for ts, e in items:
            if isinstance(e, ev.ReplyReceived) and e.round == 1 and e.node_id == "node-1":
                e = dataclasses.replace(e, training_plan_sha256=other)
            elif isinstance(e, ev.ReplyReceived) and e.round == 2 and e.node_id == "node-2":
                e = dataclasses.replace(e, training_plan_sha256=None)  # as a v1 log has it
            out.append((ts, e))
        return out

    _rewrite(log, change)
    records = scan(log).records
    ran_other = _record(records, ev.ReplyReceived, round=1, node_id="node-1")
    unrecorded = _record(records, ev.ReplyReceived, round=2, node_id="node-2")
    findings = check_plan(log)
    assert [(f.seq, f.error, f.expected, f.found) for f in findings] == [
        (ran_other.seq, True, uploaded, other),
        (unrecorded.seq, False, uploaded, "not recorded"),
    ]


# --------------------------------------------------------------------------- --round


def test_round_shows_who_was_asked_and_who_answered_when(demo_run: Path) -> None:
    records = scan(_log(demo_run)).records
    sent = _record(records, ev.RoundSent, round=2)
    aggregated = _record(records, ev.Aggregated, round=2)
    code, text = _replay(str(_log(demo_run)), "--round", "2", "--json")
    assert code == 0
    data = json.loads(text)
    assert data["asked"] == list(sent.event.nodes) and data["sent_seq"] == sent.seq
    assert sorted(data["replies"]) == sorted(sent.event.nodes)
    for node, reply in data["replies"].items():
        event = _record(records, ev.ReplyReceived, round=2, node_id=node)
        assert reply["seq"] == event.seq
        assert reply["after_s"] == pytest.approx(event.ts - sent.ts)
        assert reply["sample_size"] == event.event.sample_size
        assert reply["weight"] == aggregated.event.weights[node]
        assert reply["metrics"] == dict(event.event.metrics)
    assert data["aggregate"]["params_sha256"] == aggregated.event.params_sha256
    assert "params_url" not in data["aggregate"]
    code, text = _replay(str(_log(demo_run)), "--round", "2")
    assert code == 0 and aggregated.event.params_sha256 in text
    assert all(node in text for node in sent.event.nodes)


def test_the_command_line_exit_codes(run_copy: Path) -> None:
    def fedsm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedsm", "replay", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert fedsm(str(_log(run_copy)), "--verify", "--repo", str(_repo(run_copy))).returncode == 0
    missing = fedsm(str(_log(run_copy)), "--round", "9")
    assert missing.returncode == 2 and "round 9 was not sent" in missing.stderr
    for digest in _repo(run_copy).iterdir():
        if digest.is_file():
            digest.unlink()
    gone = fedsm(str(_log(run_copy)), "--verify", "--repo", str(_repo(run_copy)))
    assert gone.returncode == 1 and "no such file" in gone.stdout
