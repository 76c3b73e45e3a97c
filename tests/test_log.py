"""The event log: framing, torn tails at every byte offset, corruption, the writer lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedsm.core import events as ev
from fedsm.log.format import HEADER_SIZE
from fedsm.log.read import (
    LogCorrupted,
    LogError,
    LogFormatError,
    LogLocked,
    LogNotFound,
    scan,
    verify,
)
from fedsm.log.writer import EventLog
from fedsm.testing.strategies import job_run

EVENTS = job_run(rounds=1, nodes=3)  # 9 events of 150-450 bytes


def _write(path: Path, events: list[ev.Event] = EVENTS, **kwargs: object) -> list[int]:
    """Write ``events``; return the offsets of their records plus the end offset."""
    with EventLog.open(path, durability="never", **kwargs) as log:  # type: ignore[arg-type]
        for i, event in enumerate(events):
            log.append(event, ts=1000.0 + i)
    return [r.offset for r in scan(path).records] + [path.stat().st_size]


def test_append_then_read_back_everything(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    with EventLog.open(path) as log:
        seqs = [log.append(e, ts=5.0 + i) for i, e in enumerate(EVENTS)]
        assert seqs == list(range(1, len(EVENTS) + 1))
        assert log.last_seq == len(EVENTS)
        assert list(log.events()) == EVENTS
        assert [r.seq for r in log.records(from_seq=4)] == seqs[3:]
        assert [r.ts for r in log.records(from_seq=len(EVENTS) - 1)] == [
            5.0 + len(EVENTS) - 2,
            5.0 + len(EVENTS) - 1,
        ]
    assert [r.event for r in scan(path).records] == EVENTS
    assert verify(path) == []


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    _write(path, EVENTS[:4], log_id=b"0123456789abcdef")
    with EventLog.open(path) as log:
        assert log.last_seq == 4 and log.recovery is None
        assert log.log_id == b"0123456789abcdef"
        for event in EVENTS[4:]:
            log.append(event, ts=2.0)
    assert [r.event for r in scan(path).records] == EVENTS
    assert verify(path) == []


def test_records_chain_hashes(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    _write(path)
    records = scan(path).records
    assert len({r.hash for r in records}) == len(records)
    assert all(len(r.hash) == 32 for r in records)


def test_crash_at_every_byte_offset_of_the_last_records(tmp_path: Path) -> None:
    source = tmp_path / "full.log"
    offsets = _write(source)
    data = source.read_bytes()
    boundaries = offsets  # record starts, then the end of the file
    first_cut = boundaries[-3]  # every byte of the last two records
    for cut in range(first_cut, len(data) + 1):
        path = tmp_path / f"cut-{cut}.log"
        path.write_bytes(data[:cut])
        complete = sum(1 for b in boundaries[1:] if b <= cut)
        kept_end = boundaries[complete]
        with EventLog.open(path) as log:
            assert log.last_seq == complete, cut
            assert list(log.events()) == EVENTS[:complete]
            if cut == kept_end:
                assert log.recovery is None
                continue
            torn = log.recovery
            assert torn is not None and torn.offset == kept_end
            assert torn.last_good_seq == complete
            assert torn.sidecar == path.with_name(f"{path.name}.torn-{kept_end}")
            assert torn.sidecar.read_bytes() == data[kept_end:cut]
        assert path.stat().st_size == kept_end
        # The recovered log takes new records and verifies clean.
        with EventLog.open(path) as log:
            assert log.recovery is None
            log.append(ev.JobFailed(round=1, reason="crashed"), ts=9.0)
        assert verify(path) == []


def test_torn_tail_is_reported_by_readers_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    offsets = _write(path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    view = scan(path)
    assert view.torn is not None and view.torn.offset == offsets[-2]
    assert view.torn.sidecar is None and len(view.records) == len(EVENTS) - 1
    findings = verify(path)
    assert [f.error for f in findings] == [False]
    assert findings[0].seq == len(EVENTS) and "torn tail" in findings[0].what
    assert path.read_bytes() == data[:-3]


def _middle(path: Path) -> tuple[bytes, list[int]]:
    offsets = _write(path)
    return path.read_bytes(), offsets


@pytest.mark.parametrize("where", ["length", "checksum", "payload-start", "payload-end"])
def test_a_flipped_byte_in_the_middle_is_refused_naming_offset_and_seq(
    tmp_path: Path, where: str
) -> None:
    path = tmp_path / "job.log"
    data, offsets = _middle(path)
    seq = 4
    start, end = offsets[seq - 1], offsets[seq]
    at = {
        "length": start,
        "checksum": start + 5,
        "payload-start": start + 9,
        "payload-end": end - 1,
    }
    damaged = bytearray(data)
    damaged[at[where]] ^= 0x40
    path.write_bytes(bytes(damaged))
    with pytest.raises(LogCorrupted) as info:
        EventLog.open(path)
    assert (info.value.offset, info.value.seq) == (start, seq)
    assert f"seq {seq}" in str(info.value) and str(start) in str(info.value)
    with pytest.raises(LogCorrupted):
        scan(path)
    findings = [f for f in verify(path) if f.error]
    assert [(f.offset, f.seq) for f in findings] == [(start, seq)]
    assert path.read_bytes() == bytes(damaged), "refusing must not modify the log"


def test_a_removed_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    data, offsets = _middle(path)
    path.write_bytes(data[: offsets[2]] + data[offsets[3] :])  # drop seq 3
    with pytest.raises(LogCorrupted) as info:
        EventLog.open(path)
    assert info.value.seq == 3 and "sequence" in info.value.what
    findings = verify(path)
    assert findings and all(f.error for f in findings)
    assert "expected seq 3, found seq 4" in findings[0].what


def test_two_swapped_records_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    data, offsets = _middle(path)
    a, b, c = offsets[3], offsets[4], offsets[5]  # seq 4 and seq 5
    path.write_bytes(data[:a] + data[b:c] + data[a:b] + data[c:])
    with pytest.raises(LogCorrupted) as info:
        EventLog.open(path)
    assert (info.value.offset, info.value.seq) == (a, 4)
    assert {f.seq for f in verify(path)} >= {4, 5}


def test_a_recomputed_checksum_does_not_hide_an_edit(tmp_path: Path) -> None:
    """Rewriting a record with a valid frame still breaks the hash chain of the next one."""
    import msgpack

    from fedsm.log.format import encode_frame

    path = tmp_path / "job.log"
    data, offsets = _middle(path)
    start, end = offsets[5], offsets[6]
    payload = msgpack.unpackb(data[start + 8 : end], raw=False)
    payload["data"]["sample_size"] = 10_000  # a reply that claims more samples
    forged = encode_frame(msgpack.packb(payload, use_bin_type=True))
    path.write_bytes(data[:start] + forged + data[end:])
    with pytest.raises(LogCorrupted) as info:
        EventLog.open(path)
    assert info.value.seq == 7 and "hash chain" in info.value.what


def test_repair_keeps_the_good_prefix_and_moves_the_rest_aside(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    data, offsets = _middle(path)
    damaged = bytearray(data)
    damaged[offsets[4] + 20] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with EventLog.open(path, repair=True) as log:
        assert log.last_seq == 4
        assert log.recovery is not None and "repaired" in log.recovery.reason
        assert log.recovery.sidecar is not None
        assert log.recovery.sidecar.read_bytes() == bytes(damaged[offsets[4] :])
    assert verify(path) == []


def test_header_problems(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"not a log at all, but long enough to have a header")
    with pytest.raises(LogFormatError, match="not a fedsm event log"):
        EventLog.open(path)
    path.unlink()
    _write(path)
    damaged = bytearray(path.read_bytes())
    damaged[HEADER_SIZE - 8] ^= 1  # inside the log id: the header checksum fails
    path.write_bytes(bytes(damaged))
    with pytest.raises(LogCorrupted) as info:
        EventLog.open(path)
    assert info.value.offset == 0
    with pytest.raises(LogNotFound):
        EventLog.open(tmp_path / "missing.log", create=False)


def test_two_logs_with_the_same_events_do_not_share_a_chain(tmp_path: Path) -> None:
    """seq 1's prev is the header's hash (with the random id): records can't be spliced."""
    one, two = tmp_path / "one.log", tmp_path / "two.log"
    _write(one)
    _write(two)
    head = two.read_bytes()[:HEADER_SIZE]
    two.write_bytes(head + one.read_bytes()[HEADER_SIZE:])
    with pytest.raises(LogCorrupted) as info:
        EventLog.open(two)
    assert info.value.seq == 1 and "hash chain" in info.value.what


def test_batch_durability_buffers_until_flush_or_batch_size(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    with EventLog.open(path, durability="batch", batch_events=3, batch_interval_ms=60_000) as log:
        log.append(EVENTS[0], ts=1.0)
        log.append(EVENTS[1], ts=1.0)
        assert scan(path).last_seq == 0
        log.append(EVENTS[2], ts=1.0)
        assert scan(path).last_seq == 3
        log.append(EVENTS[3], ts=1.0)
        log.flush()
        assert scan(path).last_seq == 4
        log.append(EVENTS[4], ts=1.0)
    assert scan(path).last_seq == 5  # close flushes


@pytest.mark.parametrize(("durability", "kept"), [("process", len(EVENTS)), ("never", 0)])
def test_process_durability_keeps_every_record_of_a_killed_writer(
    tmp_path: Path, durability: str, kept: int
) -> None:
    """``process``: each record is the OS's once appended, so a writer killed with SIGKILL
    (no flush, no close) loses none; ``never`` buffers them in the process and loses all."""
    path = tmp_path / "job.log"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from fedsm.log.writer import EventLog
        from fedsm.testing.strategies import job_run
        log = EventLog.open(Path({str(path)!r}), durability={durability!r})
        for event in job_run(rounds=1, nodes=3):
            log.append(event, ts=1.0)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert scan(path).last_seq == kept


def test_process_durability_writes_as_it_appends(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    with EventLog.open(path, durability="process") as log:
        for i, event in enumerate(EVENTS[:4], start=1):
            log.append(event, ts=1.0)
            assert scan(path).last_seq == i
        log.append_all(EVENTS[4:6], ts=1.0)
        assert scan(path).last_seq == 6
        log.flush()


def test_append_refuses_bad_input_and_closed_logs(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path / "job.log", durability="never")
    with pytest.raises(TypeError):
        log.append("JobCreated", ts=1.0)  # type: ignore[arg-type]
    with pytest.raises(LogError, match="finite"):
        log.append(EVENTS[0], ts=float("nan"))
    assert log.last_seq == 0
    log.close()
    with pytest.raises(LogError, match="closed"):
        log.append(EVENTS[0], ts=1.0)
    with pytest.raises(LogError, match="durability"):
        EventLog.open(tmp_path / "other.log", durability="sometimes")


def test_a_second_writer_in_this_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    with EventLog.open(path):
        with pytest.raises(LogLocked) as info:
            EventLog.open(path)
        assert info.value.pid == os.getpid()
    with EventLog.open(path) as log:  # released on close
        assert log.last_seq == 0


def test_a_second_writer_process_gets_the_lock_error_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    script = textwrap.dedent(
        """
        import sys
        from fedsm.log import EventLog, LogLocked
        try:
            EventLog.open(sys.argv[1])
        except LogLocked as exc:
            print(f"locked by {exc.pid}: {exc}")
            sys.exit(3)
        sys.exit(0)
        """
    )
    with EventLog.open(path) as log:
        log.append(EVENTS[0], ts=1.0)
        result = subprocess.run(
            [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 3, result.stderr
    assert f"locked by {os.getpid()}" in result.stdout
    assert f"process {os.getpid()}" in result.stdout
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_frames_are_exactly_msgpack_of_the_documented_record_map(tmp_path: Path) -> None:
    """The writer packs the record map piecewise for speed; the bytes must stay what packing
    the documented map {seq, type, v, ts, prev, data} gives, and the reader must agree."""
    import msgpack

    from fedsm.core.events import encode_event
    from fedsm.log.format import FrameEncoder, encode_frame

    encoder = FrameEncoder()
    prev = bytes(range(32))
    for seq, (event, ts) in enumerate(zip(EVENTS, (0.0, -1.5, 1.7e9, 2.0**60), strict=False)):
        encoded = encode_event(event)
        record = {"seq": 10**seq, "type": encoded["type"], "v": encoded["v"], "ts": ts,
                  "prev": prev, "data": encoded["data"]}  # fmt: skip
        expected = encode_frame(msgpack.packb(record, use_bin_type=True))
        assert encoder.frame(10**seq, event, ts, prev) == expected, type(event).__name__
    with pytest.raises(TypeError):
        encoder.frame(1, "JobCreated", 1.0, prev)  # type: ignore[arg-type]


def test_append_all_writes_events_as_one_chained_run(tmp_path) -> None:
    """Facts that belong together (a job's opening) are one write: all or a prefix."""
    from fedsm.core.events import JobCancelled

    path = tmp_path / "x.log"
    with EventLog.open(path) as log_:
        assert log_.append(JobCancelled(round=0, reason="a"), ts=1.0) == 1
        events = [JobCancelled(round=r, reason=str(r)) for r in (1, 2)]
        assert log_.append_all(events, ts=2.0) == 3
        assert log_.append(JobCancelled(round=3, reason="d"), ts=3.0) == 4
    records = scan(path).records
    assert [r.seq for r in records] == [1, 2, 3, 4]
    assert [r.event.round for r in records] == [0, 1, 2, 3]
    with EventLog.open(path) as log_, pytest.raises(LogError):
        log_.append_all([], ts=1.0)


# --------------------------------------------------------------------------- undecodable events


def _payloads(data: bytes, offsets: list[int]) -> list[dict[str, object]]:
    """The payload maps of the records at ``offsets`` (record starts, then the end)."""
    import msgpack

    return [
        msgpack.unpackb(data[start + 8 : end], raw=False)
        for start, end in zip(offsets, offsets[1:], strict=False)
    ]


def _chained(header: bytes, payloads: list[dict[str, object]]) -> tuple[bytes, list[int]]:
    """A log of ``payloads`` (their type, v, ts and data) with seq and prev made right: every
    frame, checksum and chain link is valid whatever the events say. Returns the bytes and the
    record offsets."""
    import hashlib

    import msgpack

    from fedsm.log.format import encode_frame, genesis_hash

    out, offsets, prev = [header], [], genesis_hash(header)
    size = len(header)
    for seq, payload in enumerate(payloads, start=1):
        record = {"seq": seq, "type": payload["type"], "v": payload["v"], "ts": payload["ts"],
                  "prev": prev, "data": payload["data"]}  # fmt: skip
        frame = encode_frame(msgpack.packb(record, use_bin_type=True))
        prev = hashlib.blake2b(frame, digest_size=32).digest()
        offsets.append(size)
        out.append(frame)
        size += len(frame)
    return b"".join(out), offsets


BAD_EVENTS = {
    "wrong field type": {"type": "JobFailed", "v": 1, "data": {"round": "one", "reason": "x"}},
    "missing field": {"type": "JobFailed", "v": 1, "data": {"round": 1}},
    "unknown type": {"type": "NoSuchEvent", "v": 1, "data": {}},
    "future version": {"type": "JobFailed", "v": 99, "data": {"round": 1, "reason": "x"}},
}


@pytest.mark.parametrize("bad", sorted(BAD_EVENTS))
@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_sound_frame_whose_event_does_not_decode_is_corruption(
    tmp_path: Path, bad: str, where: str
) -> None:
    """Checksum and chain right, event wrong: not a torn tail. Every reader refuses it at
    its offset and seq, open leaves the file as it is, repair moves it and the rest aside."""
    path = tmp_path / "job.log"
    offsets = _write(path)
    good = path.read_bytes()
    payloads = _payloads(good, offsets)
    seq = 5 if where == "middle" else len(payloads)
    payloads[seq - 1] = {**BAD_EVENTS[bad], "ts": 7.0}
    data, starts = _chained(good[:HEADER_SIZE], payloads)
    # The records around it are what the writer itself would write.
    assert data[: starts[seq - 1]] == good[: offsets[seq - 1]]
    path.write_bytes(data)
    offset = starts[seq - 1]

    with pytest.raises(LogCorrupted) as info:
        EventLog.open(path)
    assert (info.value.offset, info.value.seq) == (offset, seq)
    assert "does not decode" in info.value.what
    assert path.read_bytes() == data, "refusing must not modify the log"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.log", "job.log.lock"]
    with pytest.raises(LogCorrupted) as scanned:
        scan(path)
    assert (scanned.value.offset, scanned.value.seq) == (offset, seq)
    findings = verify(path)
    assert [(f.offset, f.seq, f.error) for f in findings] == [(offset, seq, True)]
    assert "does not decode" in findings[0].what
    assert path.read_bytes() == data

    with EventLog.open(path, repair=True) as log:
        assert log.last_seq == seq - 1
        assert list(log.events()) == EVENTS[: seq - 1]
        recovery = log.recovery
        assert recovery is not None and recovery.offset == offset
        assert recovery.last_good_seq == seq - 1 and "does not decode" in recovery.reason
        assert recovery.sidecar == path.with_name(f"job.log.corrupt-{offset}")
        assert recovery.sidecar.read_bytes() == data[offset:]
        assert log.append(ev.JobFailed(round=1, reason="repaired"), ts=9.0) == seq
    assert path.read_bytes()[:offset] == data[:offset]
    assert [r.event for r in scan(path).records] == [
        *EVENTS[: seq - 1],
        ev.JobFailed(round=1, reason="repaired"),
    ]
    assert verify(path) == []


def test_the_first_read_after_open_hands_out_the_records_open_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restoring a job opens the log and reads it: the file is read and decoded once."""
    import fedsm.log.writer as writer

    path = tmp_path / "job.log"
    _write(path)
    calls: list[int] = []
    real = writer.read_log

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "read_log", counting)
    with EventLog.open(path) as log:
        assert len(calls) == 1
        assert list(log.events()) == EVENTS
        assert len(calls) == 1, "the first read uses the records open decoded"
        assert [r.seq for r in log.records(from_seq=4)] == list(range(4, len(EVENTS) + 1))
        assert len(calls) == 2, "they are handed out once"
    with EventLog.open(path) as log:
        assert [r.seq for r in log.records(from_seq=len(EVENTS))] == [len(EVENTS)]
        assert [r.seq for r in log.records(from_seq=len(EVENTS) + 5)] == []
    with EventLog.open(path) as log:
        log.append(ev.JobFailed(round=1, reason="x"), ts=1.0)  # drops them: stale
        assert list(log.events()) == [*EVENTS, ev.JobFailed(round=1, reason="x")]
    with EventLog.open(path) as log:
        records = list(log.records())
    assert [(r.seq, r.offset, r.hash, r.event) for r in records] == [
        (r.seq, r.offset, r.hash, r.event) for r in scan(path).records
    ]


# Every reader (scan, EventLog.open + records(), verify) agrees on a damaged log: the property
# is fedsm.testing.LogReaderContract, run on fedsm's readers in tests/test_testing_logreader.py.
