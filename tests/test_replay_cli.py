"""``fedsm replay`` as a user runs it: a subprocess of the installed command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsm.log.read import scan
from fedsm.log.writer import EventLog
from fedsm.testing.strategies import digest, job_run

EVENTS = job_run(rounds=2, nodes=3)


def _fedsm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsm", "replay", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "job.log"
    with EventLog.open(path, durability="never") as log:
        for i, event in enumerate(EVENTS):
            log.append(event, ts=1_700_000_000.0 + i)
    return path


def test_timeline_prints_seq_time_state_and_summary(log_path: Path) -> None:
    result = _fedsm(str(log_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(EVENTS) + 1
    head = scan(log_path).records[-1]
    assert lines.pop() == f"head: seq {head.seq} hash {head.hash.hex()}"
    first, last = lines[0].split(), lines[-1].split()
    assert first[0] == "1" and first[1].startswith("2023-11-14T22:13:20") and first[2] == "created"
    assert last[0] == str(len(EVENTS)) and last[2] == "completed"
    assert "round 2 reply from node-1" in result.stdout
    # Artifacts are named by digest only: the plan's line has its class and short digest.
    plan_line = lines[1].split(None, 3)
    assert plan_line[3] == f"plan MyPlan sha256 {digest('plan')[:12]}"
    assert "repo://" not in result.stdout and "file://" not in result.stdout


def test_at_prints_the_state_after_a_seq_as_text_and_json(log_path: Path) -> None:
    text = _fedsm(str(log_path), "--at", "6")
    assert text.returncode == 0, text.stderr
    assert "status         collecting" in text.stdout
    # The state names the plan and the parameters by digest, with no URL after them.
    assert f"  plan           {digest('plan')}\n" in text.stdout
    assert f"  params         {digest('p0')}\n" in text.stdout
    as_json = _fedsm(str(log_path), "--at", "6", "--json")
    state = json.loads(as_json.stdout)
    assert state["seq"] == 6 and state["status"] == "collecting" and state["round"] == 1
    assert sorted(state["replies"]["1"]) == ["node-0"]
    assert state["pending_nodes"] == ["node-1", "node-2"]
    assert state["plan_sha256"] == digest("plan") and state["params_sha256"] == digest("p0")
    assert "plan_url" not in state and "params_url" not in state
    assert state["round_deadline"] == 1001.0 and state["round_aggregator_args"] == {}
    beyond = _fedsm(str(log_path), "--at", "999")
    assert beyond.returncode == 2 and "ends at seq" in beyond.stderr


def test_json_timeline(log_path: Path) -> None:
    rows = json.loads(_fedsm(str(log_path), "--json").stdout)
    assert [r["seq"] for r in rows] == list(range(1, len(EVENTS) + 1))
    assert rows[0]["event"]["type"] == "JobCreated" and rows[-1]["status"] == "completed"
    assert [r["hash"] for r in rows] == [r.hash.hex() for r in scan(log_path).records]


def test_verify_a_sound_log(log_path: Path) -> None:
    result = _fedsm(str(log_path), "--verify")
    assert result.returncode == 0, result.stdout
    assert f"OK, {len(EVENTS)} records" in result.stdout


def test_verify_names_the_seq_of_a_flipped_byte(log_path: Path) -> None:
    records = scan(log_path).records
    data = bytearray(log_path.read_bytes())
    data[records[4].offset + 30] ^= 0x01  # inside seq 5
    log_path.write_bytes(bytes(data))
    result = _fedsm(str(log_path), "--verify")
    assert result.returncode == 1
    assert f"offset {records[4].offset} seq 5: checksum mismatch" in result.stdout
    assert log_path.read_bytes() == bytes(data), "--verify must not modify the log"
    timeline = _fedsm(str(log_path))
    assert timeline.returncode == 2 and "seq 5" in timeline.stderr


def test_verify_names_the_seq_of_removed_and_swapped_records(log_path: Path) -> None:
    data = log_path.read_bytes()
    offs = [r.offset for r in scan(log_path).records]
    log_path.write_bytes(data[: offs[6]] + data[offs[7] :])  # remove seq 7
    removed = _fedsm(str(log_path), "--verify")
    assert removed.returncode == 1 and "expected seq 7, found seq 8" in removed.stdout
    log_path.write_bytes(
        data[: offs[2]] + data[offs[3] : offs[4]] + data[offs[2] : offs[3]] + data[offs[4] :]
    )  # swap seq 3 and 4
    swapped = _fedsm(str(log_path), "--verify", "--json")
    report = json.loads(swapped.stdout)
    assert swapped.returncode == 1 and not report["ok"]
    assert {f["seq"] for f in report["findings"]} >= {3, 4}


def test_verify_reports_a_lifecycle_violation(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    with EventLog.open(path, durability="never") as log:
        for i, event in enumerate(EVENTS[:3] + EVENTS[4:6]):  # no ApprovalChecked
            log.append(event, ts=float(i))
    result = _fedsm(str(path), "--verify")
    assert result.returncode == 1
    assert "seq 4: lifecycle: RoundSent is not allowed in state 'uploaded'" in result.stdout


def test_a_torn_tail_is_reported_not_an_error_and_left_to_the_writer(log_path: Path) -> None:
    data = log_path.read_bytes()
    last = scan(log_path).records[-1].offset
    log_path.write_bytes(data[:-4])
    files = sorted(p.name for p in log_path.parent.iterdir())
    verify = _fedsm(str(log_path), "--verify")
    assert verify.returncode == 0, verify.stdout
    assert f"note: offset {last} seq {len(EVENTS)}: torn tail" in verify.stdout
    assert log_path.read_bytes() == data[:-4]
    timeline = _fedsm(str(log_path))
    assert timeline.returncode == 0
    assert "torn tail" in timeline.stderr and "not repaired" in timeline.stderr
    assert len(timeline.stdout.splitlines()) == len(EVENTS)
    # The audit tool is read-only: the torn bytes stay, no sidecar, no new file.
    assert log_path.read_bytes() == data[:-4]
    assert sorted(p.name for p in log_path.parent.iterdir()) == files
    # The job's writer moves the tail aside when it next opens the log.
    with EventLog.open(log_path, durability="never") as writer:
        assert writer.recovery is not None and writer.recovery.offset == last
    assert log_path.with_name(f"job.log.torn-{last}").read_bytes() == data[last:-4]
    assert log_path.stat().st_size == last
    after = _fedsm(str(log_path))
    assert after.returncode == 0 and "torn tail" not in after.stderr
    assert len(after.stdout.splitlines()) == len(EVENTS)


def test_a_live_log_is_read_and_left_alone(log_path: Path) -> None:
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-4])
    with EventLog.open(log_path) as writer:  # recovers, then holds the lock
        assert writer.recovery is not None
        writer.append(EVENTS[-1], ts=1.0)
        writer.flush()
        with open(log_path, "ab") as raw:
            raw.write(b"\x10\x00")  # a write in progress
        live = log_path.read_bytes()
        result = _fedsm(str(log_path))
        assert result.returncode == 0
        assert "torn tail" in result.stderr and "not repaired" in result.stderr
        assert len(result.stdout.splitlines()) == len(EVENTS) + 1  # + the head line
        assert log_path.read_bytes() == live and live.endswith(b"\x10\x00")


def test_tools_replay_is_the_same_command(log_path: Path) -> None:
    tool = Path(__file__).resolve().parent.parent / "tools" / "replay.py"
    result = subprocess.run(
        [sys.executable, str(tool), str(log_path), "--verify"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "OK" in result.stdout
