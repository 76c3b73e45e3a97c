"""Hypothesis strategies for fedsm's events, protocol messages and fault schedules.

Needs the testing extra (``pip install fedsm[testing]``): hypothesis is imported here.

Valid values:

- :func:`events_of` / :data:`any_event`: events of one type / of any type, each one valid (it
  round-trips through :func:`fedsm.core.events.encode_event` and ``decode_event``);
  :func:`job_run`: the events of a legal job, in order.
- :func:`messages_of` / :data:`any_message`: protocol messages, each one valid (it round-trips
  through :func:`fedsm.core.protocol.encode` and ``decode``).
- :func:`fault_schedules`: :class:`fedsm.transport.faults.Faults` for the in-memory bus.

Near-valid values, which a decoder must refuse with its typed error naming the field
(check the name with :func:`names_field`):

- :func:`near_valid_messages`: ``(bytes, field)``, for :func:`fedsm.core.protocol.decode`
  (:class:`~fedsm.core.protocol_errors.MessageDecodeError`);
- :func:`near_valid_events`: ``(type, version, data, field)``, for
  :func:`fedsm.core.events.decode_event` (:class:`~fedsm.core.eventschema.EventDecodeError`).

Sizes are kept small (a few items per collection) so that examples are cheap; how many are
drawn is up to your hypothesis settings or profile.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgpack
from hypothesis import strategies as st

from fedsm.core import events as ev
from fedsm.core.eventschema import APPROVAL_STATUSES
from fedsm.core.messages import BROADCAST, MESSAGE_TYPES, Message
from fedsm.core.protocol import PROTOCOL_VERSION, encode
from fedsm.transport.faults import Faults

__all__ = [
    "INVALID_VALUES",
    "any_event",
    "any_message",
    "digest",
    "events_of",
    "fault_schedules",
    "job_run",
    "messages_of",
    "names_field",
    "near_valid_events",
    "near_valid_messages",
]

# --------------------------------------------------------------------------- building blocks

_texts = st.text(max_size=40)
_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
_sha256s = st.binary(min_size=32, max_size=32).map(bytes.hex)
_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_nonneg = st.integers(min_value=0, max_value=2**63 - 1)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_id_tuples = st.lists(_ids, max_size=6).map(tuple)
_float_maps = st.dictionaries(_texts, _floats, max_size=4)
_str_maps = st.dictionaries(_ids, _texts, max_size=4)
_plain = st.recursive(
    st.none() | st.booleans() | _ints | _floats | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)
_plain_maps = st.dictionaries(_texts, _plain, max_size=4)


# --------------------------------------------------------------------------- events

_EVENT_BUILDERS: dict[type[ev.Event], st.SearchStrategy[Any]] = {
    ev.JobCreated: st.builds(
        ev.JobCreated,
        job_id=_ids,
        researcher_id=_ids,
        training_plan_class=_texts,
        training_args=_plain_maps,
        model_args=_plain_maps,
        seed=_ints,
        nodes=_id_tuples,
        datasets=_str_maps,
        round_limit=_nonneg,
        min_nodes=_nonneg,
        reply_deadline_s=_floats,
        aggregator=_texts,
        aggregator_args=_plain_maps,
        tags=_id_tuples,
    ),
    ev.TrainingPlanUploaded: st.builds(ev.TrainingPlanUploaded, sha256=_sha256s, class_name=_texts),
    ev.ParamsUploaded: st.builds(ev.ParamsUploaded, round=_nonneg, sha256=_sha256s),
    ev.ApprovalAsked: st.builds(ev.ApprovalAsked, plan_sha256=_sha256s, nodes=_id_tuples),
    ev.ApprovalChecked: st.builds(
        ev.ApprovalChecked,
        plan_sha256=_sha256s,
        statuses=st.dictionaries(_ids, st.sampled_from(sorted(APPROVAL_STATUSES)), max_size=4),
        approval_required=st.dictionaries(_ids, st.booleans(), max_size=4),
    ),
    ev.RoundSent: st.builds(
        ev.RoundSent,
        round=_nonneg,
        nodes=_id_tuples,
        request_ids=_str_maps,
        params_sha256=_sha256s,
        deadline=_floats,
        aggregator_args=st.dictionaries(_ids, _plain_maps, max_size=3),
        do_training=st.booleans(),
    ),
    ev.SettingsChanged: st.builds(
        ev.SettingsChanged,
        round=_nonneg,
        changes=st.fixed_dictionaries(
            {},
            optional={
                "nodes": st.lists(_ids, max_size=4),
                "training_args": _plain_maps,
                "round_limit": _nonneg,
            },
        ),
    ),
    ev.RoundResent: st.builds(ev.RoundResent, round=_nonneg, nodes=_id_tuples, deadline=_floats),
    ev.ReplyReceived: st.builds(
        ev.ReplyReceived,
        round=_nonneg,
        node_id=_ids,
        request_id=_ids,
        params_sha256=_sha256s,
        sample_size=_nonneg,
        metrics=_float_maps,
        timing=_float_maps,
        training_plan_sha256=st.none() | _sha256s,
        extras=_float_maps,
    ),
    ev.NodeFailed: st.builds(
        ev.NodeFailed, round=_nonneg, node_id=_ids, request_id=_ids, code=_ints, message=_texts
    ),
    ev.NodeRetrying: st.builds(
        ev.NodeRetrying,
        round=_nonneg,
        node_id=_ids,
        request_id=_ids,
        code=_ints,
        message=_texts,
        retry_at=st.floats(allow_nan=False, allow_infinity=False),
    ),
    ev.RoundTimedOut: st.builds(ev.RoundTimedOut, round=_nonneg, missing=_id_tuples),
    ev.Aggregated: st.builds(
        ev.Aggregated,
        round=_nonneg,
        params_sha256=_sha256s,
        nodes=_id_tuples,
        weights=_float_maps,
        aggregator=_texts,
        state_sha256=st.none() | _sha256s,
    ),
    ev.JobCompleted: st.builds(ev.JobCompleted, round=_nonneg, params_sha256=_sha256s),
    ev.JobFailed: st.builds(ev.JobFailed, round=_nonneg, reason=_texts),
    ev.JobCancelled: st.builds(ev.JobCancelled, round=_nonneg, reason=_texts),
}
if set(_EVENT_BUILDERS) != set(ev.EVENT_TYPES.values()):  # pragma: no cover - a new event type
    raise AssertionError("fedsm.testing.strategies needs a strategy for every event type")


def events_of(cls: type[ev.Event]) -> st.SearchStrategy[ev.Event]:
    """Arbitrary valid events of the event class ``cls`` (any of
    :data:`fedsm.core.events.EVENT_TYPES`)."""
    try:
        return _EVENT_BUILDERS[cls]
    except KeyError:
        raise ValueError(f"not an event type of fedsm.core.events: {cls!r}") from None


#: Arbitrary valid events of any type.
any_event: st.SearchStrategy[ev.Event] = st.one_of(*_EVENT_BUILDERS.values())


def digest(text: str) -> str:
    """The sha256 hex digest of ``text`` (a stand-in for a file's digest in made-up events)."""
    return hashlib.sha256(text.encode()).hexdigest()


def job_run(
    rounds: int = 2, nodes: int = 3, *, min_nodes: int = 1, fail: tuple[str, ...] = ()
) -> list[ev.Event]:
    """The events of a legal job (``job-1``, nodes ``node-0`` ... ``node-{nodes-1}``) that
    runs ``rounds`` rounds and completes; nodes named in ``fail`` fail every round instead of
    replying. A plain list, not a strategy: the same arguments give the same events."""
    names = tuple(f"node-{i}" for i in range(nodes))
    out: list[ev.Event] = [
        ev.JobCreated(
            job_id="job-1",
            researcher_id="researcher-1",
            training_plan_class="MyPlan",
            training_args={"epochs": 1, "lr": 0.01},
            model_args={"hidden": [8, 4]},
            seed=42,
            nodes=names,
            datasets={n: f"ds-{n}" for n in names},
            round_limit=rounds,
            min_nodes=min_nodes,
            reply_deadline_s=60.0,
            aggregator="fedavg",
            aggregator_args={},
            tags=("t",),
        ),
        ev.TrainingPlanUploaded(sha256=digest("plan"), class_name="MyPlan"),
        ev.ParamsUploaded(round=0, sha256=digest("p0")),
        ev.ApprovalChecked(
            plan_sha256=digest("plan"),
            statuses={n: "approved" for n in names},
            approval_required={n: True for n in names},
        ),
    ]
    params = digest("p0")
    for r in range(1, rounds + 1):
        rids = {n: f"req-{r}-{n}" for n in names}
        out.append(
            ev.RoundSent(
                round=r,
                nodes=names,
                request_ids=rids,
                params_sha256=params,
                deadline=1000.0 + r,
                aggregator_args={},
            )
        )
        for n in names:
            if n in fail:
                out.append(
                    ev.NodeFailed(round=r, node_id=n, request_id=rids[n], code=500, message="x")
                )
            else:
                out.append(
                    ev.ReplyReceived(
                        round=r,
                        node_id=n,
                        request_id=rids[n],
                        params_sha256=digest(f"{r}/{n}"),
                        sample_size=100,
                        metrics={"loss": 0.5},
                        timing={"train_s": 1.0},
                        training_plan_sha256=digest("plan"),
                    )
                )
        params = digest(f"agg{r}")
        ok = tuple(sorted(n for n in names if n not in fail))
        out.append(
            ev.Aggregated(
                round=r,
                params_sha256=params,
                nodes=ok,
                weights={n: 100.0 for n in ok},
                aggregator="fedavg",
            )
        )
    out.append(ev.JobCompleted(round=rounds, params_sha256=params))
    return out


# --------------------------------------------------------------------------- messages

_msg_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}\Z")
_hexes = st.from_regex(r"\A[0-9a-f]{64}\Z")
_heads = st.fixed_dictionaries({"seq": _nonneg, "hash": _hexes})
_msg_plain = st.recursive(
    st.none() | st.booleans() | _ints | _floats | _texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
    max_leaves=10,
)

#: A strategy of valid values for each message field kind (``field.metadata["kind"]``).
_MESSAGE_KINDS: dict[str, st.SearchStrategy[Any]] = {
    "id": _msg_ids,
    "target": _msg_ids,  # requests also get BROADCAST, in messages_of
    "str": _texts,
    "text": _texts,
    "opt_str": st.none() | _texts,
    "sha256": _hexes,
    "opt_sha256": st.none() | _hexes,
    "int": _ints,
    "nonneg_int": _nonneg,
    "float": _floats,
    "bool": st.booleans(),
    "str_list": st.lists(_texts, max_size=5).map(tuple),
    "map": st.dictionaries(_texts, _msg_plain, max_size=5),
    "float_map": st.dictionaries(_texts, _floats, max_size=5),
    "map_list": st.lists(st.dictionaries(_texts, _msg_plain, max_size=3), max_size=3).map(tuple),
    "head": _heads,
    "opt_head": st.none() | _heads,
}


def messages_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Arbitrary valid messages of the message class ``cls`` (any of
    :data:`fedsm.core.messages.MESSAGE_TYPES`): every field drawn from its wire kind; a
    request's ``node_id`` may be :data:`~fedsm.core.messages.BROADCAST`; a ``status`` is one
    of the class's ``STATUSES``."""
    if cls not in MESSAGE_TYPES.values():
        raise ValueError(f"not a message type of fedsm.core.messages: {cls!r}")
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in dataclasses.fields(cls):
        strategy = _MESSAGE_KINDS[f.metadata["kind"]]
        if f.name == "node_id" and cls.is_request:
            strategy = strategy | st.just(BROADCAST)
        if f.name == "status":
            strategy = st.sampled_from(sorted(cls.STATUSES))  # type: ignore[attr-defined]
        fields[f.name] = strategy
    return st.builds(cls, **fields)


#: Arbitrary valid messages of any type.
any_message: st.SearchStrategy[Message] = st.one_of(
    [messages_of(cls) for cls in MESSAGE_TYPES.values()]
)


# --------------------------------------------------------------------------- near-valid values

_LONG = "x" * 4097  # over both codecs' string limit, under msgpack's


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


_NOT_STRINGS = [1, 1.5, True, None, ["a"], {"a": "b"}]
_BAD_IDS = [1, None, "", "../x", "a b", "a\n", "-a", "x" * 129, ["a"]]
_BAD_SHA256 = ["", "0" * 63, "0" * 65, "A" * 64, "g" * 64, "0" * 64 + "\n", 1, ["0" * 64]]
_BAD_HEADS = [
    "x",
    [1, "0" * 64],
    {"seq": 1},
    {"seq": -1, "hash": "0" * 64},
    {"seq": True, "hash": "0" * 64},
    {"seq": 1, "hash": "x"},
    {"seq": 1, "hash": "0" * 64, "extra": 1},
]
_BAD_MAPS = [[1], "x", 1, None, {"a": float("nan")}, {"a": _nested(12)}, {_LONG: 1}]

#: Values every checker of a field kind refuses, by kind: the kinds of both wire formats
#: (message fields and event fields). All of them are msgpack-packable with no ``bytes``
#: and no non-string map keys (so that a message decoder sees them and names the field) and
#: small enough to stay under every size limit of a whole message.
INVALID_VALUES: dict[str, tuple[Any, ...]] = {
    "id": tuple(_BAD_IDS),
    "target": tuple(v for v in _BAD_IDS if v != BROADCAST),
    "str": (*_NOT_STRINGS, _LONG),
    "text": tuple(_NOT_STRINGS),
    "opt_str": (*(v for v in _NOT_STRINGS if v is not None), _LONG),
    "sha256": (*_BAD_SHA256, None),
    "opt_sha256": tuple(_BAD_SHA256),
    "int": ("1", 1.5, True, None, 2**63, 2**64 - 1, [1]),
    "nonneg_int": (-1, "1", 1.5, True, None, 2**63, [1]),
    "float": ("1.0", None, True, float("inf"), float("-inf"), float("nan"), [1.0]),
    "bool": (1, 0, "true", None, 1.0),
    "str_list": ("abc", 1, None, [1], ["a", 2], {"a": "b"}, [_LONG]),
    "str_tuple": ("abc", 1, None, [1], ["a", 2], {"a": "b"}, [_LONG]),
    "map": tuple(_BAD_MAPS),
    "plain_map": tuple(_BAD_MAPS),
    "float_map": ([1.0], "x", None, {"a": "1"}, {"a": float("inf")}, {"a": None}, {"a": True}),
    "map_list": ("x", 1, None, [1], [{"a": float("nan")}], {"a": 1}, [[1]]),
    "head": (None, *_BAD_HEADS),
    "opt_head": tuple(_BAD_HEADS),
    "str_map": ([1], "x", None, {"a": 1}, {"a": None}, {"a": _LONG}),
    "bool_map": ([1], "x", None, {"a": 1}, {"a": "true"}, {"a": None}),
    "status_map": ([1], "x", None, {"a": "maybe"}, {"a": 1}, {"a": None}),
}


def names_field(error_field: str | None, name: str) -> bool:
    """Whether a decode error's ``field`` names the field ``name``: that field itself or a
    part of it (``metrics.loss``, ``nodes[2]``)."""
    if error_field is None:
        return False
    return error_field == name or error_field.startswith((f"{name}.", f"{name}["))


_EXTRA_VALUES = st.none() | st.booleans() | st.integers(-10, 10) | _texts
_HEADER_FIELDS = ("protocol_version", "command")
_MESSAGE_MUTATIONS = (
    "wrong value",
    "unknown field",
    "missing field",
    "unknown command",
    "wrong version",
)
_EVENT_MUTATIONS = (
    "wrong value",
    "unknown field",
    "missing field",
    "unknown type",
    "wrong version",
    "data not a map",
)


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return not (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


@st.composite
def _near_valid_message(draw: st.DrawFn) -> tuple[bytes, str]:
    message = draw(any_message)
    body = msgpack.unpackb(encode(message), raw=False)
    fields = {f.name: f for f in dataclasses.fields(type(message))}
    how = draw(st.sampled_from(_MESSAGE_MUTATIONS))
    if how == "wrong value":
        name = draw(st.sampled_from(sorted(fields)))
        value = draw(st.sampled_from(INVALID_VALUES[fields[name].metadata["kind"]]))
        body[name] = value
    elif how == "unknown field":
        name = draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in body))
        body[name] = draw(_EXTRA_VALUES)
    elif how == "missing field":
        required = [*_HEADER_FIELDS, *sorted(n for n, f in fields.items() if not _has_default(f))]
        name = draw(st.sampled_from(required))
        del body[name]
    elif how == "unknown command":
        name = "command"
        body[name] = draw(
            st.sampled_from(["", "os.system", "PING", "ping ", None, 1, ["ping"]])
            | _texts.filter(lambda c: c not in MESSAGE_TYPES),
        )
    else:
        name = "protocol_version"
        body[name] = draw(
            st.sampled_from(["", "0", "2", "1.0", " 1", 1, 1.0, None, [PROTOCOL_VERSION]]),
        )
    return msgpack.packb(body, use_bin_type=True), name


def near_valid_messages() -> st.SearchStrategy[tuple[bytes, str]]:
    """``(data, field)``: a valid message, encoded, with exactly one thing wrong, and the name
    of the field that is wrong. :func:`fedsm.core.protocol.decode` must raise
    :class:`~fedsm.core.protocol_errors.MessageDecodeError` whose ``field`` names it (see
    :func:`names_field`).

    The wrong thing is one of: a field's value of the wrong type, size or shape (from
    :data:`INVALID_VALUES` for the field's kind), an unknown field added, a required field
    (or ``command``, ``protocol_version``) removed, an unknown command, a protocol version
    this side does not speak.
    """
    return _near_valid_message()


@st.composite
def _near_valid_event(draw: st.DrawFn) -> tuple[Any, Any, Any, str]:
    event = draw(any_event)
    encoded = ev.encode_event(event)
    type_name, version, data = encoded["type"], encoded["v"], dict(encoded["data"])
    fields = {f.name: f for f in dataclasses.fields(type(event))}
    how = draw(st.sampled_from(_EVENT_MUTATIONS))
    if how == "wrong value":
        name = draw(st.sampled_from(sorted(fields)))
        data[name] = draw(st.sampled_from(INVALID_VALUES[fields[name].metadata["kind"]]))
    elif how == "unknown field":
        name = draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in data))
        data[name] = draw(_EXTRA_VALUES)
    elif how == "missing field":
        name = draw(st.sampled_from(sorted(fields)))
        del data[name]
    elif how == "unknown type":
        name = "type"
        type_name = draw(
            st.sampled_from(["", "Event", "jobcreated", "NoSuchEvent", None, 1])
            | _texts.filter(lambda t: t not in ev.EVENT_TYPES),
        )
    elif how == "wrong version":
        name = "v"
        version = draw(st.sampled_from([0, -1, version + 1, 2**31, "1", 1.0, True, None]))
    else:
        name = "data"
        data = draw(st.sampled_from([None, [], "x", 1, [["round", 1]]]))
    return type_name, version, data, name


def near_valid_events() -> st.SearchStrategy[tuple[Any, Any, Any, str]]:
    """``(type_name, version, data, field)``: the wire parts of a valid event (as
    :func:`fedsm.core.events.encode_event` gives them, at the current schema version) with
    exactly one thing wrong, and the name of what is wrong: a field name, or ``"type"``,
    ``"v"``, ``"data"``. :func:`fedsm.core.events.decode_event` must raise
    :class:`~fedsm.core.eventschema.EventDecodeError` whose ``field`` names it (see
    :func:`names_field`).

    The wrong thing is one of: a field's value of the wrong type, size or shape (from
    :data:`INVALID_VALUES`), an unknown field added, a field removed, an unknown event type,
    a schema version that is not one (0, negative, not an int) or newer than this fedsm's,
    ``data`` that is not a map. Every part is msgpack-packable, so a case can also be written
    into a log record (see :mod:`fedsm.testing.logreader`).
    """
    return _near_valid_event()


# --------------------------------------------------------------------------- faults


def fault_schedules(
    *,
    max_drop: float = 0.3,
    max_duplicate: float = 0.5,
    max_reorder_window: int = 6,
    max_delay_s: float = 0.02,
) -> st.SearchStrategy[Faults]:
    """:class:`~fedsm.transport.faults.Faults` for the in-memory bus: a drop probability in
    ``[0, max_drop]``, a duplicate probability in ``[0, max_duplicate]``, a reorder window in
    ``[0, max_reorder_window]``, a delay in ``[0, max_delay_s]`` seconds, and a seed (the
    same schedule and the same sends give the same faults). Each fault is off in some
    examples; everything shrinks towards no fault at all.

    (The in-memory bus injects drops, duplicates, reordering and delays; a disconnect is a
    test step, :meth:`MemoryBus.close`, not a schedule.)
    """
    if not (0.0 <= max_drop <= 1.0 and 0.0 <= max_duplicate <= 1.0):
        raise ValueError("max_drop and max_duplicate are probabilities in [0, 1]")
    if max_reorder_window < 0 or max_delay_s < 0:
        raise ValueError("max_reorder_window and max_delay_s must be >= 0")

    def upto(limit: float) -> st.SearchStrategy[float]:
        return st.just(0.0) | st.floats(0.0, limit, allow_nan=False, allow_infinity=False)

    return st.builds(
        Faults,
        drop=upto(max_drop),
        duplicate=upto(max_duplicate),
        reorder_window=st.integers(0, max_reorder_window),
        delay_s=upto(max_delay_s),
        seed=st.integers(0, 2**32 - 1),
    )
