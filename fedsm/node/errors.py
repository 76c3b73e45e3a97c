"""Node errors, each bound to the :class:`~fedsm.core.protocol_errors.ErrorNumber` sent as.

A request that fails on the node raises a :class:`RequestFailed` subclass carrying the code;
the node turns it into one ``error`` reply (and one log line) without knowing which step
failed. Errors of the operator's own commands (CLI) are plain :class:`NodeError` subclasses.
"""

from __future__ import annotations

from fedsm.core.protocol_errors import ErrorNumber
from fedsm.errors import FedsmError

__all__ = [
    "NodeError",
    "NodeNotInitialised",
    "NodeDirLocked",
    "NodeStartFailed",
    "DatasetNotRegistered",
    "PlanNotRegistered",
    "AmbiguousPlanDigest",
    "RequestFailed",
    "TrainingFailed",
    "TrainingTimedOut",
    "WorkerCrashed",
    "NodeIOError",
    "RegistryBusy",
]


class NodeError(FedsmError):
    """Something the node or its operator asked for could not be done."""


class NodeNotInitialised(NodeError, FileNotFoundError):
    """The node directory has no ``node.toml``: run ``fedsm node init --dir DIR`` first."""


class NodeDirLocked(NodeError):
    """Another process runs a node on this node directory (``pid`` says which, if known)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class NodeStartFailed(NodeError):
    """``fedsm node start`` could not run the node: its repository does not answer, or its
    bus stopped for good (the broker is gone, or the connection was taken away)."""


class DatasetNotRegistered(NodeError, KeyError):
    """No dataset of this id in the node's registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PlanNotRegistered(NodeError, KeyError):
    """No training plan with this sha256 in the node's registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AmbiguousPlanDigest(NodeError):
    """A digest prefix matches more than one plan of the registry."""


class RequestFailed(NodeError):
    """A request could not be served; ``code`` is what the ``error`` reply says."""

    def __init__(self, code: ErrorNumber, message: str) -> None:
        super().__init__(f"{code.name} ({int(code)}): {message}")
        self.code = code
        self.detail = message


class TrainingFailed(RequestFailed):
    """The plan raised while being imported or trained (code says which)."""

    def __init__(self, message: str, code: ErrorNumber = ErrorNumber.TRAINING_FAILED) -> None:
        super().__init__(code, message)


class TrainingTimedOut(RequestFailed):
    """Training ran past the node's wall-clock limit; the worker running it was killed."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorNumber.TRAINING_TIMED_OUT, message)


class WorkerCrashed(RequestFailed):
    """The worker process died while training (the plan may have killed it)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorNumber.WORKER_CRASHED, message)


class NodeIOError(RequestFailed):
    """The node could not read or write its own files (no space left, read-only file system):
    a fault of the node's machine, not of the request; transient (``NODE_IO_ERROR``)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorNumber.NODE_IO_ERROR, message)


class RegistryBusy(NodeError):
    """The node's registry database is locked by another process (an operator command, say)
    past the wait allowed; try again. A request meeting it is answered ``NODE_BUSY``."""
