"""The append-only, framed, checksummed and hash-chained event log of a job.

File layout (little-endian)::

    header  = magic "FEDSMLOG" | format version u16 | reserved u16 | log id (16 bytes)
              | crc32 of the previous 28 bytes u32                              (32 bytes)
    record  = length u32 | checksum u32 | payload (``length`` bytes)
    payload = msgpack map {seq, type, v, ts, prev, data}   (keys in this order)

``checksum`` is ``zlib.crc32`` over the length field and the payload, so it covers the length,
the record's seq (inside the payload) and everything else. CRC-32C would be the textbook
choice but is not in the standard library; zlib's CRC-32 catches the same torn writes and bit
flips (every burst up to 32 bits), runs at memory speed, and tamper evidence is not its job:
``prev`` is. ``prev`` is the BLAKE2b-256 of the previous record's whole frame (for seq 1, of
the header, which holds the random log id), so a record altered, removed, reordered or spliced
in from another log breaks the chain even when its checksum is recomputed.

Opening reads the whole file, checking every record and decoding its event with the same
reader as :func:`scan` (the records are kept for the first :meth:`EventLog.records`). A short,
checksum-failing record at the tail, with no valid record after it, is a torn write: its
bytes are moved to a sidecar ``<log>.torn-<offset>`` (nothing is thrown away), the log is
truncated to the last good record and fsynced, and :attr:`EventLog.recovery` says what
happened. Anything else (a bad record followed by valid ones, a checksum-valid record whose
event does not decode, a break in the sequence or the chain) is corruption:
:meth:`EventLog.open` refuses with :class:`LogCorrupted` naming offset and seq, leaving the
file untouched, unless ``repair=True`` moves everything from the first bad byte to
``<log>.corrupt-<offset>``. Nothing is ever appended after a bad record.

One writer per log, enforced with ``fcntl.flock`` on ``<log>.lock``, which holds the writer's
PID so a second writer is told who holds it. The lock file is left in place on close
(deleting it would race with the next writer); it is an empty claim without the flock.
Readers (:func:`scan`, :func:`verify`) take no lock and never modify the file, so the replay
and audit tools can read a live log.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from fedsm.core.events import Event
from fedsm.log.files import fsync_dir, move_aside, take_lock, write_all
from fedsm.log.format import (
    HEADER_SIZE,
    FrameEncoder,
    genesis_hash,
    make_header,
)
from fedsm.log.read import (
    LogCorrupted,
    LogError,
    LogNotFound,
    Record,
    TornTail,
    gc_paused,
    read_header,
    read_log,
)

__all__ = ["DURABILITIES", "EventLog"]

#: Durability policies: fsync after every append, group commit, ``process`` (every record
#: written to the OS as it is appended, never fsynced: it survives the death of the process,
#: not a crash of the machine; what a simulation uses, whose nodes keep the same promise), or
#: never (buffered in the process until flushed; tests and benchmarks).
DURABILITIES = ("always", "batch", "process", "never")
#: Under ``never``, records are written to the OS once this many bytes are buffered.
_NEVER_BUFFER_BYTES = 1 << 20


# --------------------------------------------------------------------------- the writer


_sync = getattr(os, "fdatasync", os.fsync)
_blake2b = hashlib.blake2b


class EventLog:
    """The single writer of one job's event log. Build it with :meth:`open`.

    ``append`` is thread-safe. Under ``process`` a record is in the OS (not yet on disk) when
    :meth:`append` returns. Records appended under ``batch`` or ``never`` are durable only
    after :meth:`flush` (``batch`` also flushes by itself every ``batch_events`` events or when
    ``batch_interval_ms`` have passed since the oldest unflushed one, checked on append).
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        lock_fd: int,
        log_id: bytes,
        genesis: bytes,
        end: int,
        last_seq: int,
        last_hash: bytes,
        durability: str,
        batch_events: int,
        batch_interval_ms: float,
        recovery: TornTail | None,
        opened: list[Record] | None = None,
    ) -> None:
        self._path = path
        self._fd: int | None = fd
        self._lock_fd = lock_fd
        self._log_id = log_id
        self._genesis = genesis
        self._end = end
        self._last_seq = last_seq
        self._last_hash = last_hash
        self._durability = durability
        self._batch_events = batch_events
        self._batch_interval_s = batch_interval_ms / 1000.0
        self.recovery = recovery
        # The records `open` read, handed out once by the first `records()` call if nothing
        # was appended meanwhile (then dropped: appending or closing drops them too).
        self._opened = opened
        # Frames written to the OS on flush (batch, never); a bytearray grows in place.
        self._pending = bytearray()
        self._pending_count = 0
        self._pending_since = 0.0
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._encoder = FrameEncoder()

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        durability: str = "always",
        batch_events: int = 64,
        batch_interval_ms: float = 10.0,
        repair: bool = False,
        create: bool = True,
        log_id: bytes | None = None,
    ) -> EventLog:
        """Open (creating it if ``create``) the log at ``path`` for writing.

        Takes the writer lock (:class:`LogLocked` if held), reads and decodes every record
        (:func:`~fedsm.log.read.read_log`), moves a torn tail aside (see :attr:`recovery`)
        and refuses a corrupted log with :class:`LogCorrupted` unless ``repair``. ``log_id``
        (16 bytes) is only used when the log is created; it defaults to 16 random bytes.
        """
        if durability not in DURABILITIES:
            raise LogError(f"durability must be one of {DURABILITIES}, got {durability!r}")
        if batch_events < 1 or batch_interval_ms < 0:
            raise LogError("batch_events must be >= 1 and batch_interval_ms >= 0")
        path = Path(path)
        if not create and not path.exists():
            raise LogNotFound(f"no event log at {path} (and create=False)")
        lock_fd = take_lock(path)
        try:
            return cls._open_locked(
                path, lock_fd, durability, batch_events, batch_interval_ms, repair, log_id
            )
        except BaseException:
            os.close(lock_fd)  # closing the fd releases the flock
            raise

    @classmethod
    def _open_locked(
        cls,
        path: Path,
        lock_fd: int,
        durability: str,
        batch_events: int,
        batch_interval_ms: float,
        repair: bool,
        log_id: bytes | None,
    ) -> EventLog:
        if not path.exists() or path.stat().st_size == 0:
            header = make_header(os.urandom(16) if log_id is None else log_id)
            tmp = path.with_name(f"{path.name}.creating-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, header)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        fd = os.open(path, os.O_RDWR)
        try:
            data = path.read_bytes()
            found_id = read_header(path, data)
            genesis = genesis_hash(data[:HEADER_SIZE])
            # Every record is checked and decoded, by the same reader as `scan`; they are
            # kept for the first `records()` call (restoring a job reads them right away).
            with gc_paused():
                records, problems = read_log(data, genesis)
            if records:
                last_seq, last_hash = records[-1].seq, records[-1].hash
            else:
                last_seq, last_hash = 0, genesis
            end, recovery = len(data), None
            if problems:
                problem = problems[0]
                if problem.torn:
                    kind, reason = "torn", problem.what
                elif repair:
                    kind, reason = "corrupt", f"repaired: {problem.what}"
                else:
                    raise LogCorrupted(path, problem.offset, problem.seq, problem.what)
                end = problem.offset
                sidecar = move_aside(path, fd, data, end, kind)
                recovery = TornTail(end, len(data) - end, sidecar, last_seq, reason)
            os.lseek(fd, end, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return cls(
            path,
            fd,
            lock_fd,
            found_id,
            genesis,
            end,
            last_seq,
            last_hash,
            durability,
            batch_events,
            batch_interval_ms,
            recovery,
            records,
        )

    # ----------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def log_id(self) -> bytes:
        return self._log_id

    @property
    def head(self) -> tuple[int, bytes]:
        """``(seq, chain hash)`` of the last record (``(0, genesis)`` for an empty log): what
        the log commits to so far, for witnesses to keep."""
        return self._last_seq, self._last_hash

    @property
    def last_seq(self) -> int:
        """Seq of the last appended record (0 for an empty log)."""
        return self._last_seq

    @property
    def durability(self) -> str:
        return self._durability

    @property
    def closed(self) -> bool:
        return self._fd is None

    # ----------------------------------------------------------------- writing

    def append(self, event: Event, *, ts: float) -> int:
        """Append ``event`` recorded at ``ts`` (seconds since the epoch); return its seq.

        Under ``always`` the record is on disk when this returns. If writing fails the log
        refuses further appends (reopen it: the partial record is then a torn tail).
        """
        if type(ts) is not float:
            ts = float(ts)
        if ts - ts != 0.0:
            raise LogError(f"ts must be a finite number, got {ts!r}")
        with self._lock:
            fd = self._fd
            if fd is None or self._broken is not None:
                fd = self._check_writable()  # raises the precise error
            seq = self._last_seq + 1
            frame = self._encoder.frame(seq, event, ts, self._last_hash)
            self._opened = None
            try:
                if self._durability == "always":
                    write_all(fd, frame)
                    _sync(fd)
                elif self._durability == "process":
                    write_all(fd, frame)
                else:
                    pending = self._pending
                    if not pending:
                        self._pending_since = time.monotonic()
                    pending += frame
                    self._pending_count += 1
                    if self._durability == "batch":
                        if (
                            self._pending_count >= self._batch_events
                            or time.monotonic() - self._pending_since >= self._batch_interval_s
                        ):
                            self._flush_locked(fd, sync=True)
                    elif len(pending) >= _NEVER_BUFFER_BYTES:
                        self._flush_locked(fd, sync=False)
            except OSError as exc:
                self._broken = f"a write failed ({exc})"
                raise LogError(
                    f"{self._path}: writing seq {seq} failed: {exc}; reopen the log"
                ) from exc
            self._last_seq = seq
            self._last_hash = _blake2b(frame, digest_size=32).digest()
            self._end += len(frame)
            return seq

    def append_all(self, events: Sequence[Event], *, ts: float) -> int:
        """Append ``events`` as one write (one fsync under ``always``); return the last seq.

        For facts that belong together, such as a job's opening events: a crash leaves none
        of them or a prefix (a torn tail), never a record in the middle missing. Appending
        under ``batch`` or ``never`` buffers them like :meth:`append`.
        """
        if not events:
            raise LogError("append_all needs at least one event")
        if type(ts) is not float:
            ts = float(ts)
        if ts - ts != 0.0:
            raise LogError(f"ts must be a finite number, got {ts!r}")
        with self._lock:
            fd = self._check_writable()
            self._opened = None
            seq, prev = self._last_seq, self._last_hash
            frames = bytearray()
            for event in events:
                seq += 1
                frame = self._encoder.frame(seq, event, ts, prev)
                prev = _blake2b(frame, digest_size=32).digest()
                frames += frame
            try:
                if self._durability == "always":
                    write_all(fd, frames)
                    _sync(fd)
                elif self._durability == "process":
                    write_all(fd, frames)
                else:
                    if not self._pending:
                        self._pending_since = time.monotonic()
                    self._pending += frames
                    self._pending_count += len(events)
                    self._flush_locked(fd, sync=self._durability == "batch")
            except OSError as exc:
                self._broken = f"a write failed ({exc})"
                raise LogError(
                    f"{self._path}: writing seq {self._last_seq + 1}..{seq} failed: {exc}; "
                    "reopen the log"
                ) from exc
            self._last_seq, self._last_hash = seq, prev
            self._end += len(frames)
            return seq

    def flush(self) -> None:
        """Write buffered records and (unless ``never``) fsync them."""
        with self._lock:
            fd = self._check_writable()
            try:
                self._flush_locked(fd, sync=self._durability not in ("never", "process"))
            except OSError as exc:
                self._broken = f"a write failed ({exc})"
                raise LogError(f"{self._path}: flushing failed: {exc}; reopen the log") from exc

    def _flush_locked(self, fd: int, *, sync: bool) -> None:
        if self._pending:
            write_all(fd, self._pending)
            del self._pending[:]
            self._pending_count = 0
            if sync:
                _sync(fd)

    def _check_writable(self) -> int:
        if self._fd is None:
            raise LogError(f"{self._path}: the log is closed")
        if self._broken is not None:
            raise LogError(f"{self._path}: {self._broken}; reopen the log to recover")
        return self._fd

    # ----------------------------------------------------------------- reading

    def records(self, from_seq: int = 1) -> Iterator[Record]:
        """Every record from ``from_seq`` on (buffered ones are written out first).

        The first call after :meth:`open`, before any append, hands out the records `open`
        read and decoded instead of reading the file again.
        """
        with self._lock:
            fd = self._check_writable()
            kept, self._opened = self._opened, None
            if kept is not None and (kept[-1].seq if kept else 0) != self._last_seq:
                kept = None  # not reached: appending drops them
            if kept is None:
                self._flush_locked(fd, sync=False)
                data = os.pread(fd, self._end, 0)
        if kept is not None:
            yield from kept[max(from_seq, 1) - 1 :]  # they are seqs 1, 2, ... in order
            return
        # The same reader as `scan` and `open`.
        with gc_paused():
            records, problems = read_log(data, self._genesis, from_seq=from_seq)
        del data
        yield from records
        if problems:
            problem = problems[0]
            raise LogCorrupted(self._path, problem.offset, problem.seq, problem.what)

    def events(self, from_seq: int = 1) -> Iterator[Event]:
        """The events of :meth:`records`."""
        for record in self.records(from_seq):
            yield record.event

    # ----------------------------------------------------------------- closing

    def close(self) -> None:
        """Flush, fsync (unless ``never``), and release the file and the writer lock."""
        with self._lock:
            if self._fd is None:
                return
            self._opened = None
            try:
                if self._broken is None:
                    self._flush_locked(self._fd, sync=self._durability != "never")
            finally:
                os.close(self._fd)
                self._fd = None
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"last_seq={self._last_seq}"
        return f"<EventLog {self._path} {self._durability} {state}>"
