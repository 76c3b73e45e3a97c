"""``fedsm log ...``: explicit operations on a job log.

``fedsm log repair LOG [--yes]`` is the repair the audit tools never do. It reads the log
first, read-only, and says what it will do: a torn tail (what a crash mid-write leaves) of N
bytes at offset X goes to ``LOG.torn-X``; damage before the tail (a bad record at offset X,
seq S) goes to ``LOG.corrupt-X`` with every record after it, and the log keeps the records
before it. Nothing is deleted: the bytes moved aside stay in the sidecar file. Then it asks
for confirmation (``--yes`` skips the question; without a terminal to ask on it refuses
unless ``--yes`` is given), and opens the log as its writer with ``repair=True``
(:meth:`fedsm.log.writer.EventLog.open`), which takes the writer lock (a log being written
is refused) and moves the bytes aside. A sound log is left untouched. ``LOG`` may also be a
run directory.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fedsm.audit.replay import resolve_log
from fedsm.cli import plain_text
from fedsm.errors import FedsmError
from fedsm.log.format import HEADER_SIZE, FrameError, check_header, genesis_hash
from fedsm.log.read import gc_paused, read_file, read_log
from fedsm.log.writer import EventLog


class RepairRefused(FedsmError):
    """``fedsm log repair`` did not repair: nothing to do safely, or no confirmation."""


@dataclass(frozen=True)
class RepairPlan:
    """What opening the log with ``repair=True`` would do, read without modifying it.

    ``kind`` is ``"sound"``, ``"torn"`` or ``"corrupt"``; ``offset`` is where the log would
    be cut, ``length`` how many bytes go to the sidecar, ``kept`` the seq of the last record
    kept, ``after`` how many readable records lie after the damage (they move too), ``what``
    the reader's finding.
    """

    path: Path
    kind: str
    size: int
    records: int
    offset: int = 0
    seq: int = 0
    length: int = 0
    kept: int = 0
    after: int = 0
    what: str = ""

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(f"{self.path.name}.{self.kind}-{self.offset}")

    def describe(self) -> str:
        if self.kind == "sound":
            return (
                f"{self.path}: sound ({self.records} records, {self.size} bytes): "
                "nothing to repair, nothing changed"
            )
        keeps = f"the log keeps seq 1..{self.kept}" if self.kept else "the log keeps no record"
        if self.kind == "torn":
            return (
                f"{self.path}: torn tail of {self.length} bytes at offset {self.offset} "
                f"({self.what}): will move it to {self.sidecar}; {keeps}"
            )
        plural = "s" if self.after != 1 else ""
        moved = f"the bad record and {self.after} readable record{plural} after it"
        return (
            f"{self.path}: corrupted at offset {self.offset} (seq {self.seq}): {self.what}. "
            f"Will move the {self.length} bytes from there ({moved}) to {self.sidecar}; {keeps}"
        )


def plan_repair(path: Path) -> RepairPlan:
    """Read the log (no lock, no write) and say what ``repair=True`` would do to it."""
    data = read_file(path)
    try:
        check_header(data)
    except FrameError as exc:
        raise RepairRefused(
            f"{path}: {exc.what}: the header is damaged or this is not a fedsm event log; "
            "`fedsm log repair` only cuts records after a good header, so it changes nothing"
        ) from None
    with gc_paused():
        records, problems = read_log(data, genesis_hash(data[:HEADER_SIZE]), keep_going=True)
    if not problems:
        return RepairPlan(path, "sound", len(data), len(records))
    first = problems[0]
    before = [r for r in records if r.offset < first.offset]
    return RepairPlan(
        path,
        "torn" if first.torn else "corrupt",
        len(data),
        len(records),
        offset=first.offset,
        seq=first.seq,
        length=len(data) - first.offset,
        kept=before[-1].seq if before else 0,
        after=sum(1 for r in records if r.offset > first.offset),
        what=first.what,
    )


def _confirm(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _repair(args: argparse.Namespace) -> int:
    path = resolve_log(args.log)
    plan = plan_repair(path)
    print(plan.describe())
    if plan.kind == "sound":
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise RepairRefused("not repaired: no terminal to confirm on; add --yes to repair")
        if not _confirm("move it aside? [y/N] "):
            print("not repaired: nothing changed")
            return 1
    with EventLog.open(path, repair=True, create=False) as log:
        done = log.recovery
        last = log.last_seq
    if done is None:  # repaired meanwhile (another writer opened it)
        print(f"{path}: sound when opened: nothing moved; the log ends at seq {last}")
        return 0
    print(
        f"moved {done.length} bytes at offset {done.offset} to {done.sidecar}; the log now "
        f"ends at seq {last}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "log",
        help="explicit operations on a job log (repair: move a torn tail or damage aside)",
        description=plain_text(__doc__.split("\n\n")[0] if __doc__ else None),
    )
    ops = p.add_subparsers(dest="log_command", metavar="OPERATION", required=True)
    repair = ops.add_parser(
        "repair",
        help="move a torn tail or a damaged part of a log to a sidecar file, after saying so",
        description=plain_text(__doc__.split("\n\n", 1)[1] if __doc__ else None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    repair.add_argument("log", type=Path, help="the job's event log, or its run directory")
    repair.add_argument(
        "--yes", action="store_true", help="repair without asking (needed without a terminal)"
    )
    repair.set_defaults(func=_repair)
