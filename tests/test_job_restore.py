"""Exact restore: kill -9 the researcher at several points, resume, get the same bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.log.writer import EventLog

HERE = Path(__file__).parent
ROUNDS, NODES = 3, 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    run_dir = tmp_path_factory.mktemp("clean")
    result = run_demo(run_dir, DemoConfig(nodes=NODES, rounds=ROUNDS, seed=0), say=lambda s: None)
    return result.final_params_sha256


@pytest.mark.parametrize(
    ("event", "nth"),
    [
        ("ApprovalChecked", 1),  # before the first round
        ("RoundSent", 2),  # right after a round was sent
        ("ReplyReceived", NODES + 1),  # mid-collecting, round 2
        ("Aggregated", 1),  # right after an aggregation
    ],
)
def test_kill_and_resume_gives_identical_final_params(
    tmp_path: Path, uninterrupted: str, event: str, nth: int
) -> None:
    killed = subprocess.run(
        [
            sys.executable,
            str(HERE / "researcher_kill.py"),
            str(tmp_path),
            event,
            str(nth),
            str(ROUNDS),
            str(NODES),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    log_path = tmp_path / "researcher" / "job.log"
    with EventLog.open(log_path) as log:
        names = [type(e).__name__ for e in log.events()]
    assert names.count(event) == nth and names[-1] == event  # killed right there
    assert "JobCompleted" not in names

    said: list[str] = []
    result = run_demo(tmp_path, DemoConfig(nodes=NODES, rounds=ROUNDS, seed=0), say=said.append)
    assert any("resuming" in line for line in said)
    assert result.final_params_sha256 == uninterrupted

    verify = subprocess.run(
        [sys.executable, "-m", "fedsm", "replay", str(log_path), "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    with EventLog.open(log_path) as log:
        names = [type(e).__name__ for e in log.events()]
    assert names.count("Aggregated") == ROUNDS and names[-1] == "JobCompleted"
