"""Reliability: a node's disk fills during a run of the memory demo, and is freed a moment later.

The disk fills by injection (:mod:`faults`: creating the matching files fails with ENOSPC)
as round 2 is sent, where the simulated nodes write in round 2: their uploads into the run's
repository (they train in memory: the parameters reach them and leave them as bytes, so
no scratch file is written; the scratch files of a node that trains through files are put
under the same fault in ``tests/test_node_faults.py``). The nodes answer ``NODE_IO_ERROR``;
the researcher records the transient error (``NodeRetrying``) and asks again, same request
id, until space is back. The run ends on the digest of an uninterrupted run, its log
verifies, and nothing logs a traceback.

Reproduce: ``.venv/bin/python -m pytest -q tests/test_reliability_disk.py``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from faults import FaultyDisk, under
from researcher_kill import append_hook

from fedsm.cli import main as cli_main
from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.log import scan

CONFIG = DemoConfig(nodes=3, rounds=3, seed=0)
FREE_AFTER_S = 0.5  # how long the disk stays full after the first failed write


@pytest.fixture(scope="module")
def clean_digest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final digest of an uninterrupted memory run."""
    return run_demo(
        tmp_path_factory.mktemp("clean"), CONFIG, say=lambda s: None
    ).final_params_sha256


def _node_lane() -> bool:
    return threading.current_thread().name.startswith("fedsm-train")


def _points(run_dir: Path) -> dict[str, Callable[[Path], bool]]:
    repo_part = under(run_dir / "repository", name_prefix=".part-")
    return {
        # the nodes' uploads only (the researcher writes into the same repository)
        "every node's upload into the repository": lambda p: repo_part(p) and _node_lane(),
    }


def _names(run_dir: Path) -> list[str]:
    return [type(r.event).__name__ for r in scan(run_dir / "researcher" / "job.log").records]


def _verify(run_dir: Path) -> tuple[int, str]:
    out = io.StringIO()
    log_path = run_dir / "researcher" / "job.log"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli_main(
            ["replay", str(log_path), "--verify", "--repo", str(run_dir / "repository")]
        )
    return code, out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    ["every node's upload into the repository"],
)
def test_a_disk_full_during_round_2_ends_on_the_uninterrupted_digest(
    tmp_path: Path, clean_digest: str, caplog: pytest.LogCaptureFixture, point: str
) -> None:
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    rule = _points(run_dir.resolve())[point]
    disk = FaultyDisk()
    filled = threading.Event()
    freed = threading.Event()

    def after(events: Sequence[object]) -> None:
        rounds = [getattr(e, "round", None) for e in events if type(e).__name__ == "RoundSent"]
        if 2 in rounds and not filled.is_set():
            disk.fill(point, rule)
            filled.set()

    def free_later() -> None:
        end = time.monotonic() + 120
        while disk.hits[point] == 0 and time.monotonic() < end and not freed.is_set():
            time.sleep(0.02)
        time.sleep(FREE_AFTER_S)
        disk.free()
        freed.set()

    freer = threading.Thread(target=free_later, name="free-the-disk", daemon=True)
    freer.start()
    try:
        with disk, append_hook(after):
            result = run_demo(run_dir, CONFIG, say=lambda s: None)
    finally:
        freed.set()
        freer.join(timeout=130)
    assert filled.is_set() and disk.hits[point] >= 1, dict(disk.hits)
    assert result.final_params_sha256 == clean_digest
    names = _names(run_dir)
    assert "NodeRetrying" in names, names  # the transient error was recorded ...
    assert "NodeFailed" not in names and "RoundTimedOut" not in names, names
    assert names.count("Aggregated") == CONFIG.rounds and names[-1] == "JobCompleted", names
    warned = [r.getMessage() for r in caplog.records if "NODE_IO_ERROR" in r.getMessage()]
    assert warned and all("No space left on device" in w for w in warned), warned
    tracebacks = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks
    code, out = _verify(run_dir)
    assert code == 0, out[-2000:]
    print(f"\n{point}: {disk.hits[point]} writes failed, {names.count('NodeRetrying')} retries")
