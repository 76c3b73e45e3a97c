"""LogReaderContract run against fedsm's own readers (scan, EventLog.open + records(), verify),
and against deliberately broken readers, which it must catch with a readable message."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from fedsm.log.format import HEADER_SIZE, genesis_hash
from fedsm.log.read import LogCorrupted, LogError, read_header, read_log, scan, verify
from fedsm.log.writer import EventLog
from fedsm.testing import LogReaderContract
from fedsm.testing.logreader import LogReading, Reader


def read_scan(path: Path) -> LogReading:
    view = scan(path)
    return LogReading(view.records, view.torn and (view.torn.offset, view.torn.last_good_seq))


def read_open(path: Path) -> LogReading:
    """The writer: refuses on open or never; moves a torn tail aside."""
    with EventLog.open(path, repair=False) as log:
        torn = log.recovery and (log.recovery.offset, log.recovery.last_good_seq)
        try:
            return LogReading(list(log.records()), torn)
        except LogError as exc:
            raise AssertionError(f"open took a log records() refuses: {exc}") from exc


def read_verify(path: Path) -> LogReading:
    """verify's first finding is where the others stop: an error exactly when they refuse,
    else a torn tail (the only finding) or nothing."""
    findings = verify(path)
    if not findings:
        return LogReading(None, None)
    first = findings[0]
    if first.error:
        raise LogCorrupted(path, first.offset, first.seq, first.what)
    if len(findings) != 1:
        raise AssertionError(f"verify found a torn tail, then more: {findings}")
    return LogReading(None, (first.offset, first.seq - 1))


class TestFedsmLogReaders(LogReaderContract):
    __test__ = True

    def readers(self) -> Mapping[str, Reader]:
        return {"scan": read_scan, "open": read_open, "verify": read_verify}

    def check_after_read(self, name: str, path: Path, damaged: bytes, reading: LogReading) -> None:
        if name != "open":
            return
        if reading.torn is None:
            assert path.read_bytes() == damaged
            return
        offset = reading.torn[0]  # type: ignore[index]
        assert path.read_bytes() == damaged[:offset]
        sidecar = path.with_name(f"{path.name}.torn-{offset}")
        assert sidecar.read_bytes() == damaged[offset:], "the torn tail goes to its sidecar"


# --------------------------------------------------------------------------- broken readers


def read_skipping(path: Path) -> LogReading:
    """Broken: reads past a bad record instead of refusing the log."""
    data = path.read_bytes()
    read_header(path, data)
    records, problems = read_log(data, genesis_hash(data[:HEADER_SIZE]), keep_going=True)
    torn = [(p.offset, p.seq - 1) for p in problems if p.torn]
    return LogReading(records, torn[0] if torn else None)


def read_blind_to_torn_tails(path: Path) -> LogReading:
    """Broken: says there is no torn tail when there is one."""
    return LogReading(scan(path).records, None)


def read_repairing(path: Path) -> LogReading:
    """Broken: repairs what it reads (keeps the good prefix, moves the rest aside) instead of
    refusing a damaged log."""
    with EventLog.open(path, repair=True) as log:
        torn = log.recovery and (log.recovery.offset, log.recovery.last_good_seq)
        return LogReading(list(log.records()), torn)


def read_crashing(path: Path) -> list[object]:
    """Broken: fails with an untyped error on a damaged log."""
    view = scan(path)
    if view.torn is not None:
        raise ValueError("unexpected end of data")
    return view.records


class _Broken(TestFedsmLogReaders):
    __test__ = False

    def __init__(self, name: str, reader: Reader) -> None:
        self.name, self.reader = name, reader

    def readers(self) -> Mapping[str, Reader]:
        return {"scan": read_scan, self.name: self.reader}

    def check_after_read(self, name: str, path: Path, damaged: bytes, reading: LogReading) -> None:
        pass


@pytest.mark.parametrize(
    ("reader", "expected"),
    [
        (read_skipping, ["not the first records written", "one refused the log, the other"]),
        (read_blind_to_torn_tails, ["they found different torn tails"]),
        (read_repairing, ["one refused the log, the other read it"]),
        (read_crashing, ["raised ValueError: unexpected end of data"]),
    ],
)
def test_a_broken_reader_fails_the_contract_naming_itself_and_the_damage(
    reader: Reader, expected: list[str]
) -> None:
    contract = _Broken("broken", reader)
    with pytest.raises(AssertionError) as info:
        contract.test_every_reader_agrees_on_a_damaged_log()
    message = str(info.value)
    assert "'broken'" in message and "damaged by: " in message, message
    assert any(text in message for text in expected), message
    # The damage is spelled out: what was done, and where.
    assert any(k in message for k in ("truncated to", "flipped", "does not decode")), message
    assert "offset" in message or "byte" in message, message


def test_the_broken_readers_read_an_intact_log_whole() -> None:
    """They only fail on damage: the intact property passes for them."""
    for reader in (read_skipping, read_blind_to_torn_tails, read_repairing, read_crashing):
        _Broken("broken", reader).test_every_reader_reads_an_intact_log_whole()


def test_a_contract_needs_two_readers() -> None:
    class One(TestFedsmLogReaders):
        __test__ = False

        def readers(self) -> Mapping[str, Reader]:
            return {"scan": read_scan}

    with pytest.raises(AssertionError, match="fewer than two readers"):
        One().test_every_reader_reads_an_intact_log_whole()
