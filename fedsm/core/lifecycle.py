"""The Job lifecycle: states, the transition table, and ``apply(state, event) -> state``.

Pure core: no files, sockets, clocks or random numbers.

Rules of this module (after h11's ``_state.py``):

1. :data:`TRANSITIONS` is the single source of truth for which event may happen in which
   state. The ``transitions`` :class:`~transitions.Machine` (:func:`build_machine`, for docs,
   diagrams and tests) and the lookup table :func:`apply` uses are both built from it.
2. :func:`apply` is the only way a :class:`JobState` changes, and it is pure: a refused
   event raises :class:`IllegalTransition` naming the state and the event, and the state
   passed in is untouched. Live runs and replay use the same function, so there is no second
   implementation to drift.
3. Guards read only the state and the event, never the outside world, so replay can (and
   does) run them: a log whose events break the rules does not replay.

Replay cost: firing a ``transitions`` trigger per event costs several microseconds of
callback machinery; :func:`apply` does one dict lookup for the destination and one guard
function instead. Per-round replies live in :class:`AppendMap`, which shares its storage
with the state it was extended from, so a reply folds in O(1) instead of copying the
round's mapping (a 1,000-node round would otherwise cost O(n^2)).

States::

    new -JobCreated-> created -TrainingPlanUploaded-> uploaded (-ParamsUploaded(0)-> uploaded)
    uploaded -ApprovalChecked-> approval_checked -RoundSent(n)-> round_sent
    round_sent -ReplyReceived|NodeFailed|RoundTimedOut-> collecting -Aggregated-> aggregated
    aggregated -RoundSent(n+1)-> round_sent ... aggregated -JobCompleted-> completed
    any state after created -JobFailed-> failed, -JobCancelled-> cancelled
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from transitions import Machine

from fedsm.core.appendmap import EMPTY, AppendMap, keys_of
from fedsm.core.events import (
    EVENT_TYPES,
    Aggregated,
    ApprovalAsked,
    ApprovalChecked,
    Event,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobFailed,
    NodeFailed,
    NodeRetrying,
    ParamsUploaded,
    ReplyReceived,
    RoundResent,
    RoundSent,
    RoundTimedOut,
    SettingsChanged,
    TrainingPlanUploaded,
)
from fedsm.core.jobstate import ACTIVE_STATES, STATES, JobState, JobStatus, initial_state
from fedsm.errors import FedsmError

__all__ = [
    "TRANSITIONS",
    "IllegalTransition",
    "allowed_events",
    "apply",
    "build_machine",
    "replay",
]

_S = JobStatus
#: (event type, source states, destination). The single source of truth.
TRANSITIONS: tuple[tuple[str, tuple[JobStatus, ...], JobStatus], ...] = (
    ("JobCreated", (_S.NEW,), _S.CREATED),
    ("TrainingPlanUploaded", (_S.CREATED,), _S.UPLOADED),
    ("ParamsUploaded", (_S.UPLOADED,), _S.UPLOADED),
    # Initial parameters may be replaced until the first round (the plan is unchanged).
    ("ParamsUploaded", (_S.APPROVAL_CHECKED,), _S.APPROVAL_CHECKED),
    # Asking is decided and recorded first; the answers follow (ApprovalChecked).
    ("ApprovalAsked", (_S.UPLOADED,), _S.UPLOADED),
    ("ApprovalAsked", (_S.APPROVAL_CHECKED,), _S.APPROVAL_CHECKED),
    ("ApprovalAsked", (_S.AGGREGATED,), _S.AGGREGATED),
    ("ApprovalChecked", (_S.UPLOADED, _S.APPROVAL_CHECKED), _S.APPROVAL_CHECKED),
    # Nodes added between rounds are asked (the round after needs their approval).
    ("ApprovalChecked", (_S.AGGREGATED,), _S.AGGREGATED),
    # Parameters replaced between rounds (the seed's update_parameters).
    ("ParamsUploaded", (_S.AGGREGATED,), _S.AGGREGATED),
    # Settings changed between rounds; a higher round_limit reopens a completed job.
    ("SettingsChanged", (_S.UPLOADED,), _S.UPLOADED),
    ("SettingsChanged", (_S.APPROVAL_CHECKED,), _S.APPROVAL_CHECKED),
    ("SettingsChanged", (_S.AGGREGATED, _S.COMPLETED), _S.AGGREGATED),
    ("RoundSent", (_S.APPROVAL_CHECKED, _S.AGGREGATED), _S.ROUND_SENT),
    ("RoundResent", (_S.ROUND_SENT,), _S.ROUND_SENT),
    ("RoundResent", (_S.COLLECTING,), _S.COLLECTING),
    ("ReplyReceived", (_S.ROUND_SENT, _S.COLLECTING), _S.COLLECTING),
    ("NodeFailed", (_S.ROUND_SENT, _S.COLLECTING), _S.COLLECTING),
    # A transient error: the node stays pending and is asked again (RoundResent).
    ("NodeRetrying", (_S.ROUND_SENT, _S.COLLECTING), _S.COLLECTING),
    ("RoundTimedOut", (_S.ROUND_SENT, _S.COLLECTING), _S.COLLECTING),
    ("Aggregated", (_S.COLLECTING,), _S.AGGREGATED),
    ("JobCompleted", (_S.AGGREGATED,), _S.COMPLETED),
    # After a validation-only round: nothing to aggregate, the parameters stand.
    ("JobCompleted", (_S.COLLECTING,), _S.COMPLETED),
    ("JobFailed", ACTIVE_STATES, _S.FAILED),
    ("JobCancelled", ACTIVE_STATES, _S.CANCELLED),
)


class IllegalTransition(FedsmError):
    """An event that the lifecycle does not allow in the current state (nothing changed)."""

    def __init__(self, state: str, event: str, reason: str) -> None:
        super().__init__(f"{event} is not allowed in state {str(state)!r}: {reason}")
        self.state, self.event, self.reason = state, event, reason


# --------------------------------------------------------------------------- the machine


def build_machine(model: Any = None) -> Machine:
    """A ``transitions`` Machine of :data:`TRANSITIONS` (triggers are event type names).

    For documentation, diagrams and tests: it knows which event is allowed where, not the
    guards on the events' contents, which :func:`apply` checks.
    """
    machine = Machine(
        model=Machine.self_literal if model is None else model,
        states=[s.value for s in STATES],
        initial=JobStatus.NEW.value,
        auto_transitions=False,  # no to_<state>() back doors around the table
    )
    for trigger, sources, dest in TRANSITIONS:
        machine.add_transition(trigger, [s.value for s in sources], dest.value)
    return machine


def _derive_table() -> dict[tuple[JobStatus, str], JobStatus]:
    machine = build_machine()
    table: dict[tuple[JobStatus, str], JobStatus] = {}
    for trigger, event in machine.events.items():
        for source, transitions in event.transitions.items():
            for transition in transitions:
                table[(JobStatus(source), trigger)] = JobStatus(transition.dest)
    return table


#: (state, event type name) -> next state, derived from the Machine built from TRANSITIONS.
_NEXT = _derive_table()


def allowed_events(status: str) -> tuple[str, ...]:
    """Event type names the table allows in ``status`` (guards may still refuse one)."""
    return tuple(sorted(trigger for (source, trigger) in _NEXT if source == status))


# --------------------------------------------------------------------------- guards + updates
# One function per event type: check the event against the state (raise _Refused) and
# set the fields that change in ``values``, a copy of the state's fields that becomes the
# next state (a refused event's copy is dropped). ``status`` is set by apply() from the table.


class _Refused(Exception):
    pass


def _check(condition: bool, reason: str) -> None:
    if not condition:
        raise _Refused(reason)


def _on_job_created(s: JobState, e: JobCreated, values: dict[str, Any]) -> None:
    _check(bool(e.nodes), "a job needs at least one node")
    _check(len(set(e.nodes)) == len(e.nodes), f"nodes are not unique: {list(e.nodes)}")
    _check(1 <= e.min_nodes <= len(e.nodes), f"min_nodes {e.min_nodes} not in 1..{len(e.nodes)}")
    _check(e.round_limit >= 1, "round_limit must be >= 1")
    missing = [n for n in e.nodes if n not in e.datasets]
    _check(not missing, f"no dataset given for nodes {missing}")
    values["job_id"], values["researcher_id"], values["config"] = e.job_id, e.researcher_id, e


def _on_plan_uploaded(s: JobState, e: TrainingPlanUploaded, values: dict[str, Any]) -> None:
    values["plan_sha256"] = e.sha256


def _on_params_uploaded(s: JobState, e: ParamsUploaded, values: dict[str, Any]) -> None:
    _check(e.round == s.round, f"parameters replaced after round {s.round}, not {e.round}")
    values["params_sha256"] = e.sha256


def _on_settings_changed(s: JobState, e: SettingsChanged, values: dict[str, Any]) -> None:
    assert s.config is not None
    _check(e.round == s.round, f"settings changed after round {s.round}, not {e.round}")
    unknown = sorted(set(e.changes) - {"nodes", "training_args", "round_limit"})
    _check(not unknown, f"settings {unknown} can not be changed")
    _check(bool(e.changes), "no setting changed")
    if "nodes" in e.changes:
        nodes = e.changes["nodes"]
        _check(
            type(nodes) is list and bool(nodes) and all(type(n) is str for n in nodes),
            "nodes must be a non-empty list of node ids",
        )
        _check(len(set(nodes)) == len(nodes), f"nodes are not unique: {nodes}")
        strangers = sorted(set(nodes).difference(s.config.datasets))
        _check(not strangers, f"nodes {strangers} have no dataset in this job")
        _check(
            s.config.min_nodes <= len(nodes),
            f"{len(nodes)} nodes, fewer than min_nodes {s.config.min_nodes}",
        )
    if "training_args" in e.changes:
        _check(type(e.changes["training_args"]) is dict, "training_args must be a map")
    if "round_limit" in e.changes:
        limit = e.changes["round_limit"]
        _check(type(limit) is int and limit >= max(1, s.round), f"round_limit {limit!r} is behind")
    if s.status is JobStatus.COMPLETED:
        _check(
            e.changes.get("round_limit", 0) > s.round,
            "a completed job reopens only with a round_limit past its last round",
        )
    values["overrides"] = {**s.overrides, **e.changes}


def _on_approval_asked(s: JobState, e: ApprovalAsked, values: dict[str, Any]) -> None:
    _check(s.params_sha256 is not None, "initial parameters are not uploaded yet")
    _check(
        e.plan_sha256 == s.plan_sha256, f"asked about plan {e.plan_sha256[:12]}..., another plan"
    )
    strangers = sorted(set(e.nodes).difference(s.nodes))
    _check(not strangers, f"nodes {strangers} are not nodes of this job")


def _on_approval_checked(s: JobState, e: ApprovalChecked, values: dict[str, Any]) -> None:
    _check(s.params_sha256 is not None, "initial parameters are not uploaded yet")
    _check(
        e.plan_sha256 == s.plan_sha256,
        f"checked plan {e.plan_sha256[:12]}..., but the job's plan is {s.plan_sha256}",
    )
    values["approvals"] = e


def _effective(s: JobState, name: str, default: Any) -> Any:
    """``s.overrides.get(name, default)`` without ``Mapping.get``'s KeyError when nothing
    was overridden (an empty :class:`AppendMap`, the state of nearly every fold)."""
    overrides = s.overrides
    return overrides.get(name, default) if overrides else default


def _on_round_sent(s: JobState, e: RoundSent, values: dict[str, Any]) -> None:
    # Messages are built only when a check fails: replay runs these checks for every round.
    # ``s.round_limit``, ``s.nodes`` and ``s.approval_refusals()`` are computed inline
    # (same values) for the same reason.
    config = s.config
    assert config is not None
    if e.round != s.round + 1:
        raise _Refused(f"round {e.round} is not the next round ({s.round + 1})")
    nodes = e.nodes
    if e.do_training:
        if e.round > int(_effective(s, "round_limit", config.round_limit)):
            raise _Refused(f"round {e.round} is over the round_limit")
    else:  # the final validation: after the last round trained, before completion
        _check(
            s.status is JobStatus.AGGREGATED and s.round >= s.round_limit and s.round_do_training,
            "a validation-only round validates the final parameters: send it after the last "
            f"round ({s.round_limit}) is aggregated",
        )
        _check(not e.aggregator_args, "a validation-only round carries no aggregator args")
    _check(bool(nodes), "a round needs at least one node")
    node_set = set(nodes)
    _check(len(node_set) == len(nodes), "the round's nodes are not unique")
    job_nodes = tuple(_effective(s, "nodes", config.nodes))
    if not node_set.issubset(job_nodes):
        strangers = sorted(node_set.difference(job_nodes))
        raise _Refused(f"nodes {strangers} are not nodes of this job")
    _check(set(e.request_ids) == node_set, "request_ids must name exactly the round's nodes")
    if e.params_sha256 != s.params_sha256:
        raise _Refused(
            f"sent params {e.params_sha256[:12]}..., but the current params are {s.params_sha256}"
        )
    if not node_set.issuperset(e.aggregator_args):
        strangers = sorted(set(e.aggregator_args).difference(nodes))
        raise _Refused(f"aggregator args for nodes {strangers} that are not in the round")
    # Approval is a fact per round: a round goes only to nodes the last check cleared.
    if not _approved(s, nodes):
        refused = {n: v for n, v in s.approval_refusals().items() if n in nodes}
        _check(not refused, f"the training plan is not approved on {refused}")
    values["round"], values["round_nodes"], values["request_ids"] = e.round, nodes, e.request_ids
    values["round_deadline"], values["round_aggregator_args"] = e.deadline, e.aggregator_args
    values["round_do_training"] = e.do_training
    if not e.do_training:
        values["validation_rounds"] = (*s.validation_rounds, e.round)
    values["round_replies"] = values["round_failures"] = EMPTY
    if s.round_retries:
        values["round_retries"] = {}
    if s.round_resends:
        values["round_resends"] = {}
    if s.round > 0:  # archive the finished round's replies and failures
        values["past_replies"] = s.past_replies.plus(s.round, s.round_replies)
        values["past_failures"] = s.past_failures.plus(s.round, s.round_failures)


def _approved(s: JobState, nodes: tuple[str, ...]) -> bool:
    """Whether the last approval check cleared every one of ``nodes`` (nodes of the job):
    True exactly when ``s.approval_refusals()`` names none of them, without building it."""
    check = s.approvals
    if check is None or check.plan_sha256 != s.plan_sha256:
        return False
    statuses, required = check.statuses, check.approval_required
    for node in nodes:
        if statuses.get(node) != "approved" and required.get(node, True):
            return False
    return True


def _check_current(s: JobState, round_: int) -> None:
    if round_ != s.round:
        raise _Refused(f"round {round_} is not the current round {s.round}")


def _on_round_resent(s: JobState, e: RoundResent, values: dict[str, Any]) -> None:
    _check_current(s, e.round)
    _check(bool(e.nodes), "nothing re-sent")
    strangers = sorted(set(e.nodes).difference(s.round_nodes))
    _check(not strangers, f"nodes {strangers} are not in round {s.round}")
    if e.deadline > 0.0:  # 0.0: a version-1 record, which kept the round's deadline
        values["round_deadline"] = e.deadline
    if s.round_retries:  # the nodes asked again are no longer waiting for a retry
        values["round_retries"] = {n: t for n, t in s.round_retries.items() if n not in e.nodes}
    counts = dict(s.round_resends)
    for node in e.nodes:
        counts[node] = counts.get(node, 0) + 1
    values["round_resends"] = counts


def _answered(amap: AppendMap[Any, Any], key: Any) -> bool:
    # AppendMap.__contains__ inlined: replay calls this for every reply.
    entry = amap._store.get(key)
    return entry is not None and entry[0] < amap._n


def _check_answer(s: JobState, round_: int, node: str, request_id: str) -> None:
    # AppendMap.__contains__ inlined (see _answered): replay calls this for every reply.
    if round_ != s.round:
        raise _Refused(f"round {round_} is not the current round {s.round}")
    expected = s.request_ids.get(node)
    if expected is None:
        raise _Refused(f"node {node!r} is not in round {s.round}")
    replies, failures, timed_out = s.round_replies, s.round_failures, s.timed_out
    entry = replies._store.get(node)
    if entry is not None and entry[0] < replies._n:
        raise _Refused(f"node {node!r} already replied in round {s.round}")
    entry = failures._store.get(node)
    if entry is not None and entry[0] < failures._n:
        raise _Refused(f"node {node!r} already failed in round {s.round}")
    entry = timed_out._store.get(round_)
    if entry is not None and entry[0] < timed_out._n:
        raise _Refused(f"round {s.round} timed out; answers are closed")
    if expected != request_id:
        raise _Refused(f"request id {request_id!r} is not the one sent to {node!r}")


def _on_reply(s: JobState, e: ReplyReceived, values: dict[str, Any]) -> None:
    _check_answer(s, e.round, e.node_id, e.request_id)
    values["round_replies"] = s.round_replies.plus_new(e.node_id, e)


def _on_node_failed(s: JobState, e: NodeFailed, values: dict[str, Any]) -> None:
    _check_answer(s, e.round, e.node_id, e.request_id)
    values["round_failures"] = s.round_failures.plus_new(e.node_id, e)


def _on_node_retrying(s: JobState, e: NodeRetrying, values: dict[str, Any]) -> None:
    _check_answer(s, e.round, e.node_id, e.request_id)
    values["round_retries"] = {**s.round_retries, e.node_id: e.retry_at}


def _on_timed_out(s: JobState, e: RoundTimedOut, values: dict[str, Any]) -> None:
    _check_current(s, e.round)
    _check(s.round not in s.timed_out, f"round {s.round} already timed out")
    unanswered = s.unanswered_nodes()
    _check(bool(unanswered), "every node answered: nothing timed out")
    _check(
        sorted(e.missing) == sorted(unanswered),
        f"missing {sorted(e.missing)} is not the unanswered nodes {sorted(unanswered)}",
    )
    values["timed_out"] = s.timed_out.plus(s.round, e.missing)


def _on_aggregated(s: JobState, e: Aggregated, values: dict[str, Any]) -> None:
    config = s.config
    assert config is not None
    if e.round != s.round:
        raise _Refused(f"round {e.round} is not the current round {s.round}")
    if not s.round_do_training:
        raise _Refused(f"round {s.round} only validated: nothing to aggregate")
    replies = s.round_replies
    replied = tuple(sorted(keys_of(replies)))
    if e.nodes != replied:
        raise _Refused(f"contributors {list(e.nodes)} are not the replied {list(replied)}")
    _check(set(e.weights) == set(e.nodes), "weights must name exactly the contributors")
    if not _round_complete(s):
        raise _Refused(f"nodes {list(s.unanswered_nodes())} have not answered yet")
    if len(replied) < config.min_nodes:
        raise _Refused(f"{len(replied)} replies, fewer than min_nodes {config.min_nodes}")
    values["params_sha256"] = e.params_sha256
    values["aggregates"] = s.aggregates.plus(e.round, e)


def _round_complete(s: JobState) -> bool:
    """``s.round_complete()`` without building the tuple of unanswered nodes."""
    if s.round == 0:
        return False
    if _answered(s.timed_out, s.round):
        return True
    replied, failed = keys_of(s.round_replies), keys_of(s.round_failures)
    for node in s.round_nodes:
        if node not in replied and node not in failed:
            return False
    return True


def _on_completed(s: JobState, e: JobCompleted, values: dict[str, Any]) -> None:
    _check_current(s, e.round)
    _check(e.params_sha256 == s.params_sha256, "final params are not the current params")
    if s.status is JobStatus.COLLECTING:
        _check(not s.round_do_training, f"round {s.round} trained: aggregate it first")
        _check(s.round_complete(), f"nodes {list(s.unanswered_nodes())} have not answered yet")
    else:
        _check(s.round >= s.round_limit, f"round {s.round} is before the round_limit")


def _on_stopped(s: JobState, e: JobFailed | JobCancelled, values: dict[str, Any]) -> None:
    pass  # only the status changes


_HANDLERS: dict[str, Callable[[JobState, Any, dict[str, Any]], None]] = {
    "JobCreated": _on_job_created,
    "TrainingPlanUploaded": _on_plan_uploaded,
    "ParamsUploaded": _on_params_uploaded,
    "SettingsChanged": _on_settings_changed,
    "ApprovalAsked": _on_approval_asked,
    "ApprovalChecked": _on_approval_checked,
    "RoundSent": _on_round_sent,
    "RoundResent": _on_round_resent,
    "ReplyReceived": _on_reply,
    "NodeFailed": _on_node_failed,
    "NodeRetrying": _on_node_retrying,
    "RoundTimedOut": _on_timed_out,
    "Aggregated": _on_aggregated,
    "JobCompleted": _on_completed,
    "JobFailed": _on_stopped,
    "JobCancelled": _on_stopped,
}
if set(_HANDLERS) != set(EVENT_TYPES):  # pragma: no cover - caught at import by any test
    raise AssertionError("every event type needs a lifecycle handler")

#: Event class -> (type name, {source state: destination}, handler): the one lookup apply()
#: makes per event, built from the table derived from the Machine.
_STEPS: dict[type, tuple[str, dict[str, str], Callable[[JobState, Any, dict[str, Any]], None]]] = {
    cls: (
        name,
        {source: dest for (source, trigger), dest in _NEXT.items() if trigger == name},
        _HANDLERS[name],
    )
    for name, cls in EVENT_TYPES.items()
}
_new_state = object.__new__
_set_dict = object.__setattr__


def apply(state: JobState, event: Event) -> JobState:
    """The state after ``event``; raises :class:`IllegalTransition` (state untouched) if the
    event is not allowed in ``state.status`` or its contents break a guard."""
    step = _STEPS.get(type(event))
    if step is None:
        raise IllegalTransition(state.status, type(event).__name__, "not an event of the catalogue")
    name, destinations, handler = step
    values = state.__dict__
    dest = destinations.get(values["status"])
    if dest is None:
        allowed = ", ".join(allowed_events(state.status)) or "none"
        if state.status.terminal:
            raise IllegalTransition(
                state.status, name, f"the job is over (allowed events: {allowed})"
            )
        raise IllegalTransition(state.status, name, f"allowed events: {allowed}")
    # dataclasses.replace re-runs __init__ field by field; a dict copy that the handler
    # edits in place is ~10x cheaper, and replay does this once per event.
    values = values.copy()
    try:
        handler(state, event, values)
    except _Refused as exc:
        raise IllegalTransition(state.status, name, str(exc)) from None
    values["status"] = dest
    new = _new_state(JobState)
    _set_dict(new, "__dict__", values)
    return new


def replay(events: Iterable[Event], state: JobState | None = None) -> JobState:
    """Fold ``events`` into ``state`` (default: the initial state) with :func:`apply`.

    Pure: long replays are fastest with the garbage collector paused, which is the caller's
    business (:func:`fedsm.log.read.gc_paused`), not the core's.
    """
    current = initial_state() if state is None else state
    for event in events:
        current = apply(current, event)
    return current
