"""What is known about a Job, derived from its events: the states and :class:`JobState`.

Pure core: no I/O. :func:`fedsm.core.lifecycle.apply` is the only way a state changes; this module
only holds the state's shape, its derived views and the names of its statuses. Per-round
replies and failures live in :class:`~fedsm.core.appendmap.AppendMap` so a fold stays O(1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
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

__all__ = ["ACTIVE_STATES", "STATES", "TERMINAL_STATES", "JobState", "JobStatus", "initial_state"]


class JobStatus(str, Enum):
    """The states of a job's lifecycle. A ``str`` enum: ``status == "collecting"`` holds, and
    it prints as its value. Ask the predicates (``status.terminal``, ``status.in_round``...)
    rather than comparing with tuples of names."""

    NEW = "new"
    CREATED = "created"
    UPLOADED = "uploaded"
    APPROVAL_CHECKED = "approval_checked"
    ROUND_SENT = "round_sent"
    COLLECTING = "collecting"
    AGGREGATED = "aggregated"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def terminal(self) -> bool:
        """The job is over: completed, failed or cancelled."""
        return self in _TERMINAL

    @property
    def stopped(self) -> bool:
        """The job failed or was cancelled."""
        return self is JobStatus.FAILED or self is JobStatus.CANCELLED

    @property
    def active(self) -> bool:
        """The job exists and can still fail or be cancelled."""
        return self is not JobStatus.NEW and self not in _TERMINAL

    @property
    def in_round(self) -> bool:
        """A round was sent and has not been aggregated yet (replies are being collected)."""
        return self is JobStatus.ROUND_SENT or self is JobStatus.COLLECTING

    @property
    def opening(self) -> bool:
        """The job's opening events are not all recorded yet (new or created)."""
        return self is JobStatus.NEW or self is JobStatus.CREATED

    @property
    def between_rounds(self) -> bool:
        """A next round may be decided: approval checked, or the last round aggregated."""
        return self is JobStatus.APPROVAL_CHECKED or self is JobStatus.AGGREGATED


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

#: Every status, in lifecycle order (the ``transitions`` machine's states).
STATES: tuple[JobStatus, ...] = tuple(JobStatus)
TERMINAL_STATES: frozenset[JobStatus] = _TERMINAL
#: States in which a job exists and can still fail or be cancelled.
ACTIVE_STATES: tuple[JobStatus, ...] = tuple(s for s in STATES if s.active)


@dataclass(frozen=True)
class JobState:
    """Everything known about a job, derived from its events only.

    ``round`` is the current round (0 before the first ``RoundSent``); ``round_nodes`` and
    ``request_ids`` belong to it. ``round_replies``/``round_failures`` are the current
    round's; :attr:`replies`/:attr:`failures` give every round's (round -> node -> event).
    ``params_sha256`` names the current global parameters. ``round_deadline`` is when the
    current round stops waiting (job clock), ``round_aggregator_args`` what each of its
    nodes was sent (recorded in ``RoundSent``), ``round_do_training`` False for a
    validation-only round. ``approvals`` is the last approval check. ``overrides`` are the
    settings changed since ``JobCreated`` (``SettingsChanged``): read the effective ones
    through :attr:`nodes`, :attr:`training_args` and :attr:`round_limit`.
    """

    status: JobStatus = JobStatus.NEW
    job_id: str | None = None
    researcher_id: str | None = None
    config: JobCreated | None = None
    plan_sha256: str | None = None
    params_sha256: str | None = None
    round: int = 0
    round_nodes: tuple[str, ...] = ()
    request_ids: Mapping[str, str] = field(default_factory=empty)
    round_deadline: float = 0.0
    round_aggregator_args: Mapping[str, Any] = field(default_factory=empty)
    round_do_training: bool = True
    validation_rounds: tuple[int, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=empty)
    round_replies: AppendMap[str, ReplyReceived] = field(default_factory=empty)
    round_failures: AppendMap[str, NodeFailed] = field(default_factory=empty)
    #: Pending nodes of the current round that answered a transient error, and when
    #: (job clock) they are to be asked again (cleared by the ``RoundResent`` that asks).
    round_retries: Mapping[str, float] = field(default_factory=dict)
    #: How many times each node's request of the current round went again (``RoundResent``).
    round_resends: Mapping[str, int] = field(default_factory=dict)
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
        """The job is over (completed, failed or cancelled)."""
        return self.status.terminal

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes the next round goes to (``JobCreated``'s, or as last changed)."""
        assert self.config is not None
        return tuple(self.overrides.get("nodes", self.config.nodes))

    @property
    def training_args(self) -> Mapping[str, Any]:
        """The training arguments of the next round."""
        assert self.config is not None
        return self.overrides.get("training_args", self.config.training_args)

    @property
    def round_limit(self) -> int:
        """The last round that may train."""
        assert self.config is not None
        return int(self.overrides.get("round_limit", self.config.round_limit))

    @property
    def final_validation_due(self) -> bool:
        """The last round trained and ``test_on_global_updates`` asks the nodes to validate
        the final parameters: a validation-only round comes before the job completes."""
        return (
            self.status is JobStatus.AGGREGATED
            and self.round >= self.round_limit
            and self.round_do_training
            and bool(self.training_args.get("test_on_global_updates"))
        )

    @property
    def strategy_nodes(self) -> tuple[str, ...]:
        """Every node the job has had (the opening's and the current ones), sorted: the N a
        strategy averages its per-node memory over (Scaffold)."""
        assert self.config is not None
        return tuple(sorted(set(self.config.nodes) | set(self.nodes)))

    @property
    def strategy_state_sha256(self) -> str | None:
        """The strategy's state after the latest aggregation (None: none yet, or stateless)."""
        for r in range(self.round, 0, -1):  # a validation round aggregates nothing: look back
            if r in self.aggregates:
                return self.aggregates[r].state_sha256
        return None

    def approval_refusals(self) -> dict[str, str]:
        """Nodes of the job that may not run its plan by the last approval check, with their
        status (every node when no check is recorded). Empty: rounds may be sent."""
        assert self.config is not None
        check = self.approvals
        if check is None or check.plan_sha256 != self.plan_sha256:
            return {node: "unchecked" for node in self.nodes}
        statuses, required = check.statuses, check.approval_required
        return {
            node: statuses.get(node, "unchecked")
            for node in self.nodes
            if statuses.get(node) != "approved" and required.get(node, True)
        }

    def unanswered_nodes(self) -> tuple[str, ...]:
        """Nodes of the current round that have neither replied nor failed."""
        replied, failed = keys_of(self.round_replies), keys_of(self.round_failures)
        return tuple(n for n in self.round_nodes if n not in replied and n not in failed)

    def pending_nodes(self) -> tuple[str, ...]:
        """Nodes still awaited in the current round: the unanswered ones, or none once the
        round has timed out (a late reply is not counted) or is no longer being collected."""
        if not self.status.in_round or self.round in self.timed_out:
            return ()
        return self.unanswered_nodes()

    def is_pending(self, node: str) -> bool:
        """Whether ``node`` is still awaited in the current round (O(1): checked for every
        message a round takes, so a round of K nodes costs O(K), not O(K^2))."""
        if not self.status.in_round or node not in self.request_ids:
            return False
        return (
            node not in self.round_replies
            and node not in self.round_failures
            and self.round not in self.timed_out
        )

    def has_pending(self) -> bool:
        """Whether any node is still awaited in the current round (O(1))."""
        if not self.status.in_round or self.round in self.timed_out:
            return False
        return len(self.round_replies) + len(self.round_failures) < len(self.round_nodes)

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
            "status": self.status.value,
            "job_id": self.job_id,
            "researcher_id": self.researcher_id,
            "config": ev(self.config),
            "plan_sha256": self.plan_sha256,
            "params_sha256": self.params_sha256,
            "round": self.round,
            "round_nodes": list(self.round_nodes),
            "request_ids": dict(self.request_ids),
            "round_deadline": self.round_deadline,
            "round_aggregator_args": dict(self.round_aggregator_args),
            "round_do_training": self.round_do_training,
            "validation_rounds": list(self.validation_rounds),
            "settings_changed": dict(self.overrides),
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
