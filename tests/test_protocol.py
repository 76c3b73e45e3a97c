"""Protocol codec: every message round-trips; garbage only ever raises MessageDecodeError."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsm.core.messages import (
    BROADCAST,
    MESSAGE_TYPES,
    ErrorReply,
    ListReply,
    Message,
    PingReply,
    PingRequest,
    TrainReply,
)
from fedsm.core.protocol import decode, encode
from fedsm.core.protocol_errors import ErrorNumber, MessageDecodeError, MessageTooLarge

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}\Z")
hexes = st.from_regex(r"\A[0-9a-f]{64}\Z")
texts = st.text(max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)
plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | finite | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)

heads = st.fixed_dictionaries({"seq": st.integers(0, 2**63 - 1), "hash": hexes})

KIND_STRATEGIES = {
    "id": ids,
    "str": texts,
    "text": texts,
    "opt_str": st.none() | texts,
    "sha256": hexes,
    "opt_sha256": st.none() | hexes,
    "int": st.integers(-(2**63), 2**63 - 1),
    "nonneg_int": st.integers(0, 2**63 - 1),
    "float": finite,
    "bool": st.booleans(),
    "str_list": st.lists(texts, max_size=5).map(tuple),
    "map": st.dictionaries(texts, plain, max_size=5),
    "float_map": st.dictionaries(texts, finite, max_size=5),
    "map_list": st.lists(st.dictionaries(texts, plain, max_size=3), max_size=3).map(tuple),
    "head": st.fixed_dictionaries({"seq": st.integers(0, 2**63 - 1), "hash": hexes}),
    "opt_head": st.none()
    | st.fixed_dictionaries({"seq": st.integers(0, 2**63 - 1), "hash": hexes}),
}


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    fields = {}
    for f in dataclasses.fields(cls):
        kind = f.metadata["kind"]
        strategy = KIND_STRATEGIES.get(kind, ids)
        if f.name == "node_id":
            strategy = (ids | st.just(BROADCAST)) if cls.is_request else ids
        if f.name == "status":
            strategy = st.sampled_from(sorted(cls.STATUSES))  # type: ignore[attr-defined]
        fields[f.name] = strategy
    return st.builds(cls, **fields)


any_message = st.one_of([message_strategy(cls) for cls in MESSAGE_TYPES.values()])


@given(any_message)
def test_every_message_round_trips(message: Message) -> None:
    assert decode(encode(message)) == message


@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_to_a_message_or_the_typed_error(data: bytes) -> None:
    try:
        message = decode(data)
    except MessageDecodeError:
        return
    assert isinstance(message, Message)


@given(any_message, st.data())
def test_a_mutated_field_is_refused_with_its_name(message: Message, data) -> None:
    body = msgpack.unpackb(encode(message))
    name = data.draw(st.sampled_from(sorted(k for k in body if k not in ("command",))))
    body[name] = [1] if name != "protocol_version" else "9"
    with pytest.raises(MessageDecodeError) as info:
        decode(msgpack.packb(body))
    assert (info.value.field or "").startswith(name)


def test_unknown_command_and_unknown_field_are_named() -> None:
    ping = PingRequest(request_id="r", researcher_id="res", node_id="n", deadline=1.0)
    body = msgpack.unpackb(encode(ping))
    with pytest.raises(MessageDecodeError) as info:
        decode(msgpack.packb({**body, "command": "os.system"}))
    assert info.value.field == "command"
    with pytest.raises(MessageDecodeError) as info:
        decode(msgpack.packb({**body, "extra": 1}))
    assert info.value.field == "extra"
    missing = dict(body)
    del missing["request_id"]
    with pytest.raises(MessageDecodeError) as info:
        decode(msgpack.packb(missing))
    assert info.value.field == "request_id"


def test_oversized_message_is_refused_before_it_leaves() -> None:
    big = ListReply(
        request_id="r", researcher_id="res", node_id="n", datasets=({"blob": "x" * 60_000},) * 5
    )
    with pytest.raises(MessageTooLarge):
        encode(big)
    small_limit = encode(PingReply(request_id="r", researcher_id="res", node_id="n"))
    with pytest.raises(MessageDecodeError):
        decode(small_limit, max_bytes=len(small_limit) - 1)


def test_a_reply_must_name_its_sender_and_ids_are_checked() -> None:
    with pytest.raises(MessageDecodeError) as info:
        PingReply(request_id="r", researcher_id="res", node_id=BROADCAST)
    assert info.value.field == "node_id"
    with pytest.raises(MessageDecodeError) as info:
        PingRequest(request_id="../x", researcher_id="res", node_id="n", deadline=0.0)
    assert info.value.field == "request_id"


def test_error_numbers_are_stable_and_explained() -> None:
    codes = {e.name: e.value for e in ErrorNumber}
    assert codes["PLAN_NOT_APPROVED"] == 300 and codes["TRAINING_TIMED_OUT"] == 501
    assert len(set(codes.values())) == len(codes)
    for number in ErrorNumber:
        assert number.meaning and "\n" not in number.meaning
    reply = ErrorReply(request_id="r", researcher_id="res", node_id="n", code=12345, message="?")
    assert reply.error_number is None


def test_ids_and_digests_must_match_whole_and_metrics_must_be_finite() -> None:
    with pytest.raises(MessageDecodeError) as info:
        PingReply(request_id="r", researcher_id="res", node_id="node1\n")
    assert info.value.field == "node_id"
    head = dict(
        request_id="r",
        researcher_id="res",
        node_id="n",
        job_id="j",
        round=1,
        dataset_id="d",
        training_plan_sha256="a" * 64,
        params_url="u",
        params_sha256="b" * 64,
        sample_size=3,
    )
    with pytest.raises(MessageDecodeError) as info:
        TrainReply(**{**head, "params_sha256": "b" * 64 + "\n"})
    assert info.value.field == "params_sha256"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(MessageDecodeError) as info:
            TrainReply(**head, metrics={"train_loss": bad})
        assert info.value.field == "metrics.train_loss"
