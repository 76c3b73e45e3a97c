"""Audit tools never write to what they read: no lock file, no repair, no sidecar, no header.

``fedsm replay`` (timeline, ``--at``, ``--round``, ``--json``, ``--verify``) and ``fedsm
report`` run on a copy of a run whose log has a torn tail; afterwards the run directory holds
exactly the same files with exactly the same bytes. They also take a run directory, and say
one clear line for a directory without a log, an empty file or a file that is not a log.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsm.core.events import JobCreated
from fedsm.log.writer import EventLog


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _fedsm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsm", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def torn_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    with EventLog.open(run / "job.log") as log:
        log.append(
            JobCreated(
                job_id="job-1",
                researcher_id="r",
                training_plan_class="P",
                training_args={},
                model_args={},
                seed=0,
                nodes=("a",),
                datasets={"a": "d"},
                round_limit=1,
                min_nodes=1,
                reply_deadline_s=1.0,
                aggregator="fedavg",
                aggregator_args={},
                tags=(),
            ),
            ts=1.0,
        )
    (run / "job.log.lock").unlink()  # as copied from elsewhere: no lock file
    with open(run / "job.log", "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # half a frame: a kill mid-append
    return run


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--at", "1"],
        ["--round", "1"],
        ["--json"],
        ["--verify"],
        ["--verify", "--json"],
    ],
)
def test_replay_leaves_the_run_untouched(torn_run: Path, args: list[str]) -> None:
    before = _snapshot(torn_run)
    for target in (torn_run / "job.log", torn_run):
        result = _fedsm("replay", str(target), *args)
        assert "Traceback" not in result.stderr, result.stderr
        assert _snapshot(torn_run) == before
    if not args or args == ["--at", "1"]:
        assert "torn tail" in result.stderr and "not repaired" in result.stderr


def test_report_leaves_the_run_untouched(torn_run: Path, tmp_path: Path) -> None:
    before = _snapshot(torn_run)
    result = _fedsm("report", str(torn_run), "--out", str(tmp_path / "r.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _snapshot(torn_run) == before


def test_bad_inputs_get_one_clear_line(tmp_path: Path) -> None:
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    other = tmp_path / "notes.txt"
    other.write_text("hello, these are notes and not an event log\n" * 3)
    for path, says in (
        (empty_dir, "without a job log"),
        (empty, "shorter than a log header"),
        (other, "not a fedsm event log"),
    ):
        for args in ([], ["--verify"]):
            result = _fedsm("replay", str(path), *args)
            assert result.returncode != 0
            said = result.stdout + result.stderr
            assert "Traceback" not in said and says in said, said
        assert empty.read_bytes() == b"" and other.read_text().startswith("hello")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["empty.log", "nothing", "notes.txt"])
