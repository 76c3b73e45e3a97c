"""The scenarios every :class:`~fedsm.transport.base.Bus` must pass, written once.

fedsm runs :class:`BusContract` against its in-memory and MQTT buses; to check your own
transport, subclass it, set ``__test__ = True`` and implement :meth:`BusContract.make_federation`::

    from fedsm.testing.bus import BusContract, Federation

    class TestGrpcBusContract(BusContract):
        __test__ = True

        @pytest.fixture(autouse=True)
        def _server(self, grpc_server):  # whatever your buses need, kept on self
            self.server = grpc_server

        def make_federation(self, researcher_ids, node_ids):
            ns = uuid.uuid4().hex  # isolate this federation from earlier ones
            return Federation(
                researchers={r: GrpcBus(self.server, ns, r, "researcher") for r in researcher_ids},
                nodes={n: GrpcBus(self.server, ns, n, "node") for n in node_ids},
            )

The contract's tests take no pytest fixtures (hypothesis builds a fresh federation for each
example), so what the factory needs comes from an autouse fixture of the subclass. Every wait
is bounded by :attr:`BusContract.timeout_s`; a failure says which messages were lost, which
arrived where they should not have, or which arrived out of order.

The scenarios, each a ``test_*`` method:

* a request reaches exactly the node it is sent to and the reply exactly its researcher, both
  equal to what was sent (encoded and decoded on the way);
* a broadcast reaches every node;
* a reply that names another node than its sender is refused or dropped;
* garbage, misaddressed and oversized payloads are dropped (or refused with a
  :class:`~fedsm.errors.FedsmError`), and the participant keeps working;
* any sequence of messages (:data:`fedsm.testing.strategies.any_message`) arrives, equal, at
  least once, and nothing else arrives; in order per sender and channel when
  :attr:`BusContract.ordered_per_sender` says the transport promises it;
* a bounded burst loses nothing on a healthy bus;
* the researcher sees nodes online, and offline once they close;
* ``close`` is idempotent, stops delivery, and a closed bus refuses to send with
  :class:`~fedsm.transport.base.BusClosed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsm.core.messages import (
    BROADCAST,
    Message,
    PingReply,
    PingRequest,
    Reply,
    Request,
    SearchReply,
    SearchRequest,
)
from fedsm.core.protocol import MAX_MESSAGE_BYTES, decode, encode
from fedsm.errors import FedsmError
from fedsm.testing.strategies import any_message, near_valid_messages
from fedsm.transport.base import Bus, BusClosed

__all__ = ["BusContract", "Federation", "Recorder", "describe", "pong"]

RESEARCHER, NODE = "researcher", "node"


@dataclasses.dataclass
class Federation:
    """One isolated set of connected buses, made by :meth:`BusContract.make_federation`.

    Nothing sent in an earlier federation may be delivered in this one. The contract closes
    every bus itself, then calls ``teardown``.

    Attributes
    ----------
    researchers, nodes:
        Open buses by participant id, with the roles ``"researcher"`` and ``"node"``.
    teardown:
        Releases what the factory opened besides the buses (a hub, a raw client...).
    inject:
        ``inject(role, participant_id, data)`` hands raw ``data`` to that participant as if it
        came off the wire on its ordinary channel (a node's request channel, a researcher's
        reply channel). None: the garbage scenario only checks the oversized refusal.
    inject_reply_as:
        ``inject_reply_as(node_id, researcher_id, data)`` puts ``data`` on the channel that
        carries ``node_id``'s replies to ``researcher_id``, where a transport can check a
        reply's sender. None when no such channel exists besides :meth:`Bus.reply`.
    settle:
        Returns once everything sent so far has been delivered or lost for good (an
        in-process transport can tell). None: the contract waits up to ``timeout_s`` for
        what must arrive and :attr:`BusContract.quiet_s` for what must not.
    """

    researchers: Mapping[str, Bus]
    nodes: Mapping[str, Bus]
    teardown: Callable[[], None] | None = None
    inject: Callable[[str, str, bytes], None] | None = None
    inject_reply_as: Callable[[str, str, bytes], None] | None = None
    settle: Callable[[], None] | None = None

    @property
    def researcher(self) -> Bus:
        """The first researcher."""
        return next(iter(self.researchers.values()))

    def bus(self, participant_id: str) -> Bus:
        """The bus of a node or researcher."""
        if participant_id in self.nodes:
            return self.nodes[participant_id]
        return self.researchers[participant_id]


class Recorder:
    """Records what each participant's handler gets; waits for it with a deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._got: dict[str, list[Message]] = {}
        self._index: dict[tuple[str, tuple[Any, ...]], list[Message]] = {}

    def handler(self, participant_id: str) -> Callable[[Message], None]:
        """A handler that records under ``participant_id``."""
        with self._cond:
            self._got.setdefault(participant_id, [])

        def record(message: Message) -> None:
            with self._cond:
                self._got[participant_id].append(message)
                self._index.setdefault((participant_id, _key(message)), []).append(message)
                self._cond.notify_all()

        return record

    def got(self, participant_id: str) -> list[Message]:
        """What ``participant_id`` received so far, in arrival order."""
        with self._cond:
            return list(self._got.get(participant_id, ()))

    def has(self, participant_id: str, message: Message) -> bool:
        """Whether ``participant_id`` received a message equal to ``message``."""
        with self._cond:
            return self._has(participant_id, message)

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``predicate()`` (evaluated under the lock) is true, at most ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout_s)

    def has_all(self, participant_id: str, expected: Sequence[Message]) -> Callable[[], bool]:
        """A predicate for :meth:`wait`: every message of ``expected`` was received."""
        return lambda: all(self._has(participant_id, m) for m in expected)

    def _has(self, participant_id: str, message: Message) -> bool:
        return message in self._index.get((participant_id, _key(message)), ())


def _key(message: Message) -> tuple[Any, ...]:
    return (type(message), message.request_id, message.researcher_id, message.node_id)


# ------------------------------------------------------------------------------ reports


def describe(message: Message) -> str:
    """``ping q1 (researcher-1 -> n1)``: enough to find a message in a failure report."""
    if isinstance(message, Request):
        return (
            f"{message.command} {message.request_id} ({message.researcher_id} -> {message.node_id})"
        )
    return f"{message.command} {message.request_id} ({message.node_id} -> {message.researcher_id})"


def _listing(messages: Sequence[Message], limit: int = 12) -> str:
    shown = ", ".join(describe(m) for m in messages[:limit])
    more = len(messages) - limit
    return shown + (f", ... and {more} more" if more > 0 else "")


def _first_occurrences(got: Sequence[Message]) -> list[Message]:
    out: list[Message] = []
    for message in got:
        if message not in out:
            out.append(message)
    return out


# ------------------------------------------------------------------------------ contract


class BusContract:
    """Base class of a transport's contract tests; see the module documentation.

    A subclass sets ``__test__ = True``, implements :meth:`make_federation` and may change
    the class attributes below (bounds, ids, the size limit, the ordering promise).
    """

    __test__ = False

    #: Participant ids the contract uses (the protocol's id syntax).
    researcher_ids: tuple[str, ...] = ("researcher-1", "researcher-2")
    node_ids: tuple[str, ...] = ("n1", "n2", "n3")
    #: Bound of every wait for something that must arrive.
    timeout_s: float = 10.0
    #: How long to watch for something that must not arrive, when the federation cannot settle.
    quiet_s: float = 0.3
    #: Messages of the burst scenario.
    burst: int = 120
    #: Longest sequence the hypothesis scenario sends.
    max_sequence: int = 10
    #: Examples per hypothesis scenario (each builds a fresh federation).
    max_examples: int = 25
    #: The size limit the transport enforces on encoded messages.
    max_message_bytes: int = MAX_MESSAGE_BYTES
    #: True when messages from one sender through one channel (``send`` to one node,
    #: ``broadcast``, ``reply`` to one researcher) arrive in the order sent. The Bus interface
    #: does not promise it; a transport that does should say so here and be held to it.
    ordered_per_sender: bool = False

    def make_federation(self, researcher_ids: Sequence[str], node_ids: Sequence[str]) -> Federation:
        """Open one bus per participant, fresh and isolated from earlier federations."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_federation")

    def hypothesis_settings(self) -> settings:
        """Settings of the hypothesis scenarios (the loaded profile, with these bounds)."""
        return settings(
            max_examples=self.max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )

    # -------------------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def federation(
        self, researchers: int = 1, nodes: int | None = None
    ) -> Iterator[tuple[Federation, Recorder]]:
        """A federation whose every bus records into the returned :class:`Recorder`."""
        researcher_ids = self.researcher_ids[:researchers]
        node_ids = self.node_ids[: len(self.node_ids) if nodes is None else nodes]
        fed = self.make_federation(researcher_ids, node_ids)
        with contextlib.ExitStack() as stack:
            if fed.teardown is not None:
                stack.callback(fed.teardown)
            for bus in [*fed.researchers.values(), *fed.nodes.values()]:
                stack.callback(bus.close)
            assert set(fed.researchers) == set(researcher_ids), (
                f"make_federation returned researchers {sorted(fed.researchers)}, "
                f"asked for {list(researcher_ids)}"
            )
            assert set(fed.nodes) == set(node_ids), (
                f"make_federation returned nodes {sorted(fed.nodes)}, asked for {list(node_ids)}"
            )
            for pid, bus in [*fed.researchers.items(), *fed.nodes.items()]:
                expected_role = RESEARCHER if pid in fed.researchers else NODE
                assert (bus.participant_id, bus.role) == (pid, expected_role), (
                    f"bus for {expected_role} {pid!r} says it is {bus.role} {bus.participant_id!r}"
                )
            recorder = Recorder()
            for pid, bus in [*fed.researchers.items(), *fed.nodes.items()]:
                bus.subscribe(recorder.handler(pid))
            yield fed, recorder

    def deadline(self) -> float:
        """A request deadline far enough ahead for any scenario."""
        return time.time() + 3600

    def await_all(
        self, fed: Federation, recorder: Recorder, expected: Mapping[str, Sequence[Message]]
    ) -> None:
        """Wait (bounded) until each participant got all its expected messages; then check
        that nothing else arrived. Fails naming what was lost and what was unexpected."""
        if fed.settle is not None:
            fed.settle()
        for pid, messages in expected.items():
            recorder.wait(recorder.has_all(pid, messages), 0 if fed.settle else self.timeout_s)
        self.quiet(fed)
        problems = []
        for pid, messages in expected.items():
            lost = [m for m in messages if not recorder.has(pid, m)]
            unexpected = [m for m in recorder.got(pid) if m not in messages]
            if lost:
                problems.append(
                    f"{pid} lost {len(lost)} of {len(messages)} messages sent to it: "
                    f"{_listing(lost)}"
                )
            if unexpected:
                problems.append(
                    f"{pid} received {len(unexpected)} messages it should not have: "
                    f"{_listing(unexpected)}"
                )
        waited = "settled" if fed.settle else f"waited up to {self.timeout_s:g} s"
        assert not problems, "\n".join(problems) + f"\n({waited})"

    def quiet(self, fed: Federation) -> None:
        """Let anything in flight that must not arrive have its chance to."""
        if fed.settle is not None:
            fed.settle()
        else:
            threading.Event().wait(self.quiet_s)

    def answer_pings(self, fed: Federation) -> None:
        """Make every node answer each ping request with a pong to its researcher."""
        for node_id, bus in fed.nodes.items():

            def answer(message: Message, bus: Bus = bus, node_id: str = node_id) -> None:
                if isinstance(message, PingRequest):
                    bus.reply(pong(message, node_id))

            bus.subscribe(answer)

    def wait_status(
        self, fed: Federation, want: Callable[[frozenset[str]], bool]
    ) -> frozenset[str]:
        """Poll ``online_nodes()`` until ``want(online)``; return the last answer."""
        deadline = time.monotonic() + self.timeout_s
        online = fed.researcher.online_nodes()
        while not want(online) and time.monotonic() < deadline:
            threading.Event().wait(0.01)
            online = fed.researcher.online_nodes()
        return online

    def check_ordered(
        self, receiver: str, channel: str, sent: Sequence[Message], got: Sequence[Message]
    ) -> None:
        """First arrivals of ``sent`` must come in the order sent (duplicates allowed)."""
        arrived = [m for m in _first_occurrences(got) if m in sent]
        in_order = [m for m in sent if m in arrived]
        if arrived != in_order:
            first = next(
                i for i, (a, b) in enumerate(zip(arrived, in_order, strict=True)) if a != b
            )
            raise AssertionError(
                f"{receiver} got {channel} messages out of order: position {first} is "
                f"{describe(arrived[first])}, expected {describe(in_order[first])}\n"
                f"sent:    {_listing(in_order, 30)}\narrived: {_listing(arrived, 30)}"
            )

    # -------------------------------------------------------------------------- scenarios

    def test_a_request_reaches_exactly_its_node_and_the_reply_its_researcher(self) -> None:
        with self.federation(researchers=2) as (fed, recorder):
            self.answer_pings(fed)
            expected: dict[str, list[Message]] = {pid: [] for pid in [*fed.researchers, *fed.nodes]}
            for researcher_id, researcher in fed.researchers.items():
                for node_id in fed.nodes:
                    request = SearchRequest(
                        request_id=f"{researcher_id}.{node_id}",
                        researcher_id=researcher_id,
                        node_id=node_id,
                        deadline=self.deadline(),
                        tags=("a", "ü", ""),
                    )
                    researcher.send(node_id, request)
                    expected[node_id].append(request)
                    ping = PingRequest(
                        request_id=f"{researcher_id}.{node_id}.ping",
                        researcher_id=researcher_id,
                        node_id=node_id,
                        deadline=self.deadline(),
                    )
                    researcher.send(node_id, ping)
                    expected[node_id].append(ping)
                    expected[researcher_id].append(pong(ping, node_id))
            self.await_all(fed, recorder, expected)
            for pid in expected:
                for message in recorder.got(pid):
                    assert type(message) in (SearchRequest, PingRequest, PingReply), (
                        f"{pid} got a {type(message).__name__}: {message!r}"
                    )

    def test_a_broadcast_reaches_every_node(self) -> None:
        with self.federation() as (fed, recorder):
            self.answer_pings(fed)
            request = PingRequest(
                request_id="everyone",
                researcher_id=fed.researcher.participant_id,
                node_id=BROADCAST,
                deadline=self.deadline(),
            )
            fed.researcher.broadcast(request)
            expected: dict[str, list[Message]] = {n: [request] for n in fed.nodes}
            expected[fed.researcher.participant_id] = [pong(request, n) for n in fed.nodes]
            self.await_all(fed, recorder, expected)

    def test_a_reply_naming_another_node_than_its_sender_is_dropped(self) -> None:
        with self.federation(nodes=2) as (fed, recorder):
            researcher_id = fed.researcher.participant_id
            sender, claimed = list(fed.nodes)
            forged = PingReply(request_id="forged", researcher_id=researcher_id, node_id=claimed)
            try:
                fed.nodes[sender].reply(forged)
            except FedsmError:
                pass  # refused before sending: as good as dropped
            if fed.inject_reply_as is not None:
                fed.inject_reply_as(sender, researcher_id, encode(forged))
            genuine = PingReply(request_id="genuine", researcher_id=researcher_id, node_id=sender)
            fed.nodes[sender].reply(genuine)
            self.await_all(fed, recorder, {researcher_id: [genuine]})

    def test_an_oversized_message_is_refused_with_a_typed_error(self) -> None:
        with self.federation(nodes=1) as (fed, recorder):
            (node_id,) = fed.nodes
            researcher_id = fed.researcher.participant_id
            tags = tuple("x" * 4000 for _ in range(self.max_message_bytes // 4000 + 1))
            big = SearchRequest(
                request_id="big",
                researcher_id=researcher_id,
                node_id=node_id,
                deadline=self.deadline(),
                tags=tags,
            )
            big_reply = SearchReply(
                request_id="big",
                researcher_id=researcher_id,
                node_id=node_id,
                datasets=tuple({"name": "y" * 4000} for _ in tags),
            )
            for what, attempt in (
                ("send", lambda: fed.researcher.send(node_id, big)),
                ("reply", lambda: fed.nodes[node_id].reply(big_reply)),
            ):
                try:
                    attempt()
                except FedsmError:
                    pass
                except Exception as exc:
                    raise AssertionError(
                        f"an oversized {what} raised {type(exc).__name__}: {exc}; "
                        "expected a FedsmError (e.g. MessageTooLarge) or a silent drop"
                    ) from exc
            small = PingRequest(
                request_id="small",
                researcher_id=researcher_id,
                node_id=node_id,
                deadline=self.deadline(),
            )
            small_reply = pong(small, node_id)
            fed.researcher.send(node_id, small)
            fed.nodes[node_id].reply(small_reply)
            self.await_all(fed, recorder, {node_id: [small], researcher_id: [small_reply]})

    def test_garbage_never_crashes_a_participant(self) -> None:
        researcher_id, node_id, other = self.researcher_ids[0], self.node_ids[0], "elsewhere"
        deadline = self.deadline()
        misaddressed = [
            PingRequest(
                request_id="m", researcher_id=researcher_id, node_id=other, deadline=deadline
            ),
            PingReply(request_id="m", researcher_id=other, node_id=node_id),
        ]
        valid = [encode(m) for m in misaddressed] + [
            encode(PingReply(request_id="r", researcher_id=researcher_id, node_id=node_id)),
            encode(
                PingRequest(
                    request_id="q", researcher_id=researcher_id, node_id=node_id, deadline=deadline
                )
            ),
        ]
        near_valid = st.tuples(
            st.sampled_from(valid), st.integers(0, 80), st.binary(max_size=4)
        ).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :])
        payloads = st.one_of(
            st.binary(max_size=200),
            near_valid,
            near_valid_messages().map(lambda pair: pair[0]),
            st.sampled_from([b"", b"\xc1", bytes(self.max_message_bytes + 1), *valid]),
        )

        @self.hypothesis_settings()
        @given(to_node=st.lists(payloads, max_size=3), to_researcher=st.lists(payloads, max_size=3))
        def garbage_is_dropped(to_node: list[bytes], to_researcher: list[bytes]) -> None:
            with self.federation(nodes=1) as (fed, recorder):
                if fed.inject is None:
                    pytest.skip("the federation has no inject; the oversized scenario still runs")
                allowed: dict[str, list[Message]] = {node_id: [], researcher_id: []}
                for role, pid, payloads_ in (
                    (NODE, node_id, to_node),
                    (RESEARCHER, researcher_id, to_researcher),
                ):
                    for data in payloads_:
                        fed.inject(role, pid, data)
                        message = _decodes(data, self.max_message_bytes)
                        if message is not None and _addressed_to(message, role, pid):
                            allowed[pid].append(message)  # a mutation may still be valid
                good = PingRequest(
                    request_id="after-garbage",
                    researcher_id=researcher_id,
                    node_id=node_id,
                    deadline=self.deadline(),
                )
                good_reply = pong(good, node_id)
                fed.researcher.send(node_id, good)
                fed.nodes[node_id].reply(good_reply)
                if fed.settle is not None:
                    fed.settle()
                for pid, message in ((node_id, good), (researcher_id, good_reply)):
                    arrived = recorder.wait(
                        recorder.has_all(pid, [message]), 0 if fed.settle else self.timeout_s
                    )
                    assert arrived, (
                        f"{pid} stopped working after garbage: {describe(message)} never arrived"
                    )
                self.quiet(fed)
                for pid, message in ((node_id, good), (researcher_id, good_reply)):
                    bad = [m for m in recorder.got(pid) if m != message and m not in allowed[pid]]
                    assert not bad, f"{pid} was handed what it must drop: {_listing(bad)}"

        garbage_is_dropped()

    def test_any_sequence_of_messages_arrives_intact(self) -> None:
        researcher_id = self.researcher_ids[0]
        targets = st.sampled_from([*self.node_ids, BROADCAST])

        @self.hypothesis_settings()
        @given(sequence=st.lists(st.tuples(any_message, targets), max_size=self.max_sequence))
        def every_message_arrives(sequence: list[tuple[Message, str]]) -> None:
            with self.federation() as (fed, recorder):
                expected: dict[str, list[Message]] = {
                    pid: [] for pid in [researcher_id, *fed.nodes]
                }
                channels: dict[tuple[str, str], list[Message]] = {}
                for i, (template, target) in enumerate(sequence):
                    message, sender, receivers, channel = self._address(template, i, target)
                    bus = fed.bus(sender)
                    try:
                        if channel == "broadcast":
                            bus.broadcast(message)  # type: ignore[arg-type]
                        elif isinstance(message, Request):
                            bus.send(message.node_id, message)
                        else:
                            bus.reply(message)  # type: ignore[arg-type]
                    except FedsmError as exc:
                        size = len(encode(message, max_bytes=2**62))
                        assert size > self.max_message_bytes, (
                            f"{sender} refused {describe(message)} ({size} bytes): {exc!r}"
                        )
                        continue
                    for receiver in receivers:
                        expected[receiver].append(message)
                        channels.setdefault((receiver, f"{channel} from {sender}"), []).append(
                            message
                        )
                self.await_all(fed, recorder, expected)
                if self.ordered_per_sender:
                    for (receiver, channel), sent in channels.items():
                        self.check_ordered(receiver, channel, sent, recorder.got(receiver))

        every_message_arrives()

    def _address(
        self, template: Message, i: int, target: str
    ) -> tuple[Message, str, list[str], str]:
        """``template`` readdressed: (message, sender, receivers, channel)."""
        researcher_id = self.researcher_ids[0]
        request_id = f"m{i}"
        if isinstance(template, Request):
            message = dataclasses.replace(
                template, request_id=request_id, researcher_id=researcher_id, node_id=target
            )
            if target == BROADCAST:
                return message, researcher_id, list(self.node_ids), "broadcast"
            return message, researcher_id, [target], "send"
        sender = self.node_ids[0] if target == BROADCAST else target
        message = dataclasses.replace(
            template, request_id=request_id, researcher_id=researcher_id, node_id=sender
        )
        return message, sender, [researcher_id], "reply"

    def test_no_message_is_lost_in_a_burst(self) -> None:
        with self.federation() as (fed, recorder):
            self.answer_pings(fed)
            researcher_id = fed.researcher.participant_id
            nodes = list(fed.nodes)
            expected: dict[str, list[Message]] = {pid: [] for pid in [researcher_id, *nodes]}
            for i in range(self.burst):
                node_id = nodes[i % len(nodes)]
                request = PingRequest(
                    request_id=f"burst-{i}",
                    researcher_id=researcher_id,
                    node_id=node_id,
                    deadline=self.deadline(),
                )
                fed.researcher.send(node_id, request)
                expected[node_id].append(request)
                expected[researcher_id].append(pong(request, node_id))
            self.await_all(fed, recorder, expected)

    def test_messages_from_one_sender_arrive_in_order(self) -> None:
        if not self.ordered_per_sender:
            pytest.skip("ordered_per_sender is False: the transport does not promise order")
        with self.federation(nodes=1) as (fed, recorder):
            self.answer_pings(fed)
            (node_id,) = fed.nodes
            researcher_id = fed.researcher.participant_id
            requests = [
                PingRequest(
                    request_id=f"seq-{i}",
                    researcher_id=researcher_id,
                    node_id=node_id,
                    deadline=self.deadline(),
                )
                for i in range(self.burst)
            ]
            for request in requests:
                fed.researcher.send(node_id, request)
            replies = [pong(r, node_id) for r in requests]
            self.await_all(fed, recorder, {node_id: requests, researcher_id: replies})
            self.check_ordered(
                node_id, f"send from {researcher_id}", requests, recorder.got(node_id)
            )
            self.check_ordered(
                researcher_id, f"reply from {node_id}", replies, recorder.got(researcher_id)
            )

    def test_the_researcher_sees_nodes_online_and_then_offline(self) -> None:
        with self.federation() as (fed, _):
            nodes = frozenset(fed.nodes)
            online = self.wait_status(fed, lambda now: nodes <= now)
            assert nodes <= online, (
                f"nodes {sorted(nodes - online)} never showed online within {self.timeout_s:g} s; "
                f"online: {sorted(online)}"
            )
            leaving = sorted(nodes)[-1]
            fed.nodes[leaving].close()
            online = self.wait_status(fed, lambda now: leaving not in now)
            assert leaving not in online, (
                f"node {leaving} closed but still shows online after {self.timeout_s:g} s"
            )
            assert nodes - {leaving} <= online, (
                f"closing {leaving} took {sorted(nodes - {leaving} - online)} offline too"
            )

    def test_close_is_idempotent_and_stops_delivery(self) -> None:
        with self.federation(nodes=2) as (fed, recorder):
            researcher_id = fed.researcher.participant_id
            gone, staying = list(fed.nodes)
            deadline = self.deadline()
            fed.nodes[gone].close()
            fed.nodes[gone].close()

            def ping(name: str, node_id: str) -> PingRequest:
                return PingRequest(
                    request_id=name,
                    researcher_id=researcher_id,
                    node_id=node_id,
                    deadline=deadline,
                )

            fed.researcher.send(gone, ping("to-closed-node", gone))  # queued, never delivered
            fed.researcher.send(staying, ping("to-open-node", staying))
            fed.researcher.broadcast(ping("everyone", BROADCAST))
            try:
                fed.nodes[gone].reply(pong(ping("x", gone), gone))
            except BusClosed:
                pass
            else:
                raise AssertionError(f"closed node {gone} could still reply (expected BusClosed)")
            self.await_all(
                fed,
                recorder,
                {
                    gone: [],
                    staying: [ping("to-open-node", staying), ping("everyone", BROADCAST)],
                    researcher_id: [],
                },
            )

            fed.researcher.close()
            fed.researcher.close()
            fed.nodes[staying].reply(pong(ping("late", staying), staying))
            try:
                fed.researcher.send(staying, ping("from-closed", staying))
            except BusClosed:
                pass
            else:
                raise AssertionError(
                    f"closed researcher {researcher_id} could still send (expected BusClosed)"
                )
            self.quiet(fed)
            late = recorder.got(researcher_id)
            assert not late, f"closed researcher {researcher_id} was handed {_listing(late)}"


def pong(request: Message, node_id: str) -> PingReply:
    """The reply of ``node_id`` to ``request``."""
    return PingReply(
        request_id=request.request_id, researcher_id=request.researcher_id, node_id=node_id
    )


def _decodes(data: bytes, max_bytes: int) -> Message | None:
    try:
        return decode(data, max_bytes=max_bytes)
    except Exception:  # any refusal counts as "not a message"
        return None


def _addressed_to(message: Message, role: str, participant_id: str) -> bool:
    if role == NODE:
        return isinstance(message, Request) and message.node_id in (participant_id, BROADCAST)
    return isinstance(message, Reply) and message.researcher_id == participant_id
