"""Reading an event log: the log's errors and records, :func:`read_log` (the one reader every
other goes through), :func:`scan` (every good record, read-only, no lock: the log may be live)
and :func:`verify` (every finding). See :mod:`fedsm.log.writer` for the format and the writer.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from msgpack import unpackb as unpackb_

from fedsm.core.events import Event, decode_event, fast_decoders
from fedsm.core.eventschema import EventDecodeError
from fedsm.errors import FedsmError
from fedsm.log.format import (
    FRAME,
    HEADER_SIZE,
    MAX_RECORD_BYTES,
    FrameError,
    check_header,
    find_next_frame,
    genesis_hash,
    read_frame,
)

__all__ = [
    "Finding",
    "LogCorrupted",
    "LogError",
    "LogFormatError",
    "LogLocked",
    "LogNotFound",
    "LogScan",
    "Record",
    "TornTail",
    "scan",
    "verify",
]


class LogError(FedsmError):
    """A problem with an event log (base class)."""


class LogFormatError(LogError):
    """The file is not a fedsm event log, or one of a format version this fedsm can't read."""


class LogNotFound(LogError, FileNotFoundError):
    """No log at the path and ``create=False``."""


class LogCorrupted(LogError):
    """The log is damaged somewhere other than a torn tail. ``offset`` and ``seq`` say where."""

    def __init__(self, path: Path | str, offset: int, seq: int, what: str) -> None:
        super().__init__(
            f"{path}: corrupted at byte offset {offset} (seq {seq}): {what}. Run "
            f"`fedsm replay --verify {path}` for every finding; open with repair=True to keep "
            f"the records before it (the rest goes to a sidecar file, nothing is deleted)"
        )
        self.path, self.offset, self.seq, self.what = Path(path), offset, seq, what


class LogLocked(LogError):
    """Another process (or another EventLog in this one) is writing this log."""

    def __init__(self, path: Path | str, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process (PID unknown)"
        super().__init__(
            f"{path} is being written by {holder}: one writer per log. Stop that process or "
            f"read the log without writing (fedsm.log.scan, `fedsm replay`)"
        )
        self.path, self.pid = Path(path), pid


@dataclass(frozen=True)
class Record:
    """One record of a log, with its decoded event. ``hash`` is the record's chain hash."""

    seq: int
    ts: float
    event: Event
    offset: int
    hash: bytes


@dataclass(frozen=True)
class TornTail:
    """What opening a log found after its last good record and did about it.

    ``sidecar`` is where the bytes went (``None`` when only scanned read-only);
    ``last_good_seq`` is the seq of the last record kept (0 if none).
    """

    offset: int
    length: int
    sidecar: Path | None
    last_good_seq: int
    reason: str


@dataclass(frozen=True)
class Finding:
    """One result of :func:`verify`. ``error`` is False for a torn tail, which is normal."""

    offset: int
    seq: int
    what: str
    error: bool = True


@dataclass(frozen=True)
class LogScan:
    """A read-only view of a log: its id, its good records, and any torn tail."""

    path: Path
    log_id: bytes
    records: list[Record]
    torn: TornTail | None

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq if self.records else 0


# --------------------------------------------------------------------------- the reader core


@dataclass(frozen=True)
class Problem:
    """Something wrong that :func:`read_log` found at ``offset``.

    ``seq`` is the seq expected there (the record's own seq for a record whose frame reads,
    when :func:`read_log` goes on past damage). ``torn`` marks a torn tail: a short or
    checksum-failing frame with no valid frame after it, what a crash mid-write leaves.
    """

    offset: int
    seq: int
    what: str
    torn: bool = False


def read_log(
    data: bytes, genesis: bytes, *, from_seq: int = 1, keep_going: bool = False
) -> tuple[list[Record], list[Problem]]:
    """The one reader of a log's records: ``(good records, problems)``.

    Walks the frames after the header, checking each one's framing, checksum and payload
    shape, its seq, its ``prev`` against the chain, and that its event decodes; returns the
    records from ``from_seq`` on (records before it are checked but not decoded). Every
    reader goes through here: :func:`scan`, :func:`verify`, and the writer's
    :meth:`~fedsm.log.writer.EventLog.open` and ``records``.

    By default it stops at the first problem: ``problems`` is empty or holds that one, and
    ``records`` are the good records before it. With ``keep_going`` (what :func:`verify`
    does) it goes on past damage: after a bad frame it resumes at the next valid frame and
    carries on from the seq and ``prev`` that frame names (the records in between are lost
    and can't be checked against), so one bad record yields one problem, not a cascade; a
    record that fails its seq, chain or event checks is reported and read past.

    Replay reads every record of a log through here, so the loop is inlined: the generic
    path spends more time in calls, slices and tuples than in checksums and msgpack. Any
    record the inline checks doubt goes through :func:`~fedsm.log.format.read_frame`, which
    names the problem exactly; problems are off the fast path.
    """
    view = memoryview(data)
    size = len(data)
    offset, seq, prev = HEADER_SIZE, 1, genesis
    records: list[Record] = []
    problems: list[Problem] = []
    add = records.append
    unpack_frame, crc32, unpackb = FRAME.unpack_from, zlib.crc32, unpackb_
    new_hash = hashlib.blake2b(digest_size=32).copy
    decoders = fast_decoders()
    new, set_dict = object.__new__, object.__setattr__
    while offset < size:
        try:  # the fast path; anything it doubts goes to read_frame below
            length, crc = unpack_frame(view, offset)
            end = offset + 8 + length
            frame = view[offset:end]
            payload = None
            if (
                length <= MAX_RECORD_BYTES
                and end <= size
                and crc32(frame[8:], crc32(frame[:4])) == crc
            ):
                payload = unpackb(frame[8:])
                found, type_name, version = payload["seq"], payload["type"], payload["v"]
                ts, record_prev, event_data = payload["ts"], payload["prev"], payload["data"]
                if not (
                    len(payload) == 6
                    and type(found) is int
                    and type(type_name) is str
                    and type(version) is int
                    and type(ts) is float
                    and type(record_prev) is bytes
                    and type(event_data) is dict
                ):
                    payload = None
        except Exception:  # short frame, not msgpack, not a map, a missing key
            payload = None
        if payload is None:
            try:
                payload, end, _digest = read_frame(view, offset)
            except FrameError as exc:
                following = (
                    find_next_frame(view, offset) if exc.frame_damaged or keep_going else None
                )
                torn = exc.frame_damaged and following is None
                problems.append(Problem(offset, seq, exc.what, torn))
                if not keep_going or following is None:
                    break
                # Carry on from whatever the next valid frame says.
                payload = read_frame(view, following)[0]
                offset, seq, prev = following, payload["seq"], payload["prev"]
                continue
            found, type_name, version = payload["seq"], payload["type"], payload["v"]
            ts, record_prev, event_data = payload["ts"], payload["prev"], payload["data"]
            frame = view[offset:end]
        if found != seq or record_prev != prev:
            if found != seq:
                what = f"sequence broken: expected seq {seq}, found seq {found}"
                if not keep_going:
                    problems.append(Problem(offset, seq, what))
                    break
                problems.append(Problem(offset, found, what))
                seq = found
            if record_prev != prev:
                what = "hash chain broken: prev is not the hash of the record before"
                problems.append(Problem(offset, seq, what))
                if not keep_going:
                    break
        hasher = new_hash()  # a copy of a fresh hasher is cheaper than the constructor
        hasher.update(frame)
        prev = hasher.digest()
        if seq >= from_seq:
            decoder = decoders.get(type_name)
            event = None
            if decoder is not None and decoder[0] == version:
                try:
                    event = decoder[1](event_data)
                except EventDecodeError:
                    event = None
            if event is None:  # an older schema version, or an error to name precisely
                try:
                    event = decode_event(type_name, version, event_data)
                except EventDecodeError as exc:
                    problems.append(Problem(offset, seq, f"event does not decode: {exc}"))
                    if not keep_going:
                        break
            if event is not None:
                # Record is frozen: fill its __dict__ directly instead of paying __init__'s
                # object.__setattr__ per field.
                record = new(Record)
                set_dict(
                    record,
                    "__dict__",
                    {"seq": seq, "ts": ts, "event": event, "offset": offset, "hash": prev},
                )
                add(record)
        offset = end
        seq += 1
    return records, problems


def read_header(path: Path, data: bytes) -> bytes:
    """Check the header; return the log id."""
    try:
        return check_header(data)
    except FrameError as exc:
        if exc.frame_damaged:
            raise LogCorrupted(path, 0, 0, exc.what) from None
        raise LogFormatError(f"{path}: {exc.what}") from None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects that all stay alive.

    Reading a log creates several containers per record and keeps them all; the collector
    would re-traverse the growing heap again and again for nothing (a third of replay time
    on a 200k-event log). Reference counting still frees garbage meanwhile.

    On the way out the objects made meanwhile are moved straight to the oldest generation
    (``gc.freeze()`` + ``gc.unfreeze()``, which only splice lists): left young, the first
    allocation after ``gc.enable()`` would traverse every one of them (another ~1 µs per
    record) only to find them all alive. Done only when nothing else in the process has
    frozen objects, whose freeze this must not undo; garbage cycles made meanwhile are
    still collected, by the next full collection.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        if was_enabled:
            gc.enable()


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise LogNotFound(f"no event log at {path}") from None


def scan(path: str | os.PathLike[str], *, from_seq: int = 1) -> LogScan:
    """Read a log without locking or modifying it (it may be live): every good record from
    ``from_seq`` on, and the torn tail, if any, that a writer opening it would move aside.
    Records before ``from_seq`` are checked (frame, checksum, seq, chain) but not decoded.

    Raises :class:`LogCorrupted` for damage before the tail (a record whose event does not
    decode included), :class:`LogFormatError` for a file that is not a log,
    :class:`LogNotFound` if there is no file.
    """
    path = Path(path)
    data = read_file(path)
    log_id = read_header(path, data)
    with gc_paused():
        records, problems = read_log(data, genesis_hash(data[:HEADER_SIZE]), from_seq=from_seq)
    torn = None
    if problems:
        problem = problems[0]
        if not problem.torn:
            raise LogCorrupted(path, problem.offset, problem.seq, problem.what)
        torn = TornTail(
            problem.offset, len(data) - problem.offset, None, problem.seq - 1, problem.what
        )
    return LogScan(path, log_id, records, torn)


def verify(path: str | os.PathLike[str]) -> list[Finding]:
    """Check framing, checksums, sequence, hash chain and event decoding of a whole log,
    without modifying it. Returns every finding (empty: the log is sound). A torn tail is a
    finding with ``error=False``. Reading goes on past damage by looking for the next valid
    frame, so one bad record yields one finding, not a cascade (see :func:`read_log`).

    The first finding is where :func:`scan` and :meth:`~fedsm.log.writer.EventLog.open`
    stop: it is an error exactly when they refuse the log.
    """
    path = Path(path)
    data = read_file(path)
    try:
        check_header(data)
    except FrameError as exc:
        return [Finding(0, 0, f"header: {exc.what}")]
    with gc_paused():
        _records, problems = read_log(data, genesis_hash(data[:HEADER_SIZE]), keep_going=True)
    del _records
    findings: list[Finding] = []
    for problem in problems:
        if problem.torn:
            what = (
                f"torn tail of {len(data) - problem.offset} bytes ({problem.what}); a writer "
                f"opening the log moves it to {path.name}.torn-{problem.offset}"
            )
            findings.append(Finding(problem.offset, problem.seq, what, error=False))
        else:
            findings.append(Finding(problem.offset, problem.seq, problem.what))
    return findings
