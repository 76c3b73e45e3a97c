"""The event catalogue and codec: round trips, garbage in, typed errors, upcasting."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsm.core import events as ev
from fedsm.core.eventschema import EventDecodeError
from fedsm.errors import FedsmError
from fedsm.testing.strategies import any_event, digest, events_of


def _wire_round_trip(event: ev.Event) -> ev.Event:
    """Encode, pack, unpack and decode, as the log does."""
    parts = msgpack.unpackb(msgpack.packb(ev.encode_event(event), use_bin_type=True), raw=False)
    return ev.decode_event(parts["type"], parts["v"], parts["data"])


@pytest.mark.parametrize("cls", list(ev.EVENT_TYPES.values()), ids=lambda c: c.__name__)
@given(data=st.data())
def test_every_event_type_round_trips(cls: type[ev.Event], data: st.DataObject) -> None:
    event = data.draw(events_of(cls))
    decoded = _wire_round_trip(event)
    assert decoded == event
    assert type(decoded) is cls
    for f in dataclasses.fields(cls):
        assert type(getattr(decoded, f.name)) is type(getattr(event, f.name)), f.name


@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_decode_to_an_event_or_the_typed_error(blob: bytes) -> None:
    try:
        parts = msgpack.unpackb(blob, raw=False)
    except Exception:
        return  # not msgpack at all: the log's framing rejects it before the codec
    candidates = [parts]
    if isinstance(parts, dict):
        candidates.append(parts.get("data"))
    for data in candidates:
        for name in ev.EVENT_TYPES:
            try:
                event = ev.decode_event(name, 1, data)
            except EventDecodeError as exc:
                assert isinstance(exc, FedsmError)
            else:
                assert isinstance(event, ev.EVENT_TYPES[name])


@given(event=any_event, key=st.text(max_size=8), junk=st.one_of(st.none(), st.binary(), st.text()))
def test_a_mangled_field_is_refused_naming_it(event: ev.Event, key: str, junk: Any) -> None:
    data = ev.encode_event(event)["data"]
    name = sorted(data)[len(key) % len(data)]
    mangled = {**data, name: [junk, {"x": junk}]}
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event(event.type_name, event.version, mangled)
    assert info.value.field is not None and info.value.field.startswith(name)


def test_unknown_type_missing_and_extra_fields_name_the_problem() -> None:
    data = ev.encode_event(ev.JobFailed(round=1, reason="x"))["data"]
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event("os.system", 1, data)
    assert info.value.field == "type"
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event("JobFailed", 1, {"round": 1})
    assert info.value.field == "reason"
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event("JobFailed", 1, {**data, "extra": 1})
    assert info.value.field == "extra"
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event("JobFailed", 2, data)
    assert info.value.field == "v" and "newer" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    ["A" * 64, "a" * 63, "g" * 64, "a" * 64 + "\n", 5, None],
)
def test_digests_must_be_64_lowercase_hex(bad: Any) -> None:
    with pytest.raises(EventDecodeError) as info:
        ev.ParamsUploaded(round=0, sha256=bad)
    assert info.value.field == "sha256"
    data = {"round": 0, "sha256": bad}
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event("ParamsUploaded", 2, data)
    assert info.value.field == "sha256"
    # A version-1 record (with its url) is upcast first, then checked the same way.
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event("ParamsUploaded", 1, {**data, "url": "u"})
    assert info.value.field == "sha256"


def test_construction_validates_like_decoding() -> None:
    with pytest.raises(EventDecodeError) as info:
        ev.ReplyReceived(1, "n", "r", digest("x"), -1, {}, {})
    assert info.value.field == "sample_size"
    with pytest.raises(EventDecodeError) as info:
        ev.Aggregated(1, digest("x"), ("a",), {"a": float("nan")}, "fedavg")
    assert info.value.field == "weights.a"
    with pytest.raises(EventDecodeError, match="statuses"):
        ev.ApprovalChecked(digest("p"), {"n": "maybe"}, {"n": True})


def test_lists_become_tuples_and_int_metrics_floats() -> None:
    event = ev.RoundTimedOut(round=2, missing=["a", "b"])  # type: ignore[arg-type]
    assert event.missing == ("a", "b")
    reply = ev.ReplyReceived(1, "n", "r", digest("x"), 3, {"loss": 1}, {})
    assert type(reply.metrics["loss"]) is float
    assert _wire_round_trip(reply) == reply


def test_events_are_immutable() -> None:
    event = ev.JobFailed(round=1, reason="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.round = 2  # type: ignore[misc]


def test_type_names_and_versions() -> None:
    for name, cls in ev.EVENT_TYPES.items():
        assert cls.type_name == name == cls.__name__
        assert cls.version >= 1


@dataclasses.dataclass(frozen=True)
class _Renamed(ev.Event):
    """A fake event at schema version 3: v1 had ``why``, v2 added ``code``, v3 renamed."""

    version: ClassVar[int] = 3
    round: int = ev._f("nonneg_int")
    reason: str = ev._f("text")
    code: int = ev._f("int")

    @staticmethod
    def upcast_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
        data["code"] = 0
        return data

    @staticmethod
    def upcast_v2_v3(data: dict[str, Any]) -> dict[str, Any]:
        data["reason"] = data.pop("why")
        return data


def test_older_schema_versions_are_upcast_in_a_loop() -> None:
    registry = {"_Renamed": _Renamed}
    v1 = {"round": 4, "why": "disk full"}
    decoded = ev.decode_event("_Renamed", 1, v1, registry=registry)
    assert decoded == _Renamed(round=4, reason="disk full", code=0)
    v2 = {"round": 4, "why": "disk full", "code": 7}
    assert ev.decode_event("_Renamed", 2, v2, registry=registry).code == 7
    assert v1 == {"round": 4, "why": "disk full"}, "upcasting must not modify the input"
    # The closed registry does not know the test's class: no class is resolved by name.
    with pytest.raises(EventDecodeError):
        ev.decode_event("_Renamed", 1, v1)


@pytest.mark.parametrize("cls", list(ev.EVENT_TYPES.values()), ids=lambda c: c.__name__)
@given(data=st.data())
def test_the_log_readers_fast_decoders_agree_with_decode_event(
    cls: type[ev.Event], data: st.DataObject
) -> None:
    event = data.draw(events_of(cls))
    packed = msgpack.packb(ev.encode_event(event)["data"], use_bin_type=True)
    version, fast = ev.fast_decoders()[cls.type_name]
    assert version == cls.version
    decoded = fast(msgpack.unpackb(packed, raw=False))
    assert decoded == event and type(decoded) is cls
    assert decoded == ev.decode_event(cls.type_name, version, msgpack.unpackb(packed, raw=False))


def test_decode_event_does_not_keep_the_callers_map() -> None:
    """Only the log reader's own fresh maps may become an event's storage: a caller changing
    the map it decoded must not change the (immutable) event."""
    data = ev.encode_event(ev.JobFailed(round=3, reason="disk full"))["data"]
    event = ev.decode_event("JobFailed", 1, data)
    data["reason"] = "changed"
    assert event.reason == "disk full"


def test_a_version_1_reply_is_upcast_with_no_plan_digest() -> None:
    v3 = ev.ReplyReceived(1, "n", "r", digest("x"), 3, {"loss": 1.0}, {}, digest("plan"))
    data = ev.encode_event(v3)["data"]
    assert data["training_plan_sha256"] == digest("plan") and "params_url" not in data
    v2_data = {**data, "params_url": "file:///repo/" + digest("x")}
    v1_data = {k: v for k, v in v2_data.items() if k != "training_plan_sha256"}
    old = ev.decode_event("ReplyReceived", 1, v1_data)
    assert old.training_plan_sha256 is None
    assert dataclasses.replace(old, training_plan_sha256=digest("plan")) == v3
    assert ev.decode_event("ReplyReceived", 2, v2_data) == v3  # v2 -> v3 drops the url
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event("ReplyReceived", 2, v1_data)  # a v2 record must carry the field
    assert info.value.field == "training_plan_sha256"
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event("ReplyReceived", 3, v2_data)  # a v3 record names no url
    assert info.value.field == "params_url"


URL = "file:///somewhere/else/repository/"

#: (type, version of the old record, old record as the log holds it, the event it decodes to)
_OLD_RECORDS: list[tuple[str, int, dict[str, Any], ev.Event]] = [
    (
        "TrainingPlanUploaded",
        1,
        {"url": URL + digest("plan"), "sha256": digest("plan"), "class_name": "Plan"},
        ev.TrainingPlanUploaded(sha256=digest("plan"), class_name="Plan"),
    ),
    (
        "ParamsUploaded",
        1,
        {"round": 0, "url": URL + digest("p0"), "sha256": digest("p0")},
        ev.ParamsUploaded(round=0, sha256=digest("p0")),
    ),
    (
        "RoundSent",
        1,
        {
            "round": 2,
            "nodes": ["a", "b"],
            "request_ids": {"a": "qa", "b": "qb"},
            "params_url": URL + digest("p1"),
            "params_sha256": digest("p1"),
            "deadline": 1234.5,
        },
        ev.RoundSent(
            round=2,
            nodes=("a", "b"),
            request_ids={"a": "qa", "b": "qb"},
            params_sha256=digest("p1"),
            deadline=1234.5,
            aggregator_args={},
        ),
    ),
    (
        "RoundResent",
        1,
        {"round": 2, "nodes": ["b"]},
        ev.RoundResent(round=2, nodes=("b",), deadline=0.0),
    ),
    (
        "ReplyReceived",
        1,
        {
            "round": 2,
            "node_id": "a",
            "request_id": "qa",
            "params_url": URL + digest("2/a"),
            "params_sha256": digest("2/a"),
            "sample_size": 7,
            "metrics": {"loss": 0.25},
            "timing": {"training_s": 1.5},
        },
        ev.ReplyReceived(
            round=2,
            node_id="a",
            request_id="qa",
            params_sha256=digest("2/a"),
            sample_size=7,
            metrics={"loss": 0.25},
            timing={"training_s": 1.5},
            training_plan_sha256=None,
        ),
    ),
    (
        "Aggregated",
        1,
        {
            "round": 2,
            "params_url": URL + digest("agg2"),
            "params_sha256": digest("agg2"),
            "nodes": ["a"],
            "weights": {"a": 7.0},
            "aggregator": "fedavg",
        },
        ev.Aggregated(
            round=2,
            params_sha256=digest("agg2"),
            nodes=("a",),
            weights={"a": 7.0},
            aggregator="fedavg",
        ),
    ),
    (
        "JobCompleted",
        1,
        {"round": 2, "params_url": URL + digest("agg2"), "params_sha256": digest("agg2")},
        ev.JobCompleted(round=2, params_sha256=digest("agg2")),
    ),
]


@pytest.mark.parametrize(
    ("type_name", "version", "old", "expected"), _OLD_RECORDS, ids=[r[0] for r in _OLD_RECORDS]
)
def test_an_old_record_with_a_url_is_upcast_to_the_digest_only_event(
    type_name: str, version: int, old: dict[str, Any], expected: ev.Event
) -> None:
    kept = copy.deepcopy(old)
    decoded = ev.decode_event(type_name, version, old)
    assert decoded == expected and type(decoded) is type(expected)
    assert old == kept, "upcasting must not modify the record read"
    assert type(decoded).version > version
    encoded = ev.encode_event(decoded)
    assert encoded["v"] == type(decoded).version
    assert not {"url", "params_url"} & set(encoded["data"]), "a url survived the upcast"
    assert _wire_round_trip(decoded) == decoded
    # The current version names no url: a record that does is refused, naming the field.
    url_field = next((k for k in ("url", "params_url") if k in old), None)
    if url_field is not None:
        with pytest.raises(EventDecodeError) as info:
            ev.decode_event(type_name, type(decoded).version, {**encoded["data"], url_field: "u"})
        assert info.value.field == url_field


def test_the_old_records_cover_every_type_whose_schema_changed() -> None:
    covered = {r[0] for r in _OLD_RECORDS}
    assert covered == {
        "TrainingPlanUploaded",
        "ParamsUploaded",
        "RoundSent",
        "RoundResent",
        "ReplyReceived",
        "Aggregated",
        "JobCompleted",
    }
    assert {name for name, cls in ev.EVENT_TYPES.items() if cls.version > 1} == covered


_V1_OF: dict[type[ev.Event], Any] = {
    # v1 record of a current event, for the events a v1 record can express.
    ev.TrainingPlanUploaded: lambda d: {**d, "url": URL + d["sha256"]},
    ev.ParamsUploaded: lambda d: {**d, "url": URL + d["sha256"]},
    ev.RoundSent: lambda d: {
        **{k: v for k, v in d.items() if k not in ("aggregator_args", "do_training")},
        "params_url": URL + d["params_sha256"],
    },
    ev.RoundResent: lambda d: {k: v for k, v in d.items() if k != "deadline"},
    ev.ReplyReceived: lambda d: {
        **{k: v for k, v in d.items() if k not in ("training_plan_sha256", "extras")},
        "params_url": URL + d["params_sha256"],
    },
    ev.Aggregated: lambda d: {
        **{k: v for k, v in d.items() if k != "state_sha256"},
        "params_url": URL + d["params_sha256"],
    },
    ev.JobCompleted: lambda d: {**d, "params_url": URL + d["params_sha256"]},
}

_V1_EXPRESSIBLE: dict[type[ev.Event], Any] = {
    ev.RoundSent: lambda e: dataclasses.replace(e, aggregator_args={}, do_training=True),
    ev.RoundResent: lambda e: dataclasses.replace(e, deadline=0.0),
    ev.ReplyReceived: lambda e: dataclasses.replace(e, training_plan_sha256=None, extras={}),
    ev.Aggregated: lambda e: dataclasses.replace(e, state_sha256=None),
}


@pytest.mark.parametrize("cls", list(_V1_OF), ids=lambda c: c.__name__)
@given(data=st.data())
def test_any_version_1_record_decodes_to_the_current_event(
    cls: type[ev.Event], data: st.DataObject
) -> None:
    event = data.draw(events_of(cls))
    event = _V1_EXPRESSIBLE.get(cls, lambda e: e)(event)
    current = ev.encode_event(event)["data"]
    v1 = msgpack.unpackb(msgpack.packb(_V1_OF[cls](current), use_bin_type=True), raw=False)
    decoded = ev.decode_event(cls.type_name, 1, v1)
    assert decoded == event and type(decoded) is cls
