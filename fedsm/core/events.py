"""The event catalogue of a Job and its codec.

Pure core: no files, sockets, clocks or random numbers. Every event is a frozen dataclass
that records a fact of the run (``RoundSent`` is written after the request was published,
``ReplyReceived`` after the params file was downloaded and its digest checked). Events carry
digests and URLs, never tensors.

Constructing an event validates it exactly as decoding would, so an event that could not be
read back can not be written either. Sequences are tuples and maps plain dicts of JSON-like
values, so ``decode_event(**encode_event(e)) == e`` for every event built here.

Decoding looks the type name up in the closed registry :data:`EVENT_TYPES` (no class is
ever resolved from a name on the wire), checks every field's name and type and raises
:class:`EventDecodeError` naming the field. An event written under an older schema version
goes through the class's upcasters, ``upcast_v1_v2(data) -> data`` and so on, applied in a
loop (the eventsourcing library's convention) before it is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fedsm.core.eventschema import EventDecodeError
from fedsm.core.eventschema import kind_field as _f
from fedsm.core.eventschema import spec_of as _spec_of
from fedsm.core.fields import short as _short

__all__ = [
    "EVENT_TYPES",
    "Aggregated",
    "ApprovalAsked",
    "ApprovalChecked",
    "Event",
    "JobCancelled",
    "JobCompleted",
    "JobCreated",
    "JobFailed",
    "NodeFailed",
    "NodeRetrying",
    "ParamsUploaded",
    "ReplyReceived",
    "RoundResent",
    "RoundSent",
    "RoundTimedOut",
    "SettingsChanged",
    "TrainingPlanUploaded",
    "decode_event",
    "encode_event",
    "fast_decoders",
]

# --------------------------------------------------------------------------- events


def _without(data: dict[str, Any], name: str) -> dict[str, Any]:
    """``data`` without the field ``name`` (an upcaster dropping a retired field)."""
    return {k: v for k, v in data.items() if k != name}


@dataclass(frozen=True)
class Event:
    """Base of every event. Don't instantiate; use a concrete event class.

    ``type_name`` is the name on the wire (the class name); ``version`` the schema version of
    the class's fields. A class whose schema changes bumps ``version`` and adds a static
    method ``upcast_v<N>_v<N+1>(data: dict) -> dict`` that turns data of version N into N+1.
    """

    type_name: ClassVar[str] = "Event"
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__

    def __post_init__(self) -> None:
        # Validate exactly as decoding does; store normalised values (lists -> tuples).
        setter = object.__setattr__
        for name, check in _spec_of(type(self)):
            value = getattr(self, name)
            checked = check(name, value)
            if checked is not value:
                setter(self, name, checked)


@dataclass(frozen=True)
class JobCreated(Event):
    """A job was defined: everything needed to run it again, including the seed."""

    job_id: str = _f("str")
    researcher_id: str = _f("str")
    training_plan_class: str = _f("str")
    training_args: dict[str, Any] = _f("plain_map")
    model_args: dict[str, Any] = _f("plain_map")
    seed: int = _f("int")
    nodes: tuple[str, ...] = _f("str_tuple")
    datasets: dict[str, str] = _f("str_map")
    round_limit: int = _f("nonneg_int")
    min_nodes: int = _f("nonneg_int")
    reply_deadline_s: float = _f("float")
    aggregator: str = _f("str")
    aggregator_args: dict[str, Any] = _f("plain_map")
    tags: tuple[str, ...] = _f("str_tuple")


@dataclass(frozen=True)
class TrainingPlanUploaded(Event):
    """The job's training plan source, by digest: the file the job uploads and nodes approve.

    Version 2 drops ``url``: the log names artifacts by digest only (where the repository
    is, is configuration at resume), so a run directory can move.
    """

    version: ClassVar[int] = 2

    sha256: str = _f("sha256")
    class_name: str = _f("str")

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
        """Version 1 also recorded the upload URL, a location of the machine that ran it."""
        return _without(data, "url")


@dataclass(frozen=True)
class ParamsUploaded(Event):
    """The job's global parameters, by digest. The initial parameters are round 0.

    Version 2 drops ``url`` (see :class:`TrainingPlanUploaded`).
    """

    version: ClassVar[int] = 2

    round: int = _f("nonneg_int")
    sha256: str = _f("sha256")

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
        """Version 1 also recorded the upload URL."""
        return _without(data, "url")


@dataclass(frozen=True)
class ApprovalAsked(Event):
    """The researcher decided to ask these nodes whether they approve the plan of this digest
    (recorded before the ``training-plan-status`` requests go: a node records an unknown plan
    as pending, an effect the log must decide first)."""

    plan_sha256: str = _f("sha256")
    nodes: tuple[str, ...] = _f("str_tuple")


@dataclass(frozen=True)
class ApprovalChecked(Event):
    """The nodes answered (or not) whether they approve the training plan of this digest."""

    plan_sha256: str = _f("sha256")
    statuses: dict[str, str] = _f("status_map")
    approval_required: dict[str, bool] = _f("bool_map")


@dataclass(frozen=True)
class RoundSent(Event):
    """A round was decided: its train requests go to these nodes, after this is recorded.

    ``aggregator_args`` are the per-node arguments of the strategy for this round, exactly as
    the requests carry them except that an argument sent as a file is ``{"sha256": digest}``
    (its URL is derived from the repository at send time). A request re-sent after a
    restore is rebuilt from this event, so it is the very request a node may already have
    answered. Version 2 drops ``params_url`` and adds ``aggregator_args``; version 3 adds
    ``do_training`` (False: a validation-only round, the seed's ``do_training=False``: the
    nodes validate the current global parameters and train nothing).
    """

    version: ClassVar[int] = 3

    round: int = _f("nonneg_int")
    nodes: tuple[str, ...] = _f("str_tuple")
    request_ids: dict[str, str] = _f("str_map")
    params_sha256: str = _f("sha256")
    deadline: float = _f("float")
    aggregator_args: dict[str, Any] = _f("plain_map")
    do_training: bool = _f("bool", default=True)

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
        """Version 1 recorded the params URL and no aggregator args (FedAvg sent none)."""
        return {**_without(data, "params_url"), "aggregator_args": {}}

    @staticmethod
    def upcast_v2_v3(data: dict[str, Any]) -> dict[str, Any]:
        """Version 2 rounds all trained."""
        return {**data, "do_training": True}


@dataclass(frozen=True)
class SettingsChanged(Event):
    """The researcher changed the job's settings; they apply from the next round on.

    ``changes`` holds any of ``nodes`` (a list of node ids, all with a dataset in the job),
    ``training_args`` (a map, the whole new set) and ``round_limit`` (an int: the last round
    that may train; raising it reopens a completed job). ``round`` is the round it follows.
    """

    round: int = _f("nonneg_int")
    changes: dict[str, Any] = _f("plain_map")


@dataclass(frozen=True)
class RoundResent(Event):
    """After a restore, the current round's requests go again, same ids, to these nodes.

    ``deadline`` is the round's new reply deadline (a resumed run gives the pending nodes a
    fresh window); 0.0 in version-1 logs, which kept the round's deadline.
    """

    version: ClassVar[int] = 2

    round: int = _f("nonneg_int")
    nodes: tuple[str, ...] = _f("str_tuple")
    deadline: float = _f("float")

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
        """Version 1 did not move the deadline."""
        return {**data, "deadline": 0.0}


@dataclass(frozen=True)
class ReplyReceived(Event):
    """A node's reply arrived and its params file was downloaded and its digest checked.

    Version 2 adds ``training_plan_sha256``: the digest of the plan the node says it ran
    (None in version-1 logs, which did not record it). Version 3 drops ``params_url``: the
    parameters are named by digest. Version 4 adds ``extras``: the numbers the node sent
    beside its parameters (``num_updates``, ``lr``: what Scaffold needs), empty before.
    """

    version: ClassVar[int] = 4

    round: int = _f("nonneg_int")
    node_id: str = _f("str")
    request_id: str = _f("str")
    params_sha256: str = _f("sha256")
    sample_size: int = _f("nonneg_int")
    metrics: dict[str, float] = _f("float_map")
    timing: dict[str, float] = _f("float_map")
    training_plan_sha256: str | None = field(default=None, metadata={"kind": "opt_sha256"})
    extras: dict[str, float] = field(default_factory=dict, metadata={"kind": "float_map"})

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
        """Version 1 did not record which plan the node ran."""
        return {**data, "training_plan_sha256": None}

    @staticmethod
    def upcast_v2_v3(data: dict[str, Any]) -> dict[str, Any]:
        """Version 2 also recorded the URL the node uploaded to."""
        return _without(data, "params_url")

    @staticmethod
    def upcast_v3_v4(data: dict[str, Any]) -> dict[str, Any]:
        """Version 3 recorded no reply extras."""
        return {**data, "extras": {}}


@dataclass(frozen=True)
class NodeFailed(Event):
    """A node answered the round's request with an error."""

    round: int = _f("nonneg_int")
    node_id: str = _f("str")
    request_id: str = _f("str")
    code: int = _f("int")
    message: str = _f("text")


@dataclass(frozen=True)
class NodeRetrying(Event):
    """A node answered the round's request with a transient error (its disk was full, its
    registry busy: :data:`~fedsm.core.protocol_errors.TRANSIENT_ERRORS`). It stays pending;
    the same request goes to it again at ``retry_at`` (the job's clock) if the round is
    still open then (a ``RoundResent`` naming it)."""

    round: int = _f("nonneg_int")
    node_id: str = _f("str")
    request_id: str = _f("str")
    code: int = _f("int")
    message: str = _f("text")
    retry_at: float = _f("float")


@dataclass(frozen=True)
class RoundTimedOut(Event):
    """The round's deadline passed; these nodes had neither replied nor failed."""

    round: int = _f("nonneg_int")
    missing: tuple[str, ...] = _f("str_tuple")


@dataclass(frozen=True)
class Aggregated(Event):
    """The round's replies were aggregated into new global parameters (by digest; uploaded
    after this is recorded). Version 2 drops ``params_url``. Version 3 adds
    ``state_sha256``: the strategy's state after this round (a file of tensors: a server
    optimiser's moments, Scaffold's control variates), None for a stateless strategy."""

    version: ClassVar[int] = 3

    round: int = _f("nonneg_int")
    params_sha256: str = _f("sha256")
    nodes: tuple[str, ...] = _f("str_tuple")
    weights: dict[str, float] = _f("float_map")
    aggregator: str = _f("str")
    state_sha256: str | None = field(default=None, metadata={"kind": "opt_sha256"})

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
        """Version 1 also recorded the upload URL."""
        return _without(data, "params_url")

    @staticmethod
    def upcast_v2_v3(data: dict[str, Any]) -> dict[str, Any]:
        """Version 2 had no strategy state (FedAvg keeps none)."""
        return {**data, "state_sha256": None}


@dataclass(frozen=True)
class JobCompleted(Event):
    """The job finished; these are its final parameters. Version 2 drops ``params_url``."""

    version: ClassVar[int] = 2

    round: int = _f("nonneg_int")
    params_sha256: str = _f("sha256")

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
        """Version 1 also recorded the URL."""
        return _without(data, "params_url")


@dataclass(frozen=True)
class JobFailed(Event):
    """The job stopped because of an error."""

    round: int = _f("nonneg_int")
    reason: str = _f("text")


@dataclass(frozen=True)
class JobCancelled(Event):
    """The job was stopped on purpose."""

    round: int = _f("nonneg_int")
    reason: str = _f("text")


#: The closed registry of event types, by wire name.
EVENT_TYPES: Mapping[str, type[Event]] = {
    cls.type_name: cls
    for cls in (
        JobCreated,
        TrainingPlanUploaded,
        ParamsUploaded,
        ApprovalAsked,
        ApprovalChecked,
        SettingsChanged,
        RoundSent,
        RoundResent,
        ReplyReceived,
        NodeFailed,
        NodeRetrying,
        RoundTimedOut,
        Aggregated,
        JobCompleted,
        JobFailed,
        JobCancelled,
    )
}
for _cls in EVENT_TYPES.values():
    _spec_of(_cls)

_FAST_DECODERS: Mapping[str, tuple[int, Callable[[dict[str, Any]], Event | None]]] = {
    name: (cls.version, cls._fast_decode_owned) for name, cls in EVENT_TYPES.items()
}


def fast_decoders() -> Mapping[str, tuple[int, Callable[[dict[str, Any]], Event | None]]]:
    """Wire name -> ``(current schema version, decoder)`` for readers of many records.

    ``decoder(data)`` checks ``data`` exactly as :func:`decode_event` does for that type at
    its current version and returns the event, raises :class:`EventDecodeError`, or returns
    None when the slow path must decide (it then builds the precise error). The decoder may
    keep ``data`` as the event's storage: pass only a map nobody else holds or changes (one
    msgpack just unpacked). A log reader
    looks the type up once per record and skips :func:`decode_event`'s argument checks, which
    cost as much as the decoding itself; records of older versions go through
    :func:`decode_event` and its upcasters.
    """
    return _FAST_DECODERS


# --------------------------------------------------------------------------- codec


def encode_event(event: Event) -> dict[str, Any]:
    """The ``type``, ``v`` and ``data`` parts of a log record's payload for ``event``."""
    if not isinstance(event, Event) or type(event) is Event:
        raise TypeError(f"expected an event, got {type(event).__name__}")
    return {"type": event.type_name, "v": event.version, "data": dict(event.__dict__)}


def decode_event(
    type_name: str,
    version: int,
    data: Any,
    *,
    registry: Mapping[str, type[Event]] | None = None,
) -> Event:
    """Rebuild an event from its wire parts, upcasting older schema versions.

    ``registry`` defaults to :data:`EVENT_TYPES` (tests pass their own to exercise
    upcasting). Raises :class:`EventDecodeError` naming the field for anything invalid.
    """
    types = EVENT_TYPES if registry is None else registry
    cls = types.get(type_name) if type(type_name) is str else None
    if cls is None:
        raise EventDecodeError(f"unknown event type {_short(type_name)}", "type")
    if type(version) is not int or version < 1:
        raise EventDecodeError(f"expected a schema version >= 1, got {_short(version)}", "v")
    if version > cls.version:
        raise EventDecodeError(
            f"{type_name} schema version {version} is newer than this fedsm knows "
            f"({cls.version}); upgrade fedsm to read this log",
            "v",
        )
    if type(data) is not dict:
        raise EventDecodeError(f"expected a map of fields, got {type(data).__name__}", "data")
    while version < cls.version:
        upcast = getattr(cls, f"upcast_v{version}_v{version + 1}", None)
        if upcast is None:
            raise EventDecodeError(
                f"{type_name} has no upcaster from schema version {version}", "v"
            )
        data = upcast(dict(data))
        version += 1
    spec = _spec_of(cls)
    event = cls._fast_decode(data)
    if event is not None:
        return event
    if len(data) != len(spec) or not cls._names.issuperset(data):
        unknown = sorted(str(k) for k in data if k not in cls._names)
        if unknown:
            raise EventDecodeError(f"unknown field for {type_name}", unknown[0])
        missing = sorted(cls._names.difference(data))
        raise EventDecodeError(f"missing field for {type_name}", missing[0])
    values = {}
    for name, check in spec:
        values[name] = check(name, data[name])
    # Already validated: bypass __init__ (and its second validation) to keep replay fast.
    event = object.__new__(cls)
    object.__setattr__(event, "__dict__", values)
    return event
