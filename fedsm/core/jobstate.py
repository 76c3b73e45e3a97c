"""What is known about a Job, derived from its events: the states and :class:`JobState`.

Pure core: no I/O. :func:`fedsm.core.lifecycle.apply` is the only way a state changes; this module
only holds the state's shape, its derived views and the names of its statuses. Per-round
replies and failures live in :class:`~fedsm.core.appendmap.AppendMap` so a fold stays O(1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsm.core.appendmap import AppendMap, RoundsView, empty, keys_of
from fedsm.core.events import (
    Aggregated,
    ApprovalChecked,
    Event,
    JobCreated,
    NodeFailed,
    ReplyReceived,
    encode_event,
)

__all__ = ["ACTIVE_STATES", "STATES", "TERMINAL_STATES", "JobState", "initial_state"]

STATES = (
    "new",
    "created",
    "uploaded",
    "approval_checked",
    "round_sent",
    "collecting",
    "aggregated",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})
#: States in which a job exists and can still fail or be cancelled.
ACTIVE_STATES = tuple(s for s in STATES if s != "new" and s not in TERMINAL_STATES)


@dataclass(frozen=True)
class JobState:
    """Everything known about a job, derived from its events only.

    ``round`` is the current round (0 before the first ``RoundSent``); ``round_nodes`` and
    ``request_ids`` belong to it. ``round_replies``/``round_failures`` are the current
    round's; :attr:`replies`/:attr:`failures` give every round's (round -> node -> event).
    ``params_url``/``params_sha256`` are the current global parameters.
    """

    status: str = "new"
    job_id: str | None = None
    researcher_id: str | None = None
    config: JobCreated | None = None
    plan_url: str | None = None
    plan_sha256: str | None = None
    params_url: str | None = None
    params_sha256: str | None = None
    round: int = 0
    round_nodes: tuple[str, ...] = ()
    request_ids: Mapping[str, str] = field(default_factory=empty)
    round_replies: AppendMap[str, ReplyReceived] = field(default_factory=empty)
    round_failures: AppendMap[str, NodeFailed] = field(default_factory=empty)
    past_replies: AppendMap[int, AppendMap[str, ReplyReceived]] = field(default_factory=empty)
    past_failures: AppendMap[int, AppendMap[str, NodeFailed]] = field(default_factory=empty)
    timed_out: AppendMap[int, tuple[str, ...]] = field(default_factory=empty)
    aggregates: AppendMap[int, Aggregated] = field(default_factory=empty)
    approvals: ApprovalChecked | None = None

    @property
    def replies(self) -> Mapping[int, Mapping[str, ReplyReceived]]:
        """Round -> node -> ``ReplyReceived``, for every round sent so far."""
        return RoundsView(self.past_replies, self.round, self.round_replies)

    @property
    def failures(self) -> Mapping[int, Mapping[str, NodeFailed]]:
        """Round -> node -> ``NodeFailed``, for every round sent so far."""
        return RoundsView(self.past_failures, self.round, self.round_failures)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATES

    def unanswered_nodes(self) -> tuple[str, ...]:
        """Nodes of the current round that have neither replied nor failed."""
        replied, failed = keys_of(self.round_replies), keys_of(self.round_failures)
        return tuple(n for n in self.round_nodes if n not in replied and n not in failed)

    def pending_nodes(self) -> tuple[str, ...]:
        """Nodes still awaited in the current round: the unanswered ones, or none once the
        round has timed out (a late reply is not counted) or is no longer being collected."""
        if self.status not in ("round_sent", "collecting") or self.round in self.timed_out:
            return ()
        return self.unanswered_nodes()

    def round_complete(self) -> bool:
        """Whether the current round is over: every node replied or failed, or it timed out."""
        if self.round == 0:
            return False
        return self.round in self.timed_out or not self.unanswered_nodes()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (events as their ``type``/``v``/``data`` maps)."""

        def ev(event: Event | None) -> dict[str, Any] | None:
            return None if event is None else encode_event(event)

        def rounds(per_round: Mapping[int, Mapping[str, Event]]) -> dict[str, Any]:
            return {
                str(r): {n: encode_event(e)["data"] for n, e in nodes.items()}
                for r, nodes in per_round.items()
            }

        return {
            "status": self.status,
            "job_id": self.job_id,
            "researcher_id": self.researcher_id,
            "config": ev(self.config),
            "plan_url": self.plan_url,
            "plan_sha256": self.plan_sha256,
            "params_url": self.params_url,
            "params_sha256": self.params_sha256,
            "round": self.round,
            "round_nodes": list(self.round_nodes),
            "request_ids": dict(self.request_ids),
            "pending_nodes": list(self.pending_nodes()),
            "replies": rounds(self.replies),
            "failures": rounds(self.failures),
            "timed_out": {str(r): list(m) for r, m in self.timed_out.items()},
            "aggregates": {str(r): encode_event(a)["data"] for r, a in self.aggregates.items()},
            "approvals": ev(self.approvals),
        }


def initial_state() -> JobState:
    """The state before any event: status ``new``."""
    return JobState()
