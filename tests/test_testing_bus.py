"""The bus contract catches a broken bus, and says what went wrong.

:class:`BrokenBus` wraps the memory bus and silently drops every third message it sends. The
contract's scenarios that count messages must fail on it with an :class:`AssertionError`
naming what was lost (the hypothesis one with a shrunk falsifying example); the scenarios
that do not depend on every message arriving still pass, so the failures are about the loss.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import Phase, settings

from fedsm.core.messages import Reply, Request
from fedsm.testing.bus import BusContract, Federation
from fedsm.transport import Bus, MemoryBroker, MemoryBus
from fedsm.transport.base import Handler


class BrokenBus(Bus):
    """A memory bus that silently drops its every third outgoing message."""

    def __init__(self, inner: MemoryBus) -> None:
        self._inner = inner
        self.participant_id = inner.participant_id
        self.role = inner.role
        self._sent = 0

    def _lost(self) -> bool:
        self._sent += 1
        return self._sent % 3 == 0

    def send(self, node_id: str, request: Request) -> None:
        if not self._lost():
            self._inner.send(node_id, request)

    def broadcast(self, request: Request) -> None:
        if not self._lost():
            self._inner.broadcast(request)

    def reply(self, reply: Reply) -> None:
        if not self._lost():
            self._inner.reply(reply)

    def subscribe(self, handler: Handler) -> None:
        self._inner.subscribe(handler)

    def online_nodes(self) -> frozenset[str]:
        return self._inner.online_nodes()

    def close(self) -> None:
        self._inner.close()


class BrokenBusContract(BusContract):
    """Not collected (``__test__`` stays False): the tests below call its scenarios."""

    ordered_per_sender = True
    max_examples = 50

    def make_federation(self, researcher_ids, node_ids):
        broker = MemoryBroker()
        return Federation(
            researchers={r: BrokenBus(MemoryBus(broker, r, "researcher")) for r in researcher_ids},
            nodes={n: BrokenBus(MemoryBus(broker, n, "node")) for n in node_ids},
            teardown=broker.close,
            inject=broker.deliver_raw,
            settle=broker.flush,
        )

    def hypothesis_settings(self) -> settings:
        # Deterministic, no failing example saved to replay in fedsm's own runs, and no
        # explain phase (it traces every shrink step: 30 s instead of 1).
        return settings(
            super().hypothesis_settings(),
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
        )


@pytest.fixture
def contract() -> BrokenBusContract:
    return BrokenBusContract()


def failure(scenario) -> str:
    """Run one scenario; it must fail with an AssertionError. Its message and notes."""
    with pytest.raises(AssertionError) as info:
        scenario()
    return "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])


def test_the_burst_fails_naming_the_lost_messages(contract):
    text = failure(contract.test_no_message_is_lost_in_a_burst)
    # The researcher's 3rd, 6th... request never left; n3 got burst-2, n3 would have got burst-5.
    assert "n3 lost" in text and "ping burst-2 (researcher-1 -> n3)" in text
    assert "researcher-1 lost" in text and "pong" in text


def test_the_sequence_property_fails_with_a_shrunk_falsifying_example(contract):
    text = failure(contract.test_any_sequence_of_messages_arrives_intact)
    # hypothesis calls it "Falsifying example" or, lately, "Failing test case".
    assert re.search("Falsifying example|Failing test case", text), text
    assert "lost 1 of" in text and "m2" in text  # the third message of a shrunk sequence
    # Shrunk to the shortest sequence that loses something: three messages.
    example = text[re.search("Falsifying example|Failing test case", text).start() :]
    assert example.count("Request(") + example.count("Reply(") + example.count("Message(") == 3


def test_the_ordered_burst_fails_naming_the_lost_messages(contract):
    text = failure(contract.test_messages_from_one_sender_arrive_in_order)
    assert "n1 lost" in text and "ping seq-2 (researcher-1 -> n1)" in text


def test_the_request_scenario_fails_on_the_dropped_request(contract):
    text = failure(contract.test_a_request_reaches_exactly_its_node_and_the_reply_its_researcher)
    assert "lost" in text and "researcher-1" in text


@pytest.mark.parametrize(
    "scenario",
    [
        "test_a_broadcast_reaches_every_node",
        "test_a_reply_naming_another_node_than_its_sender_is_dropped",
        "test_the_researcher_sees_nodes_online_and_then_offline",
    ],
)
def test_scenarios_that_send_too_little_to_lose_anything_pass(contract, scenario):
    getattr(contract, scenario)()


def test_the_base_class_is_not_collected_and_asks_for_a_factory():
    assert BusContract.__test__ is False and BrokenBusContract.__test__ is False
    with pytest.raises(NotImplementedError, match="make_federation"):
        BusContract().make_federation(["r"], ["n"])
