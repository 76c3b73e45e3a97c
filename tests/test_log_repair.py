"""``fedsm log repair``: says what it will do from a read-only look, asks (or refuses in a pipe
without --yes), then repairs as the log's writer; a sound log is left as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsm.cli import main
from fedsm.log.read import LogCorrupted, scan, verify
from fedsm.log.writer import EventLog
from fedsm.testing.strategies import job_run

EVENTS = job_run(rounds=2, nodes=3)


def _log(path: Path) -> Path:
    with EventLog.open(path, durability="never") as log:
        for i, event in enumerate(EVENTS):
            log.append(event, ts=1000.0 + i)
    return path


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_torn_tail_is_moved_to_its_sidecar(tmp_path: Path, capsys) -> None:
    log = _log(tmp_path / "job.log")
    good = log.read_bytes()
    log.write_bytes(good + b"\x40\x00\x00\x00torn")  # a record cut mid-write
    assert main(["log", "repair", str(log), "--yes"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{log}: torn tail of 8 bytes at offset {len(good)}")
    assert f"will move it to {log}.torn-{len(good)}" in out[0]
    assert f"the log keeps seq 1..{len(EVENTS)}" in out[0]
    assert out[1] == (
        f"moved 8 bytes at offset {len(good)} to {log}.torn-{len(good)}; "
        f"the log now ends at seq {len(EVENTS)}"
    )
    assert log.read_bytes() == good
    assert (tmp_path / f"job.log.torn-{len(good)}").read_bytes() == b"\x40\x00\x00\x00torn"
    assert verify(log) == []


def test_damage_mid_log_moves_it_and_everything_after(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log = _log(run / "job.log")
    records = scan(log).records
    bad = records[6]  # seq 7
    data = bytearray(log.read_bytes())
    data[bad.offset + 20] ^= 0xFF
    log.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted):
        scan(log)
    # A run directory names its log.
    assert main(["log", "repair", str(run), "--yes"]) == 0
    out = capsys.readouterr().out.splitlines()
    after = len(EVENTS) - bad.seq
    assert out[0].startswith(f"{log}: corrupted at offset {bad.offset} (seq {bad.seq}): ")
    assert f"({'the bad record and'} {after} readable records after it)" in out[0]
    assert f"to {log}.corrupt-{bad.offset}; the log keeps seq 1..{bad.seq - 1}" in out[0]
    assert out[1].startswith(f"moved {len(data) - bad.offset} bytes at offset {bad.offset}")
    assert log.read_bytes() == bytes(data[: bad.offset])
    assert (run / f"job.log.corrupt-{bad.offset}").read_bytes() == bytes(data[bad.offset :])
    assert scan(log).last_seq == bad.seq - 1 and verify(log) == []


def test_a_sound_log_is_left_alone(tmp_path: Path, capsys) -> None:
    log = _log(tmp_path / "job.log")
    before = _files(tmp_path)
    assert main(["log", "repair", str(log)]) == 0  # no --yes needed: nothing to confirm
    out = capsys.readouterr().out
    assert out == f"{log}: sound ({len(EVENTS)} records, {len(before['job.log'])} bytes): " + (
        "nothing to repair, nothing changed\n"
    )
    assert _files(tmp_path) == before


def test_without_yes_in_a_pipe_it_refuses_and_changes_nothing(tmp_path: Path) -> None:
    log = _log(tmp_path / "job.log")
    log.write_bytes(log.read_bytes() + b"\x01\x02\x03")
    (tmp_path / "job.log.lock").unlink()
    before = _files(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "fedsm", "log", "repair", str(log)],
        input="y\n",  # a pipe is not a terminal: even a "y" on it is no confirmation
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "torn tail of 3 bytes" in done.stdout
    assert done.stderr.splitlines() == [
        "fedsm: error: not repaired: no terminal to confirm on; add --yes to repair"
    ]
    assert _files(tmp_path) == before  # no sidecar, no lock file, the log as it was


def test_no_log_and_not_a_log(tmp_path: Path, capsys) -> None:
    assert main(["log", "repair", str(tmp_path / "missing.log"), "--yes"]) == 2
    assert "no event log at" in capsys.readouterr().err
    other = tmp_path / "notes.txt"
    other.write_bytes(b"hello, this is not a log at all, not even close to one")
    assert main(["log", "repair", str(other), "--yes"]) == 2
    err = capsys.readouterr().err
    assert "not a fedsm event log" in err and "changes nothing" in err
    assert other.read_bytes().startswith(b"hello") and sorted(tmp_path.iterdir()) == [other]
