"""The in-memory bus: the shared bus contract, then what is particular to it (synchronous
delivery, queueing, liveness, limits, seeded fault injection)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsm.core.messages import BROADCAST, Message, PingReply, PingRequest, SearchRequest
from fedsm.core.protocol import MAX_MESSAGE_BYTES
from fedsm.core.protocol_errors import MessageTooLarge
from fedsm.errors import DeadlineExceeded
from fedsm.testing.bus import BusContract, Federation
from fedsm.transport import Faults, MemoryBroker, MemoryBus, TransportError

R = "researcher-1"


def ping(i: int | str, node: str = "n1", researcher: str = R) -> PingRequest:
    return PingRequest(request_id=f"q{i}", researcher_id=researcher, node_id=node, deadline=1e10)


def pong(request: Message, node: str) -> PingReply:
    return PingReply(
        request_id=request.request_id, researcher_id=request.researcher_id, node_id=node
    )


class Inbox:
    """A handler that records what it gets and on which thread."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.threads: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        with self.lock:
            self.messages.append(message)
            self.threads.append(threading.get_ident())

    @property
    def ids(self) -> list[str]:
        with self.lock:
            return [m.request_id for m in self.messages]


class TestMemoryBusContract(BusContract):
    """The scenarios every bus passes (fedsm.testing.bus), on a fresh MemoryBroker each time."""

    __test__ = True
    ordered_per_sender = True  # without faults, delivery is a direct call in the sender's thread

    def make_federation(self, researcher_ids, node_ids):
        broker = MemoryBroker()
        return Federation(
            researchers={r: MemoryBus(broker, r, "researcher") for r in researcher_ids},
            nodes={n: MemoryBus(broker, n, "node") for n in node_ids},
            teardown=broker.close,
            inject=broker.deliver_raw,
            settle=broker.flush,
        )


@pytest.fixture
def broker():
    with MemoryBroker() as b:
        yield b


def test_request_reply_is_synchronous_in_the_senders_thread(broker):
    researcher = MemoryBus(broker, R, "researcher")
    node = MemoryBus(broker, "n1", "node")
    node_inbox, researcher_inbox = Inbox(), Inbox()
    node.subscribe(node_inbox)
    node.subscribe(lambda m: node.reply(pong(m, "n1")))
    researcher.subscribe(researcher_inbox)

    researcher.send("n1", ping(1))

    # Delivered before send() returned, in this thread, both ways.
    assert node_inbox.ids == ["q1"]
    assert node_inbox.threads == [threading.get_ident()]
    assert researcher_inbox.messages == [pong(ping(1), "n1")]


def test_no_thread_is_started_without_faults(broker):
    before = threading.active_count()
    researcher = MemoryBus(broker, R, "researcher")
    node = MemoryBus(broker, "n1", "node")
    node.subscribe(lambda m: node.reply(pong(m, "n1")))
    for i in range(50):
        researcher.send("n1", ping(i))
    assert threading.active_count() == before


def test_handler_never_shares_the_senders_object(broker):
    researcher = MemoryBus(broker, R, "researcher")
    node = MemoryBus(broker, "n1", "node")
    inbox = Inbox()
    node.subscribe(inbox)
    sent = SearchRequest(
        request_id="s1", researcher_id=R, node_id="n1", deadline=1e10, tags=("a", "b")
    )
    researcher.send("n1", sent)
    (got,) = inbox.messages
    assert got == sent and got is not sent


def test_requests_for_a_node_not_yet_connected_wait_for_it(broker):
    researcher = MemoryBus(broker, R, "researcher")
    researcher.send("late", ping(1, "late"))
    researcher.send("late", ping(2, "late"))
    assert broker.pending("node", "late") == 2

    node = MemoryBus(broker, "late", "node")
    inbox = Inbox()
    node.subscribe(inbox)  # buffered until the first handler, then handed over in order
    assert inbox.ids == ["q1", "q2"]
    assert broker.pending("node", "late") == 0


def test_pending_queue_is_bounded_and_drops_the_oldest(caplog):
    with MemoryBroker(max_pending=3) as broker:
        researcher = MemoryBus(broker, R, "researcher")
        with caplog.at_level(logging.WARNING):
            for i in range(5):
                researcher.send("late", ping(i, "late"))
        assert broker.pending("node", "late") == 3
        assert "dropped the oldest" in caplog.text
        inbox = Inbox()
        MemoryBus(broker, "late", "node").subscribe(inbox)
        assert inbox.ids == ["q2", "q3", "q4"]


def test_replies_wait_for_a_researcher_that_reconnects(broker):
    node = MemoryBus(broker, "n1", "node")
    node.reply(pong(ping(7), "n1"))
    researcher = MemoryBus(broker, R, "researcher")
    inbox = Inbox()
    researcher.subscribe(inbox)
    assert inbox.ids == ["q7"]


def test_broadcast_reaches_every_known_node_including_offline_ones(broker):
    researcher = MemoryBus(broker, R, "researcher")
    inboxes = {}
    nodes = {}
    for name in ("a", "b", "c"):
        nodes[name] = MemoryBus(broker, name, "node")
        inboxes[name] = Inbox()
        nodes[name].subscribe(inboxes[name])
    nodes["c"].close()

    researcher.broadcast(ping("b1", BROADCAST))

    assert inboxes["a"].ids == ["qb1"] and inboxes["b"].ids == ["qb1"]
    assert inboxes["c"].ids == []
    again = Inbox()
    MemoryBus(broker, "c", "node").subscribe(again)
    assert again.ids == ["qb1"]


def test_online_and_offline_nodes(broker):
    researcher = MemoryBus(broker, R, "researcher")
    changes = []
    researcher.on_status(lambda node, online: changes.append((node, online)))
    a = MemoryBus(broker, "a", "node")
    b = MemoryBus(broker, "b", "node")
    researcher.wait_online(["a", "b"], timeout_s=1)
    assert researcher.online_nodes() == {"a", "b"}
    b.close()
    b.close()  # idempotent
    assert researcher.online_nodes() == {"a"}
    assert researcher.offline_nodes() == {"b"}
    assert changes == [("a", True), ("b", True), ("b", False)]
    with pytest.raises(DeadlineExceeded, match=r"\['b'\] not online"):
        researcher.wait_online(["a", "b"], timeout_s=0.01)
    # A researcher that arrives later learns the current picture.
    late = MemoryBus(broker, "r2", "researcher")
    assert late.online_nodes() == {"a"} and late.offline_nodes() == {"b"}
    a.close()


def test_roles_and_addresses_are_enforced(broker):
    researcher = MemoryBus(broker, R, "researcher")
    node = MemoryBus(broker, "n1", "node")
    with pytest.raises(TransportError, match="only a researcher"):
        node.send("n1", ping(1))
    with pytest.raises(TransportError, match="only a node"):
        researcher.reply(pong(ping(1), "n1"))
    with pytest.raises(TransportError, match="node_id='n1'"):
        researcher.send("n2", ping(1, "n1"))
    with pytest.raises(TransportError, match="broadcast"):
        researcher.broadcast(ping(1, "n1"))
    with pytest.raises(TransportError, match="cannot send a reply whose node_id is 'n2'"):
        node.reply(pong(ping(1, "n2"), "n2"))
    with pytest.raises(TransportError, match="already connected"):
        MemoryBus(broker, "n1", "node")
    with pytest.raises(ValueError, match="role must be"):
        MemoryBus(broker, "x", "admin")
    with pytest.raises(ValueError, match="invalid"):
        MemoryBus(broker, "bad/id", "node")


def test_an_oversized_message_for_an_offline_node_is_not_queued(broker):
    researcher = MemoryBus(broker, R, "researcher")
    tags = tuple("x" * 4000 for _ in range(MAX_MESSAGE_BYTES // 4000 + 1))
    big = SearchRequest(
        request_id="big", researcher_id=R, node_id="offline-node", deadline=1e10, tags=tags
    )
    with pytest.raises(MessageTooLarge, match="repository"):
        researcher.send("offline-node", big)
    assert broker.pending("node", "offline-node") == 0


def test_a_raising_handler_does_not_break_delivery(broker, caplog):
    researcher = MemoryBus(broker, R, "researcher")
    node = MemoryBus(broker, "n1", "node")
    inbox = Inbox()

    def broken(message: Message) -> None:
        raise RuntimeError("handler bug")

    node.subscribe(broken)
    node.subscribe(inbox)
    with caplog.at_level(logging.ERROR):
        researcher.send("n1", ping(1))  # does not raise in the sender
    assert inbox.ids == ["q1"]
    assert "handler bug" in caplog.text


def test_concurrent_senders_lose_nothing(broker):
    nodes = {name: MemoryBus(broker, name, "node") for name in ("a", "b")}
    inboxes = {name: Inbox() for name in nodes}
    for name, bus in nodes.items():
        bus.subscribe(inboxes[name])
    researchers = [MemoryBus(broker, f"r{i}", "researcher") for i in range(4)]

    def work(i: int) -> None:
        for j in range(250):
            node = "ab"[j % 2]
            researchers[i].send(node, ping(f"{i}-{j}", node, f"r{i}"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    got = sorted(inboxes["a"].ids + inboxes["b"].ids)
    assert got == sorted(f"q{i}-{j}" for i in range(4) for j in range(250))


# ----------------------------------------------------------------------------- faults


def run_with_faults(faults: Faults, count: int = 200) -> list[str]:
    """Send ``count`` pings through ``faults``; return the ids the node saw, in order."""
    with MemoryBroker() as broker:
        researcher = MemoryBus(broker, R, "researcher", faults=faults)
        node = MemoryBus(broker, "n1", "node")
        inbox = Inbox()
        node.subscribe(inbox)
        for i in range(count):
            researcher.send("n1", ping(i))
        broker.flush()
        return inbox.ids


def test_faults_validate_their_arguments():
    with pytest.raises(ValueError, match="drop"):
        Faults(drop=1.5)
    with pytest.raises(ValueError, match="reorder_window"):
        Faults(reorder_window=-1)
    assert not Faults().active and Faults(delay_s=0.1).active


def test_drop_is_seeded_and_partial():
    first = run_with_faults(Faults(drop=0.3, seed=1))
    assert first == run_with_faults(Faults(drop=0.3, seed=1))
    assert first != run_with_faults(Faults(drop=0.3, seed=2))
    assert 100 < len(first) < 190
    assert first == sorted(set(first), key=first.index)  # no duplicates, order kept
    assert run_with_faults(Faults(drop=1.0)) == []


def test_duplicates_reach_the_handler():
    always = run_with_faults(Faults(duplicate=1.0), count=10)
    assert always == [f"q{i}" for i in range(10) for _ in range(2)]
    some = run_with_faults(Faults(duplicate=0.25, seed=3))
    assert some == run_with_faults(Faults(duplicate=0.25, seed=3))
    assert set(some) == {f"q{i}" for i in range(200)}
    assert 200 < len(some) < 300


def test_reorder_window_shuffles_and_flush_releases_the_rest():
    with MemoryBroker() as broker:
        researcher = MemoryBus(broker, R, "researcher", faults=Faults(reorder_window=4, seed=5))
        inbox = Inbox()
        MemoryBus(broker, "n1", "node").subscribe(inbox)
        for i in range(6):
            researcher.send("n1", ping(i))
        assert sorted(inbox.ids) == ["q0", "q1", "q2", "q3"]  # one window released
        broker.flush()
        assert sorted(inbox.ids) == [f"q{i}" for i in range(6)]
    shuffled = run_with_faults(Faults(reorder_window=10, seed=5), count=100)
    assert sorted(shuffled) == sorted(f"q{i}" for i in range(100))
    assert shuffled != [f"q{i}" for i in range(100)]
    assert shuffled == run_with_faults(Faults(reorder_window=10, seed=5), count=100)


def test_delay_delivers_later_on_the_timer_thread():
    with MemoryBroker() as broker:
        researcher = MemoryBus(broker, R, "researcher", faults=Faults(delay_s=0.05))
        node = MemoryBus(broker, "n1", "node")
        arrived = threading.Event()
        seen: list[tuple[str, str, float]] = []

        def handler(message: Message) -> None:
            seen.append((message.request_id, threading.current_thread().name, time.monotonic()))
            arrived.set()

        node.subscribe(handler)
        sent_at = time.monotonic()
        researcher.send("n1", ping(1))
        assert seen == []  # not yet
        assert arrived.wait(5)
        (request_id, thread_name, at) = seen[0]
        assert request_id == "q1" and thread_name == "fedsm-memory-delay"
        assert at - sent_at >= 0.045
        researcher.send("n1", ping(2))
        broker.flush()  # runs pending delays now
        assert [s[0] for s in seen] == ["q1", "q2"]


def test_broker_default_faults_apply_to_buses_without_their_own():
    with MemoryBroker(faults=Faults(drop=1.0)) as broker:
        researcher = MemoryBus(broker, R, "researcher")
        inbox = Inbox()
        MemoryBus(broker, "n1", "node", faults=Faults()).subscribe(inbox)
        researcher.send("n1", ping(1))
        assert inbox.messages == []


@given(
    duplicate=st.floats(0, 1),
    window=st.integers(0, 8),
    seed=st.integers(0, 2**32),
    count=st.integers(0, 40),
)
def test_without_drops_every_message_arrives_at_least_once(duplicate, window, seed, count):
    got = run_with_faults(Faults(duplicate=duplicate, reorder_window=window, seed=seed), count)
    assert set(got) == {f"q{i}" for i in range(count)}
    if duplicate == 0:
        assert len(got) == count
