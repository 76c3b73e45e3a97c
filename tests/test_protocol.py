"""Protocol codec: every message round-trips; garbage only ever raises MessageDecodeError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsm.core.messages import (
    BROADCAST,
    ErrorReply,
    ListReply,
    Message,
    PingReply,
    PingRequest,
    TrainReply,
)
from fedsm.core.protocol import decode, encode
from fedsm.core.protocol_errors import ErrorNumber, MessageDecodeError, MessageTooLarge
from fedsm.testing.strategies import any_message


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
