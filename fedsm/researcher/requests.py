"""The researcher's side of the bus: ping, list, search and the reply inbox a Job collects from.

``Requests`` subscribes once to the researcher's bus and puts every message into one inbox
queue; the Job and the helpers here take from it with a deadline (``queue.get(timeout=...)``),
so waiting never spins. Replies nobody is waiting for (late, duplicated, for another request)
are logged at DEBUG and dropped.

Discovery: a researcher's bus learns which nodes are online only as they announce themselves
(over MQTT, their retained status arrives some milliseconds after the bus connects; a node
started later announces itself then). So a search has a *discovery window*
(``discovery_s``, default :data:`DISCOVERY_S`): during it, every node seen coming online is
sent the request too, and the search ends early once the nodes it was given all answered, or
``min_nodes`` nodes have a matching dataset and every online node answered. After the window,
nodes online and asked are waited for up to ``deadline_s`` each. Every wait is bounded by
``discovery_s + deadline_s``.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fedsm.core.messages import (
    BROADCAST,
    ErrorReply,
    ListReply,
    ListRequest,
    Message,
    PingReply,
    PingRequest,
    Reply,
    Request,
    SearchReply,
    SearchRequest,
)
from fedsm.errors import FedsmError
from fedsm.transport.base import Bus

__all__ = [
    "DISCOVERY_S",
    "FederatedDataSet",
    "FederatedDataSetError",
    "Requests",
    "SearchSummary",
    "new_id",
]

log = logging.getLogger(__name__)

#: Default discovery window of a search, in seconds: how long nodes have to announce
#: themselves (ended early when the expected nodes, or ``min_nodes``, answered).
DISCOVERY_S = 5.0
#: How often a discovery looks for nodes that came online (it also wakes on every reply).
_POLL_S = 0.05


def new_id(prefix: str) -> str:
    """A fresh random id such as ``researcher-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


class FederatedDataSetError(FedsmError, ValueError):
    """A FederatedDataSet built from invalid data."""


class FederatedDataSet:
    """The datasets found on the nodes: ``{node_id: dataset metadata}``, one dataset per node.

    As in the seed, a node's entry may be given as a one-element list; more than one dataset
    per node is refused because a round trains one dataset per node.
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        clean: dict[str, dict[str, Any]] = {}
        for node_id, entry in data.items():
            if isinstance(entry, (list, tuple)):
                if len(entry) != 1:
                    raise FederatedDataSetError(
                        f"node {node_id} has {len(entry)} datasets matching; exactly one is "
                        "needed per node (make the search tags more specific)"
                    )
                entry = entry[0]
            if not isinstance(entry, Mapping) or "dataset_id" not in entry:
                raise FederatedDataSetError(f"node {node_id}: dataset metadata has no dataset_id")
            clean[str(node_id)] = dict(entry)
        self._data = dict(sorted(clean.items()))

    def data(self) -> dict[str, dict[str, Any]]:
        """The mapping node id -> dataset metadata (sorted by node id)."""
        return dict(self._data)

    def node_ids(self) -> list[str]:
        return list(self._data)

    def dataset_ids(self) -> dict[str, str]:
        return {node: entry["dataset_id"] for node, entry in self._data.items()}

    def sample_sizes(self) -> list[int]:
        """The seed's ``sample_sizes()``: each node's number of samples (the first dimension
        of its dataset's ``shape``), in the order of :meth:`node_ids`.

        Raises :class:`FederatedDataSetError` for a node whose metadata has no shape (a
        dataset set built from ids only, as a restored Job's is).
        """
        return [self._samples(node, entry) for node, entry in self._data.items()]

    def shapes(self) -> dict[str, int]:
        """The seed's ``shapes()``: node id -> number of samples (what :meth:`sample_sizes`
        lists, by node). The full shape of each dataset is ``data()[node]["shape"]``."""
        return {node: self._samples(node, entry) for node, entry in self._data.items()}

    @staticmethod
    def _samples(node: str, entry: Mapping[str, Any]) -> int:
        shape = entry.get("shape")
        if (
            not isinstance(shape, (list, tuple))
            or not shape
            or isinstance(shape[0], bool)
            or not isinstance(shape[0], int)
            or shape[0] < 0
        ):
            raise FederatedDataSetError(
                f"node {node}: dataset metadata has no usable shape ({shape!r}); search the "
                "nodes again for their datasets' metadata"
            )
        return int(shape[0])

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FederatedDataSet) and self._data == other._data

    def __repr__(self) -> str:
        return f"FederatedDataSet({self.node_ids()})"


@dataclass(frozen=True)
class SearchSummary:
    """What a search saw: the nodes with a matching dataset (``found``), those that answered,
    those online when it ended, the nodes it was given (``expected``, None for a broadcast)
    and how long it took. :attr:`Requests.last_search` holds the last one."""

    tags: tuple[str, ...]
    found: tuple[str, ...]
    answered: tuple[str, ...]
    online: tuple[str, ...]
    expected: tuple[str, ...] | None
    elapsed_s: float
    discovery_s: float
    ended_early: bool

    @property
    def missing(self) -> tuple[str, ...]:
        """The expected nodes that did not answer."""
        return tuple(n for n in self.expected or () if n not in self.answered)

    def line(self) -> str:
        """One line for a terminal or a log."""
        shown = ", ".join(self.found[:10]) + (", ..." if len(self.found) > 10 else "")
        nodes = f" ({shown})" if self.found else ""
        how = "ended early" if self.ended_early else f"discovery window {self.discovery_s:g} s"
        text = (
            f"search {list(self.tags)}: {len(self.found)} node(s) with a matching dataset{nodes}; "
            f"{len(self.answered)} answered, {len(self.online)} online, "
            f"in {self.elapsed_s:.1f} s ({how})"
        )
        if self.missing:
            text += f"; no answer from {list(self.missing)}"
        return text


class Requests:
    """Send requests to nodes and collect their replies, with deadlines.

    Parameters
    ----------
    bus:
        The researcher's bus (its ``participant_id`` is the researcher id).
    default_deadline_s:
        How long ping/list/search wait for nodes that are online but have not answered.
    default_discovery_s:
        The discovery window of :meth:`search` when none is given (see the module's doc).
    clock:
        Wall clock for the ``deadline`` field of requests (seconds since the epoch).
    """

    def __init__(
        self,
        bus: Bus,
        *,
        default_deadline_s: float = 10.0,
        default_discovery_s: float = DISCOVERY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.researcher_id = bus.participant_id
        self.default_deadline_s = default_deadline_s
        self.default_discovery_s = _seconds("default_discovery_s", default_discovery_s)
        self.clock = clock
        #: What the last :meth:`search` saw (None before the first).
        self.last_search: SearchSummary | None = None
        self._inbox: queue.Queue[Message] = queue.Queue()
        bus.subscribe(self._inbox.put)
        self._online_lock = threading.Lock()
        self._came_online: set[str] = set()
        on_status = getattr(bus, "on_status", None)
        if on_status is not None:  # transports that see nodes come and go
            on_status(self._status_changed)

    def _status_changed(self, node_id: str, online: bool) -> None:
        if online:
            with self._online_lock:
                self._came_online.add(node_id)

    def came_online(self) -> frozenset[str]:
        """Nodes seen coming (back) online since they were last taken or forgotten."""
        with self._online_lock:
            return frozenset(self._came_online)

    def take_came_online(self) -> frozenset[str]:
        """:meth:`came_online`, and forget them."""
        with self._online_lock:
            out = frozenset(self._came_online)
            self._came_online.clear()
        return out

    def forget_came_online(self, nodes: Iterable[str]) -> None:
        """Forget that these nodes came online (they are being sent their request now)."""
        with self._online_lock:
            self._came_online.difference_update(nodes)

    # ------------------------------------------------------------------ low level

    def send(self, node_id: str, request: Request) -> None:
        """Send one request to one node."""
        self.bus.send(node_id, request)

    def next_message(self, timeout_s: float) -> Message | None:
        """The next message from the inbox, or None once ``timeout_s`` has passed."""
        try:
            return self._inbox.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def queued(self) -> int:
        """How many messages wait in the inbox now."""
        return self._inbox.qsize()

    def _collect(
        self, request_id: str, expected: Iterable[str] | None, deadline_s: float
    ) -> dict[str, Reply]:
        """Replies to ``request_id`` by node, until every expected node answered or time is up.

        ``expected`` None means "the nodes online now" (re-read while waiting, so a node that
        goes offline is not waited for).
        """
        fixed = None if expected is None else set(expected)
        replies: dict[str, Reply] = {}
        end = time.monotonic() + deadline_s
        while True:
            waiting_for = (set(self.bus.online_nodes()) if fixed is None else fixed) - set(replies)
            if not waiting_for and (fixed is not None or replies or not self.bus.online_nodes()):
                break
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            message = self.next_message(remaining)
            if message is None:
                break
            if not isinstance(message, Reply) or message.request_id != request_id:
                log.debug(
                    "ignoring %s from %s (not for %s)", message.command, message.node_id, request_id
                )
                continue
            if message.node_id in replies:
                log.debug("ignoring duplicate %s from %s", message.command, message.node_id)
                continue
            replies[message.node_id] = message
        return replies

    def ask(
        self,
        request_cls: type[Request],
        nodes: Iterable[str] | None,
        deadline_s: float | None,
        **fields: Any,
    ) -> dict[str, Reply]:
        """Send one request (to ``nodes``, or broadcast when None) and collect the replies.

        ``fields`` are the request's own fields beyond the common header.
        """
        deadline_s = self.default_deadline_s if deadline_s is None else deadline_s
        request_id = new_id("req")
        header = dict(
            request_id=request_id,
            researcher_id=self.researcher_id,
            deadline=self.clock() + deadline_s,
            **fields,
        )
        if nodes is None:
            self.bus.broadcast(request_cls(node_id=BROADCAST, **header))
        else:
            nodes = list(nodes)
            for node_id in nodes:
                self.bus.send(node_id, request_cls(node_id=node_id, **header))
        return self._collect(request_id, nodes, deadline_s)

    # ------------------------------------------------------------------ the seed's requests

    def ping_nodes(
        self,
        nodes: Iterable[str] | None = None,
        deadline_s: float | None = None,
        *,
        discovery_s: float = 0.0,
    ) -> dict[str, float]:
        """Round-trip time in seconds of every node that answered.

        ``discovery_s`` (default none) gives nodes that long to come online and answer; the
        wait ends early once every node of ``nodes`` answered.
        """
        start = time.monotonic()
        if discovery_s:
            replies = self._discover(PingRequest, nodes, deadline_s, discovery_s, None)[0]
        else:
            replies = self.ask(PingRequest, nodes, deadline_s)
        elapsed = time.monotonic() - start
        return {node: elapsed for node, reply in replies.items() if isinstance(reply, PingReply)}

    def list(
        self,
        nodes: Iterable[str] | None = None,
        deadline_s: float | None = None,
        *,
        discovery_s: float = 0.0,
    ) -> dict[str, list[dict[str, Any]]]:
        """The datasets of every node that answered (paths are never sent by nodes).

        ``discovery_s`` as for :meth:`ping_nodes`.
        """
        if discovery_s:
            replies = self._discover(ListRequest, nodes, deadline_s, discovery_s, None)[0]
        else:
            replies = self.ask(ListRequest, nodes, deadline_s)
        return {n: list(r.datasets) for n, r in replies.items() if isinstance(r, ListReply)}

    def search(
        self,
        tags: Iterable[str],
        nodes: Iterable[str] | None = None,
        deadline_s: float | None = None,
        *,
        discovery_s: float | None = None,
        min_nodes: int | None = None,
    ) -> FederatedDataSet:
        """Datasets carrying all ``tags``, one per node, from the nodes found in the discovery
        window.

        The request is broadcast (or sent to ``nodes``), and sent again to every node seen
        coming online during the window of ``discovery_s`` seconds (default
        :attr:`default_discovery_s`). The search ends early once every one of ``nodes``
        answered, or (without ``nodes``) once ``min_nodes`` nodes have a matching dataset and
        every online node answered; after the window it waits for online nodes that have
        not answered, up to ``deadline_s`` each. ``discovery_s=0`` asks only the nodes
        online now. A log line says what it found; :attr:`last_search` holds it.

        Nodes with no match answer with an empty list and are left out of the result.
        """
        tags = tuple(tags)
        if min_nodes is not None and (
            isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 1
        ):
            raise ValueError(f"min_nodes must be a positive int or None, got {min_nodes!r}")
        discovery_s = self.default_discovery_s if discovery_s is None else discovery_s
        found: dict[str, Any] = {}
        usable: set[str] = set()

        def enough(replies: Mapping[str, Reply]) -> bool:
            if min_nodes is None:
                return False
            usable.update(
                n for n, r in replies.items() if isinstance(r, SearchReply) and len(r.datasets) == 1
            )
            return len(usable) >= min_nodes

        start = time.monotonic()
        replies, online, early = self._discover(
            SearchRequest, nodes, deadline_s, discovery_s, enough, tags=tags
        )
        for node_id, reply in sorted(replies.items()):
            if isinstance(reply, ErrorReply):
                log.warning("search failed on %s: %s", node_id, reply.message)
            elif isinstance(reply, SearchReply) and len(reply.datasets) > 1:
                log.warning(
                    "search: %s has %d datasets tagged %s; left out (a round trains one "
                    "dataset per node: search with more specific tags)",
                    node_id,
                    len(reply.datasets),
                    list(tags),
                )
            elif isinstance(reply, SearchReply) and reply.datasets:
                found[node_id] = list(reply.datasets)
        result = FederatedDataSet(found)
        self.last_search = SearchSummary(
            tags=tags,
            found=tuple(result.node_ids()),
            answered=tuple(sorted(replies)),
            online=tuple(sorted(online)),
            expected=None if nodes is None else tuple(sorted(set(nodes))),
            elapsed_s=time.monotonic() - start,
            discovery_s=float(discovery_s),
            ended_early=early,
        )
        log.info("%s", self.last_search.line())
        return result

    def _discover(
        self,
        request_cls: type[Request],
        nodes: Iterable[str] | None,
        deadline_s: float | None,
        discovery_s: float,
        enough: Callable[[Mapping[str, Reply]], bool] | None,
        **fields: Any,
    ) -> tuple[dict[str, Reply], frozenset[str], bool]:
        """Ask the nodes (``nodes``, or every node) during a discovery window; return the
        replies by node, the nodes online at the end, and whether it ended before the window.

        A node seen online that was not online when the request went out is sent it again
        (same request id: a broadcast reaches only the nodes connected when it is published,
        and a direct request to a node never seen may be lost). The wait ends when every
        expected node answered, when ``enough(replies)`` holds and no online node is still
        awaited, or after the window once no online node is awaited (each is awaited
        ``deadline_s`` from when it was asked); never later than ``discovery_s + deadline_s``.
        """
        deadline_s = _seconds(
            "deadline_s", self.default_deadline_s if deadline_s is None else deadline_s
        )
        discovery_s = _seconds("discovery_s", discovery_s)
        expected = None if nodes is None else frozenset(nodes)
        request_id = new_id("req")
        header = dict(
            request_id=request_id,
            researcher_id=self.researcher_id,
            deadline=self.clock() + discovery_s + deadline_s,
            **fields,
        )
        start = time.monotonic()
        window_end = start + discovery_s
        hard_end = window_end + deadline_s
        # Read who is online *before* sending: a node coming online after this is asked again.
        online = self.bus.online_nodes()
        asked: dict[str, float] = {}  # node -> when a request surely reached it
        if expected is None:
            self.bus.broadcast(request_cls(node_id=BROADCAST, **header))
            asked.update((n, start) for n in online)
        else:
            for node_id in sorted(expected):
                self.bus.send(node_id, request_cls(node_id=node_id, **header))
            asked.update((n, start) for n in online & expected)
        replies: dict[str, Reply] = {}
        while True:
            now = time.monotonic()
            online = self.bus.online_nodes()
            wanted = online if expected is None else online & expected
            for node_id in sorted(wanted - asked.keys() - replies.keys()):
                log.debug("%s: %s came online; sending it %s", request_id, node_id, request_cls)
                self.bus.send(node_id, request_cls(node_id=node_id, **header))
                asked[node_id] = now
            awaited = [
                n
                for n, t in asked.items()
                if n in online and n not in replies and now < t + deadline_s
            ]
            if expected is not None and expected <= replies.keys():
                return replies, online, now < window_end
            if expected is None and enough is not None and not awaited and enough(replies):
                return replies, online, now < window_end
            if (now >= window_end and not awaited) or now >= hard_end:
                return replies, online, False
            message = self.next_message(min(_POLL_S, hard_end - now))
            if message is None:
                continue
            if not isinstance(message, Reply) or message.request_id != request_id:
                log.debug(
                    "ignoring %s from %s (not for %s)", message.command, message.node_id, request_id
                )
            elif message.node_id in replies:
                log.debug("ignoring duplicate %s from %s", message.command, message.node_id)
            elif expected is not None and message.node_id not in expected:
                log.debug("ignoring %s from %s (not asked)", message.command, message.node_id)
            else:
                replies[message.node_id] = message

    def offline_nodes(self, nodes: Iterable[str]) -> list[str]:
        """Which of ``nodes`` the transport does not currently see online."""
        online = self.bus.online_nodes()
        return sorted(n for n in nodes if n not in online)


def _seconds(name: str, value: float) -> float:
    """``value`` as a finite number of seconds, at least 0 (a bounded wait), or ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number of seconds, at least 0, got {value!r}")
    return float(value)
