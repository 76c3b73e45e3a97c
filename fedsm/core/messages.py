"""Researcher <-> node messages: the closed set of message classes and their field checks.

Pure core: no I/O. Every message is a frozen dataclass whose fields each carry a wire "kind";
constructing a message checks every field exactly as decoding does (the checkers are
fedsm.core.fields' checkers plus the protocol's ids) and raises :class:`MessageDecodeError`
naming the field. :mod:`fedsm.core.protocol` holds the codec and re-exports everything here;
import from there.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedsm.core.eventschema import NODE_APPROVAL_STATUSES
from fedsm.core.fields import make_checkers
from fedsm.core.fields import short as _short
from fedsm.core.protocol_errors import ErrorNumber, MessageDecodeError

__all__ = [
    "BROADCAST",
    "MESSAGE_TYPES",
    "ErrorReply",
    "JobEndReply",
    "JobEndRequest",
    "ListReply",
    "ListRequest",
    "LogMessage",
    "Message",
    "PingReply",
    "PingRequest",
    "Reply",
    "Request",
    "SearchReply",
    "SearchRequest",
    "TrainReply",
    "TrainRequest",
    "TrainingPlanStatusReply",
    "TrainingPlanStatusRequest",
]

#: ``node_id`` of a request sent to every node.
BROADCAST = "*"

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
MAX_STR = 4096
MAX_TEXT = 64 * 1024
MAX_ITEMS = 10_000
MAX_DEPTH = 6


# --------------------------------------------------------------------------- field checks
# Each field of a message carries a "kind" in its dataclass metadata; one checker per kind.
# Ids are the protocol's own; the rest are fedsm.core.fields' checkers (see there).


def _check_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise MessageDecodeError(
            f"expected an id (1-128 of [A-Za-z0-9_.:-]), got {_short(value)}", name
        )
    return value


def _check_head(name: str, value: Any) -> dict[str, Any]:
    """A log head: ``{"seq": n, "hash": <64 hex>}``, the researcher's log as it stood."""
    if type(value) is not dict or set(value) != {"seq", "hash"}:
        raise MessageDecodeError(f"expected a log head {{seq, hash}}, got {_short(value)}", name)
    seq, digest = value["seq"], value["hash"]
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise MessageDecodeError(f"expected a head seq >= 0, got {_short(seq)}", name)
    if type(digest) is not str or not _HEX64_RE.fullmatch(digest):
        raise MessageDecodeError(f"expected a 64 hex digit head hash, got {_short(digest)}", name)
    return value


def _check_opt_head(name: str, value: Any) -> dict[str, Any] | None:
    return None if value is None else _check_head(name, value)


def _check_target(name: str, value: Any) -> str:
    if value == BROADCAST:
        return value
    return _check_id(name, value)


_SHARED = make_checkers(
    MessageDecodeError,
    max_str=MAX_STR,
    max_text=MAX_TEXT,
    max_items=MAX_ITEMS,
    max_depth=MAX_DEPTH,
)

_CHECKERS = {
    "id": _check_id,
    "target": _check_target,
    "head": _check_head,
    "opt_head": _check_opt_head,
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
    """``log_head``: the researcher's job log as it stood when this was sent (the node keeps
    it as a witness; see :mod:`fedsm.core.witness`)."""

    command: ClassVar[str] = "training-plan-status"
    job_id: str = _f("id")
    training_plan_url: str = _f("str")
    training_plan_sha256: str = _f("sha256")
    log_head: dict[str, Any] | None = _f("opt_head", default=None)


@dataclass(frozen=True, kw_only=True)
class TrainingPlanStatusReply(Reply):
    """``status`` is one of approved, rejected, pending, unknown."""

    command: ClassVar[str] = "training-plan-status-reply"
    job_id: str = _f("id")
    training_plan_sha256: str = _f("sha256")
    status: str = _f("str")
    approval_required: bool = _f("bool")

    STATUSES: ClassVar[frozenset[str]] = NODE_APPROVAL_STATUSES

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
    #: False: validate the global parameters on the node's validation data without training
    #: (the seed's ``training: False``); the reply names the same parameters it was sent.
    do_training: bool = _f("bool", default=True)
    #: The researcher's job log as it stood when this was sent (after the RoundSent or
    #: RoundResent deciding it): the node keeps it as a witness. Not part of the request's
    #: identity (a re-send carries a later head).
    log_head: dict[str, Any] | None = _f("opt_head", default=None)


@dataclass(frozen=True, kw_only=True)
class TrainReply(Reply):
    """``timing`` holds seconds: download, training, upload, total. ``extras`` are numbers
    the node sends beside its parameters for the strategy (``num_updates``: optimiser steps
    taken, ``lr``: the optimiser's learning rate), recorded with the reply."""

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
    extras: dict[str, float] = _f("float_map", default_factory=dict)


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
class JobEndRequest(Request):
    """The job ended (``status``: completed, failed or cancelled); ``log_head`` is its final
    head. Nodes record it as a witness and answer; it asks nothing else of them."""

    command: ClassVar[str] = "job-end"
    job_id: str = _f("id")
    status: str = _f("str")
    log_head: dict[str, Any] = _f("head")

    STATUSES: ClassVar[frozenset[str]] = frozenset({"completed", "failed", "cancelled"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status not in self.STATUSES:
            raise MessageDecodeError(f"expected one of {sorted(self.STATUSES)}", "status")


@dataclass(frozen=True, kw_only=True)
class JobEndReply(Reply):
    """The node recorded the final head of ``job_id`` at ``seq``."""

    command: ClassVar[str] = "job-end-reply"
    job_id: str = _f("id")
    seq: int = _f("nonneg_int")


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
        JobEndRequest,
        JobEndReply,
        ErrorReply,
        LogMessage,
    )
}
