"""Breakpoints in the seed's sense, reduced to what event sourcing needs: (log, seq).

The log is the whole state of a job, so a breakpoint names the log and how far it went;
nothing is copied or linked, and moving the run directory does not break it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedsm.core.jobstate import JobState
from fedsm.researcher.errors import JobError

__all__ = ["save", "check", "FILE_NAME"]

FILE_NAME = "breakpoint.json"


def save(
    log_path: Path, last_seq: int, state: JobState, directory: str | Path | None = None
) -> dict[str, Any]:
    """The breakpoint of a log at ``last_seq``; also written to ``directory`` when given."""
    breakpoint_ = {
        "log": str(Path(log_path).resolve()),
        "seq": last_seq,
        "job_id": state.job_id,
        "researcher_id": state.researcher_id,
    }
    if directory is not None:
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / (FILE_NAME + ".tmp")
        tmp.write_text(json.dumps(breakpoint_, indent=1), encoding="utf-8")
        os.replace(tmp, target / FILE_NAME)
    return breakpoint_


def check(saved: Mapping[str, Any], log_path: Path, last_seq: int, state: JobState) -> None:
    """Raise :class:`JobError` unless ``saved`` is this job's log as it stands now."""
    if Path(saved["log"]).resolve() != Path(log_path).resolve():
        raise JobError(f"breakpoint is for {saved['log']}, not {log_path}")
    if saved.get("job_id") != state.job_id:
        raise JobError(f"breakpoint is for job {saved.get('job_id')}, not {state.job_id}")
    if int(saved["seq"]) != last_seq:
        raise JobError(
            f"the log has moved on from seq {saved['seq']} to {last_seq}; inspect the earlier "
            f"state with: fedsm replay {log_path} --at {saved['seq']}"
        )
