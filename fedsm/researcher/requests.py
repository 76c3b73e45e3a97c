"""The researcher's side of the bus: ping, list, search and the reply inbox a Job collects from.

``Requests`` subscribes once to the researcher's bus and puts every message into one inbox
queue; the Job and the helpers here take from it with a deadline (``queue.get(timeout=...)``),
so waiting never spins. Replies nobody is waiting for (late, duplicated, for another request)
are logged at DEBUG and dropped.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
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

__all__ = ["Requests", "FederatedDataSet", "FederatedDataSetError", "new_id"]

log = logging.getLogger(__name__)


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


class Requests:
    """Send requests to nodes and collect their replies, with deadlines.

    Parameters
    ----------
    bus:
        The researcher's bus (its ``participant_id`` is the researcher id).
    default_deadline_s:
        How long ping/list/search wait for nodes that are online but have not answered.
    clock:
        Wall clock for the ``deadline`` field of requests (seconds since the epoch).
    """

    def __init__(
        self,
        bus: Bus,
        *,
        default_deadline_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.researcher_id = bus.participant_id
        self.default_deadline_s = default_deadline_s
        self.clock = clock
        self._inbox: queue.Queue[Message] = queue.Queue()
        bus.subscribe(self._inbox.put)

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
        self, nodes: Iterable[str] | None = None, deadline_s: float | None = None
    ) -> dict[str, float]:
        """Round-trip time in seconds of every node that answered."""
        start = time.monotonic()
        replies = self.ask(PingRequest, nodes, deadline_s)
        elapsed = time.monotonic() - start
        return {node: elapsed for node, reply in replies.items() if isinstance(reply, PingReply)}

    def list(
        self, nodes: Iterable[str] | None = None, deadline_s: float | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """The datasets of every node that answered (paths are never sent by nodes)."""
        replies = self.ask(ListRequest, nodes, deadline_s)
        return {n: list(r.datasets) for n, r in replies.items() if isinstance(r, ListReply)}

    def search(
        self,
        tags: Iterable[str],
        nodes: Iterable[str] | None = None,
        deadline_s: float | None = None,
    ) -> FederatedDataSet:
        """Datasets carrying all ``tags``, one per node, once every online node has answered.

        Nodes with no match answer with an empty list and are left out of the result.
        """
        tags = tuple(tags)
        replies = self.ask(SearchRequest, nodes, deadline_s, tags=tags)
        found: dict[str, Any] = {}
        for node_id, reply in replies.items():
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
        return FederatedDataSet(found)

    def offline_nodes(self, nodes: Iterable[str]) -> list[str]:
        """Which of ``nodes`` the transport does not currently see online."""
        online = self.bus.online_nodes()
        return sorted(n for n in nodes if n not in online)
