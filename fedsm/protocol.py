"""Researcher <-> node messages: a closed schema, validation, and the msgpack codec.

Pure core: no sockets, files or clocks. Times (``deadline``) and ids are passed in.

Every message is a frozen dataclass. On the wire it is one msgpack map holding
``protocol_version``, ``command`` and the message's fields. :func:`decode` looks the command
up in a closed table (no class is ever resolved from a name), checks every field's name, type
and size, and raises :class:`MessageDecodeError` naming the field for anything else. Garbage
never gets further than that.

Requests travel researcher -> node and carry ``deadline`` (seconds since the epoch) after
which the researcher no longer waits for the answer. Replies carry the request's
``request_id``; the node's id in a reply is the sender, which transports check against the
topic the message came in on.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import msgpack

from fedsm.errors import FedsmError
from fedsm.fields import make_checkers
from fedsm.fields import short as _short

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "BROADCAST",
    "ProtocolError",
    "MessageDecodeError",
    "MessageTooLarge",
    "ErrorNumber",
    "Message",
    "Request",
    "Reply",
    "PingRequest",
    "PingReply",
    "ListRequest",
    "ListReply",
    "SearchRequest",
    "SearchReply",
    "TrainingPlanStatusRequest",
    "TrainingPlanStatusReply",
    "TrainRequest",
    "TrainReply",
    "ErrorReply",
    "LogMessage",
    "encode",
    "decode",
    "MESSAGE_TYPES",
]

PROTOCOL_VERSION = "1"
#: Upper bound of an encoded message. Model files go through the repository, never here.
MAX_MESSAGE_BYTES = 256 * 1024
#: ``node_id`` of a request sent to every node.
BROADCAST = "*"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_MAX_STR = 4096
_MAX_TEXT = 64 * 1024
_MAX_ITEMS = 10_000
_MAX_DEPTH = 6


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
    ErrorNumber.NODE_BUSY: "the node cannot take this request now",
    ErrorNumber.INTERNAL: "an unexpected error on the node (see the node's log)",
}


# --------------------------------------------------------------------------- field checks
# Each field of a message carries a "kind" in its dataclass metadata; one checker per kind.
# Ids are the protocol's own; the rest are fedsm.fields' lenient set (see there).


def _check_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise MessageDecodeError(
            f"expected an id (1-128 of [A-Za-z0-9_.:-]), got {_short(value)}", name
        )
    return value


def _check_target(name: str, value: Any) -> str:
    if value == BROADCAST:
        return value
    return _check_id(name, value)


_SHARED = make_checkers(
    MessageDecodeError,
    max_str=_MAX_STR,
    max_text=_MAX_TEXT,
    max_items=_MAX_ITEMS,
    max_depth=_MAX_DEPTH,
    strict=False,
)

_CHECKERS = {
    "id": _check_id,
    "target": _check_target,
    **{
        kind: _SHARED[kind]
        for kind in (
            "str",
            "text",
            "opt_str",
            "sha256",
            "opt_sha256",
            "int",
            "nonneg_int",
            "float",
            "bool",
            "float_map",
            "map_list",
        )
    },
    "str_list": _SHARED["str_tuple"],
    "map": _SHARED["plain_map"],
}


def _f(kind: str, **kwargs: Any) -> Any:
    """A dataclass field with its wire kind."""
    if kind not in _CHECKERS:  # pragma: no cover - programming error
        raise AssertionError(kind)
    return field(metadata={"kind": kind}, **kwargs)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, kw_only=True)
class Message:
    """Fields every message has. Don't instantiate; use a concrete message class."""

    command: ClassVar[str] = ""
    is_request: ClassVar[bool] = False

    request_id: str = _f("id")
    researcher_id: str = _f("id")
    node_id: str = _f("target")

    def __post_init__(self) -> None:
        # Constructing a message validates it exactly as decoding would: a message that
        # could not be decoded can not be built either.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _CHECKERS[f.metadata["kind"]](f.name, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        if not self.is_request and self.node_id == BROADCAST:
            raise MessageDecodeError("a reply must name the node that sent it", "node_id")

    def to_dict(self) -> dict[str, Any]:
        """The wire map (without the codec's header fields)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True, kw_only=True)
class Request(Message):
    """A researcher -> node message. ``deadline`` is seconds since the epoch."""

    is_request: ClassVar[bool] = True
    deadline: float = _f("float")


@dataclass(frozen=True, kw_only=True)
class Reply(Message):
    """A node -> researcher message; ``node_id`` is the sender."""


@dataclass(frozen=True, kw_only=True)
class PingRequest(Request):
    command: ClassVar[str] = "ping"


@dataclass(frozen=True, kw_only=True)
class PingReply(Reply):
    command: ClassVar[str] = "pong"


@dataclass(frozen=True, kw_only=True)
class ListRequest(Request):
    command: ClassVar[str] = "list"


@dataclass(frozen=True, kw_only=True)
class ListReply(Reply):
    command: ClassVar[str] = "list-reply"
    datasets: tuple[dict[str, Any], ...] = _f("map_list", default=())


@dataclass(frozen=True, kw_only=True)
class SearchRequest(Request):
    command: ClassVar[str] = "search"
    tags: tuple[str, ...] = _f("str_list")


@dataclass(frozen=True, kw_only=True)
class SearchReply(Reply):
    """Sent even when nothing matches (empty ``datasets``), so nobody waits for silence."""

    command: ClassVar[str] = "search-reply"
    datasets: tuple[dict[str, Any], ...] = _f("map_list", default=())


@dataclass(frozen=True, kw_only=True)
class TrainingPlanStatusRequest(Request):
    command: ClassVar[str] = "training-plan-status"
    job_id: str = _f("id")
    training_plan_url: str = _f("str")
    training_plan_sha256: str = _f("sha256")


@dataclass(frozen=True, kw_only=True)
class TrainingPlanStatusReply(Reply):
    """``status`` is one of approved, rejected, pending, unknown."""

    command: ClassVar[str] = "training-plan-status-reply"
    job_id: str = _f("id")
    training_plan_sha256: str = _f("sha256")
    status: str = _f("str")
    approval_required: bool = _f("bool")

    STATUSES: ClassVar[frozenset[str]] = frozenset({"approved", "rejected", "pending", "unknown"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status not in self.STATUSES:
            raise MessageDecodeError(f"expected one of {sorted(self.STATUSES)}", "status")


@dataclass(frozen=True, kw_only=True)
class TrainRequest(Request):
    """Train one round on one dataset. Digests let the node refuse tampered files."""

    command: ClassVar[str] = "train"
    job_id: str = _f("id")
    round: int = _f("nonneg_int")
    dataset_id: str = _f("id")
    training_plan_url: str = _f("str")
    training_plan_sha256: str = _f("sha256")
    training_plan_class: str = _f("str")
    params_url: str = _f("str")
    params_sha256: str = _f("sha256")
    training_args: dict[str, Any] = _f("map")
    model_args: dict[str, Any] = _f("map")
    seed: int = _f("nonneg_int")
    aggregator_args: dict[str, Any] = _f("map", default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TrainReply(Reply):
    """``timing`` holds seconds: download, training, upload, total."""

    command: ClassVar[str] = "train-reply"
    job_id: str = _f("id")
    round: int = _f("nonneg_int")
    dataset_id: str = _f("id")
    #: The sha256 of the plan source the node actually imported and ran (after checking it
    #: against the request and its approval registry): the node's own word, for the audit.
    training_plan_sha256: str = _f("sha256")
    params_url: str = _f("str")
    params_sha256: str = _f("sha256")
    sample_size: int = _f("nonneg_int")
    metrics: dict[str, float] = _f("float_map", default_factory=dict)
    timing: dict[str, float] = _f("float_map", default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ErrorReply(Reply):
    """A request failed on the node. ``code`` is an :class:`ErrorNumber` value."""

    command: ClassVar[str] = "error"
    code: int = _f("int")
    message: str = _f("text")
    job_id: str | None = _f("opt_str", default=None)
    round: int = _f("int", default=-1)

    @property
    def error_number(self) -> ErrorNumber | None:
        """The code as an :class:`ErrorNumber`, or None for a code this version does not know."""
        try:
            return ErrorNumber(self.code)
        except ValueError:
            return None


@dataclass(frozen=True, kw_only=True)
class LogMessage(Reply):
    command: ClassVar[str] = "log"
    level: str = _f("str")
    message: str = _f("text")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.command: cls
    for cls in (
        PingRequest,
        PingReply,
        ListRequest,
        ListReply,
        SearchRequest,
        SearchReply,
        TrainingPlanStatusRequest,
        TrainingPlanStatusReply,
        TrainRequest,
        TrainReply,
        ErrorReply,
        LogMessage,
    )
}

_FIELDS = {
    command: {f.name: f for f in dataclasses.fields(cls)} for command, cls in MESSAGE_TYPES.items()
}


# --------------------------------------------------------------------------- codec


def encode(message: Message, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Serialise ``message``; raise :class:`MessageTooLarge` past ``max_bytes``."""
    if type(message) not in MESSAGE_TYPES.values():
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    body = {"protocol_version": PROTOCOL_VERSION, "command": message.command}
    body.update(message.to_dict())
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > max_bytes:
        raise MessageTooLarge(
            f"{message.command} message is {len(data)} bytes, over the limit of {max_bytes}; "
            "send big things through the file repository"
        )
    return data


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one message. Anything invalid raises :class:`MessageDecodeError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageDecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageDecodeError(f"message of {len(data)} bytes is over the limit of {max_bytes}")
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=_MAX_TEXT,
            max_bin_len=0,
            max_array_len=_MAX_ITEMS,
            max_map_len=_MAX_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MessageDecodeError(f"not a msgpack message: {exc}") from None
    if not isinstance(body, dict):
        raise MessageDecodeError(f"expected a map, got {type(body).__name__}")
    version = body.pop("protocol_version", None)
    if version != PROTOCOL_VERSION:
        raise MessageDecodeError(
            f"protocol version {_short(version)} is not supported (this side speaks "
            f"{PROTOCOL_VERSION!r})",
            "protocol_version",
        )
    command = body.pop("command", None)
    cls = MESSAGE_TYPES.get(command) if isinstance(command, str) else None
    if cls is None:
        raise MessageDecodeError(f"unknown command {_short(command)}", "command")
    fields = _FIELDS[command]
    unknown = sorted(str(k) for k in body if k not in fields)
    if unknown:
        raise MessageDecodeError(f"unknown field(s) for {command}: {unknown}", unknown[0])
    for name, f in fields.items():
        has_default = not (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if name not in body and not has_default:
            raise MessageDecodeError(f"missing in {command} message", name)
    try:
        return cls(**body)
    except MessageDecodeError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise MessageDecodeError(str(exc)) from None
