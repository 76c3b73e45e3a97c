"""The researcher's round policy: from the recorded state and the clock, what to record and
what to do next.

Pure core: no I/O, no clock of its own (``now`` is passed in), no random numbers. The
researcher's shell (:mod:`fedsm.researcher`) asks :func:`decide` and then, in this order,
records the decision's events and carries out its commands. That order is the rule this
module exists for (decide, record, then act): an effect another party can see (a request
published, a file uploaded) always follows the event that decided it, so a process killed
anywhere leaves a log from which the same decisions are taken again.

Rules of this module:

1. :func:`decide` and :func:`round_sent` are functions of their arguments only. The one
   thing they need that the log does not hold is :class:`Progress`: what *this process* has
   already done (published the current round's requests, asked the nodes about approval,
   waited out the round's window). A restored process starts with an empty
   :class:`Progress`, and that is how a round interrupted by a crash is re-sent.
2. A command never carries a decision the events do not record: ``Publish`` sends exactly the
   requests ``RoundSent`` describes (ids, parameters, per-node aggregator args, deadline), so
   a re-sent request is the very request a node may already have answered.
3. Every event a decision returns is allowed by :func:`fedsm.core.lifecycle.apply` in the
   state it was decided from (the property tests hold this).

States and decisions::

    uploaded                                  -> ApprovalAsked; CheckApproval
    approval_checked, plan not approved       -> ApprovalAsked; CheckApproval once per drive,
                                                 then Stop
    approval_checked, approved                -> StartRound(1)
    round n in flight, not published here     -> RoundResent(pending, deadline); Publish; Collect
    round n in flight, deadline not reached   -> Collect(until deadline)
    round n in flight, deadline reached       -> RoundTimedOut(unanswered)
    round n over, replies >= min_nodes        -> Aggregate(n)
    round n over, replies <  min_nodes        -> JobFailed
    aggregated n < round_limit                -> StartRound(n + 1)
    aggregated n == round_limit, validating   -> StartRound(n + 1, do_training=False)
    aggregated n == round_limit               -> JobCompleted
    validation round over                     -> JobCompleted (no aggregate, no quorum)
    completed, failed, cancelled              -> AnnounceEnd (once per process), Stop
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsm.core.collect import train_request_id
from fedsm.core.events import (
    ApprovalAsked,
    Event,
    JobCompleted,
    JobFailed,
    RoundResent,
    RoundSent,
    RoundTimedOut,
)
from fedsm.core.jobstate import JobState, JobStatus

__all__ = [
    "Aggregate",
    "AnnounceEnd",
    "CheckApproval",
    "Collect",
    "Command",
    "Decision",
    "Progress",
    "Publish",
    "StartRound",
    "Stop",
    "decide",
    "quorum_failure",
    "round_sent",
]


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class CheckApproval:
    """Ask every node of the job whether it approved the plan's sha256; record the answers
    (``ApprovalChecked``)."""


@dataclass(frozen=True)
class StartRound:
    """Prepare round ``round`` (the strategy's per-node args, kept as local files by digest)
    and record it with :func:`round_sent`; the commands that follow publish it.
    ``do_training`` False: the final validation-only round."""

    round: int
    do_training: bool = True


@dataclass(frozen=True)
class Publish:
    """Upload what the requests name (if not yet there), then send the train requests
    ``RoundSent`` recorded for ``round`` to ``nodes``."""

    round: int
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Collect:
    """Take node messages until every node of ``round`` answered or the clock reaches
    ``until``; each one is classified (:func:`fedsm.core.collect.classify`) and recorded."""

    round: int
    until: float
    #: ``until`` is the round's deadline: a wait that reaches it closes the round. False
    #: for a wait cut short to ask a node again (a transient error's retry time).
    closes: bool = True


@dataclass(frozen=True)
class Aggregate:
    """Aggregate round ``round``'s replies in sorted node order; record ``Aggregated``, then
    upload the result."""

    round: int


@dataclass(frozen=True)
class AnnounceEnd:
    """Send the job's final log head to every node (``job-end``), which they keep as a
    witness. Idempotent: a restored process announces again."""

    status: str


@dataclass(frozen=True)
class Stop:
    """Nothing to do: the job is over (``finished``) or waits for someone (the reason says
    who: operators to approve the plan, or the opening to be completed)."""

    reason: str
    finished: bool = False
    needs_approval: bool = False


Command = CheckApproval | StartRound | Publish | Collect | Aggregate | AnnounceEnd | Stop


@dataclass(frozen=True)
class Decision:
    """Events to record (in order, before anything else) and commands to carry out after."""

    events: tuple[Event, ...] = ()
    commands: tuple[Command, ...] = ()


@dataclass(frozen=True)
class Progress:
    """What this process has done that the log does not say.

    ``published_round``: the round whose requests this process has sent (0: none);
    ``approval_asked``: this drive asked the nodes about approval (a new drive, such as a new
    call of ``Experiment.run``, asks again when the last answer was not all-approved);
    ``waited_round``: the round whose whole reply window this process waited out (so a clock
    that does not reach the recorded deadline can not keep a round open for ever);
    ``end_announced``: this process sent the nodes the final head of a finished job;
    ``came_online``: nodes the bus saw come (back) online since this process last sent them
    their request (a node restarted mid-round lost it: it is sent again, same id).
    """

    published_round: int = 0
    approval_asked: bool = False
    waited_round: int = 0
    end_announced: bool = False
    came_online: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- decisions


def decide(state: JobState, now: float, progress: Progress = Progress()) -> Decision:
    """The next step of the job in ``state`` at time ``now`` (the job's clock)."""
    status = state.status
    if status.terminal:
        stop = Stop(f"the job is {status.value}", finished=True)
        if not progress.end_announced and state.config is not None:
            return Decision(commands=(AnnounceEnd(status.value), stop))
        return Decision(commands=(stop,))
    if status.opening:
        return _stop("the job's opening events are not all recorded (restore completes them)")
    config = state.config
    assert config is not None
    if status is JobStatus.UPLOADED:
        return _ask_approval(state)
    if status.between_rounds:
        validating = state.final_validation_due
        if not validating and status is JobStatus.AGGREGATED and state.round >= state.round_limit:
            final = JobCompleted(round=state.round, params_sha256=state.params_sha256 or "")
            return Decision(events=(final,))
        # Any round, the final validation too, goes only to nodes the last check cleared.
        refused = state.approval_refusals()
        if refused:
            if not progress.approval_asked:
                return _ask_approval(state)
            return Decision(
                commands=(
                    Stop(
                        f"training plan {state.plan_sha256} is not approved on {refused}; on "
                        f"each node run: fedsm node plan approve --dir NODE_DIR --sha256 "
                        f"{state.plan_sha256}",
                        needs_approval=True,
                    ),
                )
            )
        if validating:
            return Decision(commands=(StartRound(state.round + 1, do_training=False),))
        return Decision(commands=(StartRound(state.round + 1),))
    # A round is in flight.
    if state.round_complete():
        if not state.round_do_training:  # the final validation: its metrics are recorded
            final = JobCompleted(round=state.round, params_sha256=state.params_sha256 or "")
            return Decision(events=(final,))
        failure = quorum_failure(state)
        if failure is not None:
            return Decision(events=(failure,))
        return Decision(commands=(Aggregate(state.round),))
    pending = state.pending_nodes()
    if progress.published_round != state.round:
        # Restored mid-round: the pending nodes get the recorded requests again, same ids,
        # and a fresh window (a node that already answered replies from its cache).
        deadline = now + config.reply_deadline_s
        resent = RoundResent(round=state.round, nodes=pending, deadline=deadline)
        return Decision(
            events=(resent,),
            commands=(Publish(state.round, pending), Collect(state.round, deadline)),
        )
    if now >= state.round_deadline or progress.waited_round == state.round:
        return Decision(
            events=(RoundTimedOut(round=state.round, missing=state.unanswered_nodes()),)
        )
    # Asked again, same request: a node back online (it may have lost the request with its
    # process) and a node whose transient error's retry time has come.
    retries, resends = state.round_retries, state.round_resends
    again = tuple(
        n
        for n in pending
        if retries.get(n, math.inf) <= now
        # a node back online: at most MAX_ONLINE_RESENDS times a round (a flapping or
        # spoofed status can not make the job re-send, and record it, without end)
        or (n in progress.came_online and resends.get(n, 0) < MAX_ONLINE_RESENDS)
    )
    if again:
        resent = RoundResent(round=state.round, nodes=again, deadline=state.round_deadline)
        return Decision(
            events=(resent,), commands=(Publish(state.round, again), _collect(state, pending))
        )
    return Decision(commands=(_collect(state, pending),))


#: How many times in a round a pending node's request goes again because it came back online.
MAX_ONLINE_RESENDS = 3


def _collect(state: JobState, pending: tuple[str, ...]) -> Collect:
    """Collect until the round's deadline, or until the next retry of a pending node."""
    retries = state.round_retries
    next_retry = min((retries[n] for n in pending if n in retries), default=math.inf)
    if next_retry < state.round_deadline:
        return Collect(state.round, next_retry, closes=False)
    return Collect(state.round, state.round_deadline)


def round_sent(
    state: JobState,
    round_number: int,
    now: float,
    aggregator_args: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    do_training: bool = True,
    id_key: bytes = b"",
) -> Decision:
    """Record round ``round_number`` (``RoundSent``), then publish it to every node of the job
    and collect until its deadline.

    ``aggregator_args``: per node, what the strategy sends with the request, files as
    ``{"sha256": digest}``. Request ids are a keyed hash of (job, round, node) under
    ``id_key`` (the job's secret), so the same round decided again after a crash has the
    same ids and nobody else can predict them. The caller checks the event against
    the lifecycle before doing anything (it raises ``IllegalTransition`` for a round that
    may not start, and nothing has happened then).
    """
    config = state.config
    assert config is not None and state.job_id is not None
    nodes = tuple(sorted(state.nodes))
    args = {n: dict(a) for n, a in sorted((aggregator_args or {}).items()) if a}
    deadline = now + config.reply_deadline_s
    event = RoundSent(
        round=round_number,
        nodes=nodes,
        request_ids={n: train_request_id(state.job_id, round_number, n, id_key) for n in nodes},
        params_sha256=state.params_sha256 or "",
        deadline=deadline,
        aggregator_args=args,
        do_training=do_training,
    )
    return Decision(
        events=(event,),
        commands=(Publish(round_number, nodes), Collect(round_number, deadline)),
    )


def quorum_failure(state: JobState) -> JobFailed | None:
    """``JobFailed`` if the current round is over with fewer replies than ``min_nodes``."""
    config = state.config
    assert config is not None
    replies = state.round_replies
    if len(replies) >= config.min_nodes:
        return None
    failed = sorted(state.round_failures)
    missing = sorted(state.timed_out.get(state.round, ()))
    return JobFailed(
        round=state.round,
        reason=f"round {state.round}: only {len(replies)} of {len(state.round_nodes)} nodes "
        f"replied, min_nodes is {config.min_nodes} (failed: {failed}, no reply: {missing}); "
        "check those nodes (fedsm node start ...) or lower min_nodes",
    )


def _ask_approval(state: JobState) -> Decision:
    """Record that the nodes are asked (``ApprovalAsked``), then ask them."""
    asked = ApprovalAsked(plan_sha256=state.plan_sha256 or "", nodes=tuple(sorted(state.nodes)))
    return Decision(events=(asked,), commands=(CheckApproval(),))


def _stop(reason: str, *, finished: bool = False) -> Decision:
    return Decision(commands=(Stop(reason, finished=finished),))
