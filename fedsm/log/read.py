"""Reading an event log without writing it: the log's errors and records, :func:`scan`
(every good record, read-only, no lock: the log may be live) and :func:`verify` (every
finding). See :mod:`fedsm.log.writer` for the format and the writer; everything here is re-exported
there.
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
from typing import Any

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


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class ScanStop:
    """Why a scan stopped before the end of the data."""

    offset: int
    seq: int
    what: str
    frame_damaged: bool  # short or checksum-failing: a torn write if nothing valid follows


def walk_records(
    data: bytes, genesis: bytes, stop_out: list[ScanStop]
) -> Iterator[tuple[int, int, dict[str, Any], bytes]]:
    """Yield ``(offset, end, payload, hash)`` of each good record in order; on the first problem
    append a :class:`ScanStop` to ``stop_out`` and end."""
    offset, seq, prev, size = HEADER_SIZE, 1, genesis, len(data)
    view = memoryview(data)
    while offset < size:
        try:
            payload, end, digest = read_frame(view, offset)
        except FrameError as exc:
            stop_out.append(ScanStop(offset, seq, exc.what, exc.frame_damaged))
            return
        if payload["seq"] != seq:
            what = f"sequence broken: expected seq {seq}, found seq {payload['seq']}"
            stop_out.append(ScanStop(offset, seq, what, False))
            return
        if payload["prev"] != prev:
            what = "hash chain broken: prev is not the hash of the record before"
            stop_out.append(ScanStop(offset, seq, what, False))
            return
        yield offset, end, payload, digest
        offset, seq, prev = end, seq + 1, digest


def is_torn_tail(data: bytes, stop: ScanStop) -> bool:
    """True if the problem at ``stop`` is a torn tail: a damaged frame with no valid frame
    after it."""
    return stop.frame_damaged and find_next_frame(memoryview(data), stop.offset) is None


def to_record(path: Path, offset: int, payload: dict[str, Any], digest: bytes) -> Record:
    try:
        event = decode_event(payload["type"], payload["v"], payload["data"])
    except EventDecodeError as exc:
        raise LogCorrupted(path, offset, payload["seq"], f"event does not decode: {exc}") from None
    return Record(payload["seq"], payload["ts"], event, offset, digest)


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


def collect_records(
    path: Path, data: bytes, genesis: bytes, from_seq: int, stop_out: list[ScanStop]
) -> list[Record]:
    """Every good record of ``data`` from ``from_seq`` on, decoded; on the first problem append
    a :class:`ScanStop` to ``stop_out`` and stop. Raises :class:`LogCorrupted` for a record
    whose frame and chain are sound but whose event does not decode.

    The same checks as :func:`walk_records` + :func:`to_record`, inlined: replay reads every
    record of a log through here, and the generic path spends more time in calls, slices and
    tuples than in checksums and msgpack. Any record the inline checks doubt goes through
    :func:`~fedsm.log.format.read_frame`, which names the problem exactly.
    """
    view = memoryview(data)
    size = len(data)
    offset, seq, prev = HEADER_SIZE, 1, genesis
    records: list[Record] = []
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
                stop_out.append(ScanStop(offset, seq, exc.what, exc.frame_damaged))
                return records
            found, type_name, version = payload["seq"], payload["type"], payload["v"]
            ts, record_prev, event_data = payload["ts"], payload["prev"], payload["data"]
            frame = view[offset:end]
        if found != seq:
            what = f"sequence broken: expected seq {seq}, found seq {found}"
            stop_out.append(ScanStop(offset, seq, what, False))
            return records
        if record_prev != prev:
            what = "hash chain broken: prev is not the hash of the record before"
            stop_out.append(ScanStop(offset, seq, what, False))
            return records
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
                    what = f"event does not decode: {exc}"
                    raise LogCorrupted(path, offset, seq, what) from None
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
    return records


def scan(path: str | os.PathLike[str], *, from_seq: int = 1) -> LogScan:
    """Read a log without locking or modifying it (it may be live): every good record from
    ``from_seq`` on, and the torn tail, if any, that a writer opening it would move aside.

    Raises :class:`LogCorrupted` for damage before the tail, :class:`LogFormatError` for a
    file that is not a log, :class:`LogNotFound` if there is no file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LogNotFound(f"no event log at {path}") from None
    log_id = read_header(path, data)
    stops: list[ScanStop] = []
    with gc_paused():
        records = collect_records(path, data, genesis_hash(data[:HEADER_SIZE]), from_seq, stops)
    torn = None
    if stops:
        stop = stops[0]
        if not is_torn_tail(data, stop):
            raise LogCorrupted(path, stop.offset, stop.seq, stop.what)
        torn = TornTail(stop.offset, len(data) - stop.offset, None, stop.seq - 1, stop.what)
    return LogScan(path, log_id, records, torn)


def verify(path: str | os.PathLike[str]) -> list[Finding]:
    """Check framing, checksums, sequence, hash chain and event decoding of a whole log,
    without modifying it. Returns every finding (empty: the log is sound). A torn tail is a
    finding with ``error=False``. Scanning goes on past damage by looking for the next valid
    frame, so one bad record yields one finding, not a cascade.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LogNotFound(f"no event log at {path}") from None
    try:
        check_header(data)
    except FrameError as exc:
        return [Finding(0, 0, f"header: {exc.what}")]
    view = memoryview(data)
    findings: list[Finding] = []
    offset, seq = HEADER_SIZE, 1
    prev: bytes | None = genesis_hash(data[:HEADER_SIZE])
    while offset < len(data):
        try:
            payload, end, digest = read_frame(view, offset)
        except FrameError as exc:
            following = find_next_frame(view, offset)
            if following is None and exc.frame_damaged:
                findings.append(
                    Finding(
                        offset,
                        seq,
                        f"torn tail of {len(data) - offset} bytes ({exc.what}); a writer "
                        f"opening the log moves it to {path.name}.torn-{offset}",
                        error=False,
                    )
                )
                break
            findings.append(Finding(offset, seq, exc.what))
            if following is None:
                break
            # The records in between are lost; the next one's seq and prev can't be checked
            # against them, so carry on from whatever it says.
            offset, seq, prev = following, -1, None
            continue
        found = payload["seq"]
        if seq != -1 and found != seq:
            findings.append(
                Finding(offset, found, f"sequence broken: expected seq {seq}, found seq {found}")
            )
        if prev is not None and payload["prev"] != prev:
            findings.append(
                Finding(
                    offset, found, "hash chain broken: prev is not the hash of the record before"
                )
            )
        try:
            decode_event(payload["type"], payload["v"], payload["data"])
        except EventDecodeError as exc:
            findings.append(Finding(offset, found, f"event does not decode: {exc}"))
        offset, seq, prev = end, found + 1, digest
    return findings
