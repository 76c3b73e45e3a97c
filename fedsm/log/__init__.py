"""The event log of a job: a framed, checksummed, hash-chained, append-only file.

:class:`EventLog` is its single writer; :func:`scan` and :func:`verify` read it without
writing (the log may be live). The byte format is in :mod:`fedsm.log.format`.
"""

from fedsm.log.format import MAGIC
from fedsm.log.read import (
    Finding,
    LogCorrupted,
    LogError,
    LogFormatError,
    LogLocked,
    LogNotFound,
    LogScan,
    Record,
    TornTail,
    scan,
    verify,
)
from fedsm.log.writer import DURABILITIES, EventLog

__all__ = [
    "DURABILITIES",
    "MAGIC",
    "EventLog",
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
