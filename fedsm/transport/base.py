"""The Bus interface shared by researcher and nodes, whatever carries the messages.

Semantics every implementation gives (and the Job and Node rely on):

* at-least-once delivery: a handler may see a message twice, and must be idempotent by
  ``request_id``;
* no ordering guarantee between different senders;
* handlers run on the transport's delivery thread and must return quickly (hand work to a
  queue or an executor; never train inside a handler);
* messages are :mod:`fedsm.core.protocol` objects; bytes that do not decode are logged and dropped,
  never delivered and never fatal;
* a reply is delivered only to the researcher named in it, and a transport checks that the
  sender of a reply is the node the reply says it comes from where it can.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from fedsm.core.messages import Message, Reply, Request
from fedsm.errors import FedsmError

__all__ = ["Bus", "Handler", "TransportError", "BusClosed"]

#: Called with each message delivered to this participant.
Handler = Callable[[Message], None]


class TransportError(FedsmError):
    """The transport could not do what was asked (connection, broker, size...)."""


class BusClosed(TransportError):
    """The bus was used after :meth:`Bus.close`."""


class Bus(abc.ABC):
    """One participant's connection: a researcher (sends requests) or a node (sends replies).

    ``participant_id`` is the researcher id or the node id. A node receives requests
    addressed to it and broadcasts; a researcher receives replies addressed to it.
    """

    participant_id: str
    role: str  # "researcher" or "node"

    @abc.abstractmethod
    def send(self, node_id: str, request: Request) -> None:
        """Researcher: deliver ``request`` to one node (queued by the transport if offline)."""

    @abc.abstractmethod
    def broadcast(self, request: Request) -> None:
        """Researcher: deliver ``request`` to every node."""

    @abc.abstractmethod
    def reply(self, reply: Reply) -> None:
        """Node: deliver ``reply`` to the researcher named in ``reply.researcher_id``."""

    @abc.abstractmethod
    def subscribe(self, handler: Handler) -> None:
        """Call ``handler`` for every message delivered to this participant."""

    @abc.abstractmethod
    def online_nodes(self) -> frozenset[str]:
        """Researcher: the nodes currently known to be online."""

    @abc.abstractmethod
    def close(self) -> None:
        """Leave cleanly (a node announces itself offline). Idempotent."""

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
