"""``LogReaderContract``: every way an event log is read must agree, on damaged files too.

A log is read in several ways: :func:`fedsm.log.scan` (read-only), :meth:`EventLog.open
<fedsm.log.writer.EventLog.open>` then ``records()`` (the writer, which moves a torn tail
aside), :func:`fedsm.log.verify` (every finding), and whatever you add (a replay tool, an
export, a reader in another language behind a subprocess). The contract writes a log of
arbitrary events, damages it, gives each reader its own copy, and checks that they agree:

- a log is either read or refused by all of them;
- read: the same good records (seq, ts, event, offset, hash), which are the first records
  written, in order, with no gap, and the same torn tail (its offset and the seq of the last
  good record), as far as each reader reports them;
- refused: at the same byte offset and seq (a file that is not a log at all counts as refused
  at offset 0, seq 0, where a damaged header is refused);
- a reader leaves a log it refuses byte for byte as it was; one that reads it may only cut a
  torn tail off (the file then ends where the torn tail began).

Damage is one of: truncation at any byte (header or record), one bit flipped at any byte,
and a record whose frame, checksum and hash chain are sound but whose event does not decode
(from :func:`fedsm.testing.strategies.near_valid_events`). An intact log is read whole by all.

To check your readers, subclass the contract in a test module, set ``__test__ = True`` and give
the factory::

    from fedsm.testing import LogReaderContract
    from fedsm.testing.logreader import LogReading
    from fedsm.log import scan

    class TestMyReaders(LogReaderContract):
        __test__ = True

        def readers(self):
            def read_scan(path):
                view = scan(path)
                torn = view.torn and (view.torn.offset, view.torn.last_good_seq)
                return LogReading(view.records, torn)

            return {"scan": read_scan, "mine": my_reader}

A reader is ``reader(path) -> LogReading | list[Record]``: the good records (objects with
``seq``, ``ts``, ``event``, ``offset`` and ``hash``, as :class:`fedsm.log.Record`) and the torn
tail it found; a bare list reports records but no torn tail. To refuse a log it raises
:class:`~fedsm.log.LogCorrupted` (with ``offset`` and ``seq``) or
:class:`~fedsm.log.LogFormatError`; anything else it raises fails the contract. Give
``records=None`` for a reader that checks a log without handing out records (``verify``).

Optional hooks: :meth:`LogReaderContract.write_log` (how the log is written; fedsm's writer by
default), :meth:`LogReaderContract.events` (what is written),
:meth:`LogReaderContract.check_after_read` (what else a reader must have done, e.g. the
sidecar file of a torn tail), :meth:`LogReaderContract.hypothesis_settings`.

A disagreement fails with a message naming the readers, what each made of the log, and the
damage, e.g. ``readers 'scan' and 'lenient' disagree on a log of 3 records (seq 1-3) damaged
by: bit 4 of byte 211 flipped (in record seq 2, bytes 180-391): one refused the log, the other
read it. 'scan' refused it at offset 180 (seq 2): checksum mismatch; 'lenient' read 2 records
(seq 1, 3), no torn tail``. Hypothesis settings are the loaded profile's (see
:meth:`LogReaderContract.hypothesis_settings`).
"""

from __future__ import annotations

import enum
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from fedsm.core.events import Event
from fedsm.log.format import FRAME, HEADER_SIZE, encode_frame, genesis_hash
from fedsm.log.read import LogCorrupted, LogFormatError
from fedsm.log.writer import EventLog
from fedsm.testing.strategies import any_event, near_valid_events

__all__ = ["NOT_REPORTED", "LogReaderContract", "LogReading", "Reader"]


class _NotReported(enum.Enum):
    NOT_REPORTED = "not reported"

    def __repr__(self) -> str:
        return "NOT_REPORTED"


#: ``LogReading.torn`` of a reader that does not say whether it found a torn tail.
NOT_REPORTED = _NotReported.NOT_REPORTED


@dataclass(frozen=True)
class LogReading:
    """What one reader made of a log it did not refuse.

    ``records``: the good records, in order (``None``: this reader hands out none).
    ``torn``: ``(offset, last_good_seq)`` of the torn tail after them, ``None`` when there is
    none, :data:`NOT_REPORTED` when the reader does not say.
    """

    records: Sequence[Any] | None = None
    torn: tuple[int, int] | None | _NotReported = NOT_REPORTED


#: ``reader(path)``: a :class:`LogReading` or the list of good records; raises
#: :class:`~fedsm.log.LogCorrupted` or :class:`~fedsm.log.LogFormatError` to refuse the log.
Reader = Callable[[Path], "LogReading | Sequence[Any]"]


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class _Outcome:
    """A reader's result, normalised for comparison."""

    refused: tuple[int, int] | None  # (offset, seq)
    reason: str = ""
    rows: tuple[tuple[Any, ...], ...] | None = None
    torn: tuple[int, int] | None | _NotReported = NOT_REPORTED
    records: list[Any] | None = field(default=None, compare=False)

    def describe(self) -> str:
        if self.refused is not None:
            offset, seq = self.refused
            return f"refused it at offset {offset} (seq {seq}): {self.reason}"
        parts = []
        if self.rows is not None:
            parts.append(f"read {_records(len(self.rows))} ({_seqs(r[0] for r in self.rows)})")
        else:
            parts.append("read it (no records reported)")
        if self.torn is None:
            parts.append("no torn tail")
        elif self.torn is not NOT_REPORTED:
            offset, last = self.torn  # type: ignore[misc]
            parts.append(f"a torn tail at offset {offset} after seq {last}")
        return ", ".join(parts)


def _seqs(seqs: Any) -> str:
    seqs = list(seqs)
    if not seqs:
        return "none"
    if seqs == list(range(seqs[0], seqs[-1] + 1)) and len(seqs) > 2:
        return f"seq {seqs[0]}-{seqs[-1]}"
    return "seq " + ", ".join(map(str, seqs))


def _records(n: int) -> str:
    return f"{n} record" if n == 1 else f"{n} records"


def _row(record: Any) -> tuple[Any, ...]:
    return (record.seq, record.ts, record.event, record.offset, record.hash)


# --------------------------------------------------------------------------- damage


def _frames(data: bytes) -> list[int]:
    """Record start offsets of an intact log, then its end."""
    starts, offset = [], HEADER_SIZE
    while offset < len(data):
        starts.append(offset)
        length, _crc = FRAME.unpack_from(data, offset)
        offset += 8 + length
    return [*starts, len(data)]


def _rechained(header: bytes, payloads: list[dict[str, Any]]) -> bytes:
    """A log of ``payloads`` (their type, v, ts and data) with seq and prev made right: every
    frame, checksum and chain link is valid whatever the events say."""
    out, prev = [header], genesis_hash(header)
    for seq, payload in enumerate(payloads, start=1):
        record = {"seq": seq, "type": payload["type"], "v": payload["v"], "ts": payload["ts"],
                  "prev": prev, "data": payload["data"]}  # fmt: skip
        frame = encode_frame(msgpack.packb(record, use_bin_type=True))
        prev = hashlib.blake2b(frame, digest_size=32).digest()
        out.append(frame)
    return b"".join(out)


def _where(at: int, starts: list[int]) -> str:
    if at < HEADER_SIZE:
        return "in the header"
    for index, (start, end) in enumerate(zip(starts, starts[1:], strict=False)):
        if start <= at < end:
            return f"in record seq {index + 1}, bytes {start}-{end - 1}"
    return "at the end of the file"


def _damage(data: st.DataObject, intact: bytes, starts: list[int]) -> tuple[bytes, str]:
    """Draw one damage of ``intact``; return the damaged bytes and what was done."""
    records = len(starts) - 1
    kind = data.draw(st.sampled_from(["truncate", "flip", "bad event"]), label="damage")
    where = data.draw(st.sampled_from(["record"] * 4 + ["header"]), label="where")
    if where == "header" and kind != "bad event":
        at = data.draw(st.integers(0, HEADER_SIZE - 1), label="header byte")
    else:  # somewhere in a record: pick the record, then the byte
        index = data.draw(st.integers(0, records - 1), label="record index")
        size = starts[index + 1] - starts[index]
        at = starts[index] + data.draw(st.integers(0, size - 1), label="byte of it")
    if kind == "truncate":
        at = max(at, 1)  # an empty file is not damage: opening it creates a new log
        return intact[:at], f"truncated to {at} bytes (cut {_where(at, starts)})"
    if kind == "flip":
        bit = data.draw(st.integers(0, 7), label="bit")
        flipped = bytearray(intact)
        flipped[at] ^= 1 << bit
        return bytes(flipped), f"bit {bit} of byte {at} flipped ({_where(at, starts)})"
    # A sound frame, checksum and chain around an event that does not decode.
    type_name, version, event_data, wrong = data.draw(near_valid_events(), label="bad event")
    payloads = [
        msgpack.unpackb(intact[start + 8 : end], raw=False)
        for start, end in zip(starts, starts[1:], strict=False)
    ]
    payloads[index] = {"type": type_name, "v": version, "ts": 1.0, "data": event_data}
    damaged = _rechained(intact[:HEADER_SIZE], payloads)
    what = (
        f"record seq {index + 1} (offset {starts[index]}) rewritten, frame and chain sound, "
        f"with an event that does not decode ({wrong!r} is wrong: type {type_name!r}, v "
        f"{version!r})"
    )
    return damaged, what


# --------------------------------------------------------------------------- the contract


class LogReaderContract:
    """Every reader of a log agrees with every other, intact or damaged (see the module).

    Subclass it, set ``__test__ = True`` and implement :meth:`readers`.
    """

    __test__ = False

    #: Name of the log file each reader is given (in a directory of its own).
    log_name = "job.log"

    # -------------------------------------------------------------------------- factory

    def readers(self) -> Mapping[str, Reader]:
        """The readers to compare, by name (at least two; every pair must agree)."""
        raise NotImplementedError(f"{type(self).__name__} must implement readers()")

    def write_log(self, path: Path, events: Sequence[Event]) -> None:
        """Write ``events`` as a new log at ``path`` (fedsm's writer, ``ts`` 1000.0, 1001.0,
        ...). Override to test logs written another way: the records must be framed and
        chained as fedsm's."""
        with EventLog.open(path, durability="never") as log:
            for i, event in enumerate(events):
                log.append(event, ts=1000.0 + i)

    def events(self) -> st.SearchStrategy[list[Event]]:
        """What the logs hold: 1 to 5 arbitrary events by default."""
        return st.lists(any_event, min_size=1, max_size=5)

    def check_after_read(self, name: str, path: Path, damaged: bytes, reading: LogReading) -> None:
        """Further checks after reader ``name`` read (did not refuse) its copy ``path`` of the
        log ``damaged``; raise AssertionError to fail. Nothing by default."""

    def hypothesis_settings(self) -> settings:
        """Settings of the properties: the loaded profile's (read when a property runs), with
        no deadline (readers touch files) and one counterexample per failure (the simplest
        disagreement found, not a group of them)."""
        return settings(
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            report_multiple_bugs=False,
        )

    # -------------------------------------------------------------------------- properties

    def test_every_reader_reads_an_intact_log_whole(self) -> None:
        """An intact log: every reader reads every record written, and no torn tail."""

        @self.hypothesis_settings()
        @given(events=self.events())
        def intact_log(events: list[Event]) -> None:
            with tempfile.TemporaryDirectory(prefix="fedsm-logreader-") as tmp:
                source = Path(tmp) / "source.log"
                self.write_log(source, events)
                intact = source.read_bytes()
                what = f"an intact log of {_records(len(events))}"
                outcomes = self._read_all(Path(tmp), intact, what)
                for name, outcome in outcomes.items():
                    whole = outcome.refused is None and outcome.torn in (None, NOT_REPORTED)
                    if outcome.rows is not None and len(outcome.rows) != len(events):
                        whole = False
                    if not whole:
                        raise AssertionError(
                            f"reader {name!r} {outcome.describe()} on {what}, which it must "
                            f"read whole ({_records(len(events))}, no torn tail)"
                        )
                self._check_agreement(outcomes, events, what)

        self._readers()  # fail at once, not once per example
        intact_log()

    def test_every_reader_agrees_on_a_damaged_log(self) -> None:
        """Truncated at any byte, with any bit flipped, or with a record whose event does not
        decode, a log reads the same through every reader: the same good records and torn
        tail, or the same refusal at the same offset and seq."""

        @self.hypothesis_settings()
        @given(events=self.events(), data=st.data())
        def damaged_log(events: list[Event], data: st.DataObject) -> None:
            with tempfile.TemporaryDirectory(prefix="fedsm-logreader-") as tmp:
                source = Path(tmp) / "source.log"
                self.write_log(source, events)
                intact = source.read_bytes()
                starts = _frames(intact)
                damaged, how = _damage(data, intact, starts)
                what = (
                    f"a log of {_records(len(events))} ({_seqs(range(1, len(events) + 1))}) "
                    f"damaged by: {how}"
                )
                outcomes = self._read_all(Path(tmp), damaged, what)
                self._check_agreement(outcomes, events, what)
                first = next(iter(outcomes.values()))
                torn = first.refused is None and first.torn not in (None, NOT_REPORTED)
                note(f"{'refused' if first.refused else 'read'}{', torn tail' if torn else ''}")

        self._readers()  # fail at once, not once per example
        damaged_log()

    # -------------------------------------------------------------------------- machinery

    def _readers(self) -> dict[str, Reader]:
        readers = dict(self.readers())
        if len(readers) < 2:
            raise AssertionError(f"{type(self).__name__}.readers() gives fewer than two readers")
        return readers

    def _read_all(self, directory: Path, damaged: bytes, what: str) -> dict[str, _Outcome]:
        readers = self._readers()
        outcomes = {}
        for i, (name, reader) in enumerate(readers.items()):
            own = directory / f"reader-{i}"
            own.mkdir()
            path = own / self.log_name
            path.write_bytes(damaged)
            outcome = self._read_one(name, reader, path, what)
            after = path.read_bytes() if path.exists() else None
            if outcome.refused is not None:
                if after != damaged:
                    raise AssertionError(
                        f"reader {name!r} {outcome.describe()} but modified the file "
                        f"({_size(after)}, was {len(damaged)} bytes); {what}"
                    )
            else:
                allowed = [damaged]
                if isinstance(outcome.torn, tuple):
                    allowed.append(damaged[: outcome.torn[0]])
                if after not in allowed:
                    raise AssertionError(
                        f"reader {name!r} {outcome.describe()} and left the file "
                        f"{_size(after)} long (was {len(damaged)} bytes; a reader may only cut "
                        f"a torn tail off); {what}"
                    )
                reading = LogReading(outcome.records, outcome.torn)
                self.check_after_read(name, path, damaged, reading)
            shutil.rmtree(own, ignore_errors=True)
            outcomes[name] = outcome
        return outcomes

    @staticmethod
    def _read_one(name: str, reader: Reader, path: Path, what: str) -> _Outcome:
        try:
            result = reader(path)
        except LogCorrupted as exc:
            return _Outcome((exc.offset, exc.seq), exc.what)
        except LogFormatError as exc:
            return _Outcome((0, 0), f"not a log ({exc})")
        except Exception as exc:
            raise AssertionError(
                f"reader {name!r} raised {type(exc).__name__}: {exc}; {what}. A reader refuses "
                f"a log with LogCorrupted or LogFormatError, nothing else"
            ) from exc
        if isinstance(result, LogReading):
            records, torn = result.records, result.torn
        else:
            records, torn = result, NOT_REPORTED
        if records is not None:
            records = list(records)
        rows = None if records is None else tuple(map(_row, records))
        return _Outcome(None, rows=rows, torn=torn, records=records)

    @staticmethod
    def _check_agreement(outcomes: dict[str, _Outcome], events: Sequence[Event], what: str) -> None:
        # Each reader's records are the first ones written, in order, without a gap.
        for name, outcome in outcomes.items():
            if outcome.rows is None:
                continue
            seqs = [row[0] for row in outcome.rows]
            got = [row[2] for row in outcome.rows]
            if seqs != list(range(1, len(seqs) + 1)) or got != list(events[: len(got)]):
                raise AssertionError(
                    f"reader {name!r} {outcome.describe()}, which are not the first records "
                    f"written, in order; {what}"
                )
        named = list(outcomes.items())
        pairs = [(a, b) for i, a in enumerate(named) for b in named[i + 1 :]]
        for (ref_name, ref), (name, other) in pairs:
            problem = None
            if (ref.refused is None) != (other.refused is None):
                problem = "one refused the log, the other read it"
            elif ref.refused is not None:
                if ref.refused != other.refused:
                    problem = "they refused it at different places"
            else:
                if ref.rows is not None and other.rows is not None and ref.rows != other.rows:
                    problem = "they read different records"
                elif NOT_REPORTED not in (ref.torn, other.torn) and ref.torn != other.torn:
                    problem = "they found different torn tails"
            if problem is not None:
                raise AssertionError(
                    f"readers {ref_name!r} and {name!r} disagree on {what}: {problem}. "
                    f"{ref_name!r} {ref.describe()}; {name!r} {other.describe()}"
                )


def _size(data: bytes | None) -> str:
    return "deleted" if data is None else f"{len(data)} bytes"
