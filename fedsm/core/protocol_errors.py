"""The protocol's errors: exceptions for bad messages and the stable codes of error replies.

Pure core: no I/O. Re-exported by :mod:`fedsm.core.protocol`, which is where callers import them.
"""

from __future__ import annotations

from enum import IntEnum

from fedsm.errors import FedsmError

__all__ = [
    "ErrorNumber",
    "MessageDecodeError",
    "MessageTooLarge",
    "ProtocolError",
    "TRANSIENT_ERRORS",
]


class ProtocolError(FedsmError):
    """A message broke the protocol (base class)."""


class MessageDecodeError(ProtocolError, ValueError):
    """Bytes that are not a valid message. ``field`` names the offending field, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message if field is None else f"field {field!r}: {message}")
        self.field = field


class MessageTooLarge(ProtocolError, ValueError):
    """An encoded message is over :data:`MAX_MESSAGE_BYTES` (or a transport's own limit)."""


class ErrorNumber(IntEnum):
    """Stable error codes of ``error`` replies. Never renumber; retire codes by leaving a gap.

    1xx: the request itself; 2xx: files and repository; 3xx: approval; 4xx: data;
    5xx: training; 9xx: the node itself.
    """

    BAD_REQUEST = 100
    UNKNOWN_COMMAND = 101
    PROTOCOL_VERSION_MISMATCH = 102
    REPOSITORY_UNREACHABLE = 200
    PLAN_DIGEST_MISMATCH = 201
    PARAMS_DIGEST_MISMATCH = 202
    PARAMS_INVALID = 203
    PLAN_NOT_APPROVED = 300
    PLAN_REJECTED = 301
    DATASET_NOT_FOUND = 400
    DATASET_INVALID = 401
    TRAINING_FAILED = 500
    TRAINING_TIMED_OUT = 501
    WORKER_CRASHED = 502
    PLAN_IMPORT_FAILED = 503
    NODE_BUSY = 900
    NODE_IO_ERROR = 901
    INTERNAL = 999

    @property
    def meaning(self) -> str:
        """One line an operator can act on."""
        return _ERROR_MEANINGS[self]


_ERROR_MEANINGS = {
    ErrorNumber.BAD_REQUEST: "the request is malformed or has invalid arguments",
    ErrorNumber.UNKNOWN_COMMAND: "the node does not know this command",
    ErrorNumber.PROTOCOL_VERSION_MISMATCH: "researcher and node speak different protocol versions",
    ErrorNumber.REPOSITORY_UNREACHABLE: "the node could not reach the file repository",
    ErrorNumber.PLAN_DIGEST_MISMATCH: "the training plan file does not hash to the digest sent",
    ErrorNumber.PARAMS_DIGEST_MISMATCH: "the parameters file does not hash to the digest sent",
    ErrorNumber.PARAMS_INVALID: "the parameters file is not a valid parameter file for the model",
    ErrorNumber.PLAN_NOT_APPROVED: "the training plan is not approved on this node",
    ErrorNumber.PLAN_REJECTED: "the training plan was rejected by this node's operator",
    ErrorNumber.DATASET_NOT_FOUND: "no dataset of this id on this node",
    ErrorNumber.DATASET_INVALID: "the dataset could not be loaded",
    ErrorNumber.TRAINING_FAILED: "the training plan raised an error",
    ErrorNumber.TRAINING_TIMED_OUT: "training ran past the node's time limit and was stopped",
    ErrorNumber.WORKER_CRASHED: "the training worker process died",
    ErrorNumber.PLAN_IMPORT_FAILED: "the training plan source could not be imported",
    ErrorNumber.NODE_BUSY: "the node cannot take this request now (its registry is in use); "
    "it may be asked again",
    ErrorNumber.NODE_IO_ERROR: "the node could not read or write its own files (disk full, "
    "read-only file system); it may be asked again once its operator made room",
    ErrorNumber.INTERNAL: "an unexpected error on the node (see the node's log)",
}


#: Codes that say nothing about the request or the plan, only about the node's state at the
#: time: the round policy may ask the node again (same request id) within the round, and the
#: outcome of a run does not change because a disk filled or a registry was locked for a while.
TRANSIENT_ERRORS: frozenset[ErrorNumber] = frozenset(
    {ErrorNumber.NODE_BUSY, ErrorNumber.NODE_IO_ERROR}
)
