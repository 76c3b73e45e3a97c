"""The Job lifecycle: the table, the guards, purity, and replay == live (stateful test)."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fedsm.core import events as ev
from fedsm.core import lifecycle as lc
from fedsm.core import policy
from fedsm.core.jobstate import ACTIVE_STATES, TERMINAL_STATES, JobStatus
from fedsm.log.writer import EventLog
from fedsm.testing.strategies import any_event, digest, job_run


def _until(events: list[ev.Event], type_name: str, nth: int = 1) -> tuple[lc.JobState, int]:
    """State just before the nth event of a type, and that event's index."""
    state, seen = lc.initial_state(), 0
    for i, event in enumerate(events):
        if event.type_name == type_name:
            seen += 1
            if seen == nth:
                return state, i
        state = lc.apply(state, event)
    raise AssertionError(type_name)


def test_a_whole_run_replays_to_completed() -> None:
    events = job_run(rounds=3, nodes=4, fail=("node-3",))
    state = lc.replay(events)
    assert state.status == "completed" and state.round == 3
    assert sorted(state.replies) == [1, 2, 3]
    assert sorted(state.replies[2]) == ["node-0", "node-1", "node-2"]
    assert sorted(state.failures[3]) == ["node-3"]
    assert state.params_sha256 == digest("agg3") == state.aggregates[3].params_sha256
    assert state.config is events[0]


def test_the_fast_table_is_the_transitions_machine() -> None:
    machine = lc.build_machine()
    for status in lc.STATES:
        assert isinstance(status, JobStatus)
        # The machine names its states by value; the table is keyed by JobStatus members.
        assert set(machine.get_triggers(status.value)) == set(lc.allowed_events(status)), status
    assert [s.value for s in lc.STATES] == list(machine.states)
    for _trigger, sources, dest in lc.TRANSITIONS:
        assert isinstance(dest, JobStatus) and all(isinstance(s, JobStatus) for s in sources)


def test_the_machine_and_apply_agree_on_a_run() -> None:
    machine = lc.build_machine()
    state = lc.initial_state()
    for event in job_run(rounds=2, nodes=2):
        state = lc.apply(state, event)
        assert machine.trigger(event.type_name) is True
        assert machine.state == state.status
        assert isinstance(state.status, JobStatus)


@pytest.mark.parametrize(
    ("type_name", "nth", "change", "reason"),
    [
        ("RoundSent", 1, {"round": 2}, "not the next round"),
        ("RoundSent", 1, {"nodes": ()}, "at least one node"),
        ("RoundSent", 1, {"nodes": ("node-0", "stranger")}, "not nodes of this job"),
        ("RoundSent", 1, {"params_sha256": digest("other")}, "current params"),
        ("RoundSent", 1, {"request_ids": {}}, "request_ids"),
        (
            "RoundSent",
            1,
            {
                "nodes": ("node-0",),
                "request_ids": {"node-0": "req-1-node-0"},
                "aggregator_args": {"node-1": {"mu": 0.1}},
            },
            "not in the round",
        ),
        ("RoundSent", 2, {"aggregator_args": {"stranger": {"mu": 0.1}}}, "not in the round"),
        ("ReplyReceived", 1, {"round": 2}, "not the current round"),
        ("ReplyReceived", 1, {"node_id": "stranger"}, "not in round"),
        ("ReplyReceived", 1, {"request_id": "forged"}, "request id"),
        ("Aggregated", 1, {"nodes": ("node-0",)}, "contributors"),
        ("Aggregated", 1, {"weights": {}}, "weights"),
        ("JobCompleted", 1, {"params_sha256": digest("p0")}, "final params"),
        ("ParamsUploaded", 1, {"round": 1}, "round 0"),
        ("ApprovalChecked", 1, {"plan_sha256": digest("other")}, "plan"),
    ],
)
def test_guards_refuse_and_leave_the_state_unchanged(
    type_name: str, nth: int, change: dict[str, Any], reason: str
) -> None:
    events = job_run(rounds=2, nodes=3)
    state, index = _until(events, type_name, nth)
    before = state.to_dict()
    bad = type(events[index])(**{**events[index].__dict__, **change})
    with pytest.raises(lc.IllegalTransition) as info:
        lc.apply(state, bad)
    assert reason in str(info.value)
    assert info.value.state == state.status and info.value.event == type_name
    assert state.to_dict() == before


def test_duplicate_answers_and_late_answers_are_refused() -> None:
    events = job_run(rounds=2, nodes=3)
    state, index = _until(events, "ReplyReceived", 2)
    first_reply = events[index - 1]
    with pytest.raises(lc.IllegalTransition, match="already replied"):
        lc.apply(state, first_reply)
    assert isinstance(first_reply, ev.ReplyReceived)
    failed = ev.NodeFailed(1, first_reply.node_id, first_reply.request_id, 500, "boom")
    with pytest.raises(lc.IllegalTransition, match="already replied"):
        lc.apply(state, failed)


def test_events_not_allowed_in_a_state_name_state_and_event() -> None:
    with pytest.raises(lc.IllegalTransition) as info:
        lc.apply(lc.initial_state(), ev.JobFailed(round=0, reason="x"))
    assert info.value.state == "new" and info.value.event == "JobFailed"
    done = lc.replay(job_run(rounds=1, nodes=1))
    with pytest.raises(lc.IllegalTransition, match="job is over"):
        lc.apply(done, ev.JobCancelled(round=1, reason="late"))


def test_timeout_closes_the_round_and_aggregation_needs_min_nodes() -> None:
    events = job_run(rounds=1, nodes=3, min_nodes=2)
    state, index = _until(events, "ReplyReceived", 2)  # node-0 replied
    with pytest.raises(lc.IllegalTransition, match="have not answered"):
        agg = ev.Aggregated(1, digest("a"), ("node-0",), {"node-0": 1.0}, "fedavg")
        lc.apply(state, agg)
    with pytest.raises(lc.IllegalTransition, match="unanswered"):
        lc.apply(state, ev.RoundTimedOut(round=1, missing=("node-1",)))
    state = lc.apply(state, ev.RoundTimedOut(round=1, missing=("node-2", "node-1")))
    assert state.pending_nodes() == () and state.round_complete()
    assert state.unanswered_nodes() == ("node-1", "node-2")
    with pytest.raises(lc.IllegalTransition, match="timed out"):
        lc.apply(state, events[index])  # node-1's reply, after the deadline
    with pytest.raises(lc.IllegalTransition, match="min_nodes"):
        lc.apply(state, agg)
    failed = lc.apply(state, ev.JobFailed(round=1, reason="quorum"))
    assert failed.status == "failed" and failed.terminal


def test_resend_after_restore_keeps_the_round() -> None:
    events = job_run(rounds=1, nodes=3)
    state, index = _until(events, "ReplyReceived", 2)
    assert state.round_deadline == 1001.0  # job_run's round 1 deadline
    again = lc.apply(state, ev.RoundResent(round=1, nodes=("node-1", "node-2"), deadline=2000.0))
    assert again.status == state.status == "collecting"
    assert again.request_ids == state.request_ids
    assert again.round_nodes == state.round_nodes and again.round == state.round
    # A fresh window for the re-sent requests...
    assert again.round_deadline == 2000.0 and state.round_deadline == 1001.0
    assert again.round_aggregator_args == state.round_aggregator_args
    # ...and a version-1 record (deadline 0.0 after upcasting) kept the round's deadline.
    v1 = ev.decode_event("RoundResent", 1, {"round": 1, "nodes": ["node-1", "node-2"]})
    kept = lc.apply(state, v1)
    assert kept.round_deadline == 1001.0 and kept.request_ids == state.request_ids
    with pytest.raises(lc.IllegalTransition, match="not in round"):
        lc.apply(state, ev.RoundResent(round=1, nodes=("stranger",), deadline=2000.0))
    sent, _ = _until(events, "ReplyReceived", 1)
    assert sent.status == "round_sent"
    resent = lc.apply(sent, ev.RoundResent(round=1, nodes=("node-0",), deadline=1500.0))
    assert resent.status == "round_sent" and resent.round_deadline == 1500.0


def test_round_sent_records_the_deadline_and_the_aggregator_args() -> None:
    events = job_run(rounds=2, nodes=3)
    state, index = _until(events, "RoundSent", 2)
    args = {"node-0": {"mu": 0.5}, "node-2": {"correction": {"sha256": digest("c2")}}}
    sent = events[index]
    assert isinstance(sent, ev.RoundSent)
    after = lc.apply(state, dataclasses.replace(sent, aggregator_args=args, deadline=77.0))
    assert after.status == "round_sent" and after.round == 2
    assert after.round_deadline == 77.0
    assert after.round_aggregator_args == args
    assert after.to_dict()["round_aggregator_args"] == args
    assert after.to_dict()["round_deadline"] == 77.0
    # Without args, the next round's args are empty again, not the previous round's.
    third = lc.replay(events)
    assert dict(third.round_aggregator_args) == {}


@pytest.mark.parametrize(
    ("statuses", "required", "refused"),
    [
        ({"node-1": "rejected"}, {}, {"node-1": "rejected"}),
        (
            {"node-1": "pending", "node-2": "no-reply"},
            {},
            {"node-1": "pending", "node-2": "no-reply"},
        ),
        ({"node-1": "rejected"}, {"node-1": False}, {}),  # the node does not require approval
        ({"node-1": "unknown"}, {"node-1": True}, {"node-1": "unknown"}),
    ],
)
def test_a_round_goes_only_to_nodes_the_last_approval_check_cleared(
    statuses: dict[str, str], required: dict[str, bool], refused: dict[str, str]
) -> None:
    events = job_run(rounds=1, nodes=3)
    state, index = _until(events, "ApprovalChecked")
    check = events[index]
    assert isinstance(check, ev.ApprovalChecked)
    check = dataclasses.replace(
        check,
        statuses={**check.statuses, **statuses},
        approval_required={**check.approval_required, **required},
    )
    checked = lc.apply(state, check)
    assert checked.approval_refusals() == refused
    sent = events[index + 1]
    assert isinstance(sent, ev.RoundSent)
    if not refused:
        assert lc.apply(checked, sent).status == "round_sent"
        return
    before = checked.to_dict()
    with pytest.raises(lc.IllegalTransition, match="not approved") as info:
        lc.apply(checked, sent)
    assert all(node in str(info.value) for node in refused)
    assert info.value.state == "approval_checked" and info.value.event == "RoundSent"
    assert checked.to_dict() == before
    # A round to the cleared nodes only is allowed: approval is a fact per round.
    cleared = tuple(n for n in sent.nodes if n not in refused)
    fewer = dataclasses.replace(
        sent, nodes=cleared, request_ids={n: sent.request_ids[n] for n in cleared}
    )
    assert lc.apply(checked, fewer).round_nodes == cleared
    # A later check that approves everyone clears the round again.
    everyone = dataclasses.replace(check, statuses={n: "approved" for n in sent.nodes})
    again = lc.apply(checked, everyone)
    assert again.approval_refusals() == {}
    assert lc.apply(again, sent).status == "round_sent"


def test_without_a_check_of_this_plan_every_node_is_unchecked() -> None:
    events = job_run(rounds=1, nodes=2)
    state, index = _until(events, "ApprovalChecked")
    assert state.status == "uploaded" and state.approvals is None
    assert state.approval_refusals() == {"node-0": "unchecked", "node-1": "unchecked"}
    check = events[index]
    assert isinstance(check, ev.ApprovalChecked)
    assert lc.apply(state, check).approval_refusals() == {}
    # The plan can't change after upload, so a check of another plan is refused outright;
    # approval_refusals treats a state holding one (built by hand) as no check at all.
    other = dataclasses.replace(check, plan_sha256=digest("other"))
    with pytest.raises(lc.IllegalTransition, match="plan"):
        lc.apply(state, other)
    stale = dataclasses.replace(lc.apply(state, check), approvals=other)
    assert stale.approval_refusals() == {"node-0": "unchecked", "node-1": "unchecked"}


def test_status_is_a_string_enum_with_predicates() -> None:
    assert JobStatus.COLLECTING == "collecting" and str(JobStatus.COLLECTING) == "collecting"
    assert f"{JobStatus.ROUND_SENT}" == "round_sent"
    assert lc.initial_state().status is JobStatus.NEW
    expected = {
        "terminal": {"completed", "failed", "cancelled"},
        "stopped": {"failed", "cancelled"},
        "active": {
            "created",
            "uploaded",
            "approval_checked",
            "round_sent",
            "collecting",
            "aggregated",
        },
        "in_round": {"round_sent", "collecting"},
        "opening": {"new", "created"},
        "between_rounds": {"approval_checked", "aggregated"},
    }
    for predicate, members in expected.items():
        assert {s.value for s in JobStatus if getattr(s, predicate)} == members, predicate
    assert set(TERMINAL_STATES) == {JobStatus(s) for s in expected["terminal"]}
    assert set(ACTIVE_STATES) == {JobStatus(s) for s in expected["active"]}
    # Every state a run goes through is a JobStatus, and to_dict gives plain strings.
    state = lc.initial_state()
    for event in job_run(rounds=1, nodes=2):
        state = lc.apply(state, event)
        assert type(state.status) is JobStatus
        assert type(state.to_dict()["status"]) is str


def test_replay_leaves_the_garbage_collector_alone() -> None:
    events = job_run(rounds=2, nodes=3)
    was = gc.isenabled()
    try:
        gc.disable()
        seen: list[bool] = []

        def watched() -> Iterator[ev.Event]:
            for event in events:
                seen.append(gc.isenabled())
                yield event

        assert lc.replay(watched()).status == "completed"
        assert not gc.isenabled()
        gc.enable()
        seen.clear()
        assert lc.replay(watched()).status == "completed"
        assert gc.isenabled() and all(seen) and len(seen) == len(events)
    finally:
        (gc.enable if was else gc.disable)()


def test_a_thousand_node_round_folds_and_states_stay_persistent() -> None:
    events = job_run(rounds=2, nodes=1000)
    states = [lc.initial_state()]
    for event in events:
        states.append(lc.apply(states[-1], event))
    mid = states[4 + 1 + 500]  # JobCreated..ApprovalChecked, RoundSent, 500 replies
    assert len(mid.round_replies) == 500 and len(mid.pending_nodes()) == 500
    assert len(states[-1].replies[1]) == len(states[-1].replies[2]) == 1000
    # Branching off an old state must not disturb the newer ones (shared storage).
    branch = lc.apply(mid, ev.JobCancelled(round=1, reason="stop"))
    other = ev.NodeFailed(1, "node-999", "req-1-node-999", 1, "x")
    forked = lc.apply(mid, other)
    assert len(forked.round_failures) == 1 and len(mid.round_failures) == 0
    assert len(states[4 + 1 + 501].round_replies) == 501
    assert branch.status == "cancelled"


def test_append_map_is_persistent() -> None:
    base = lc.AppendMap({"a": 1})
    one = base.plus("b", 2)
    two = base.plus("c", 3)  # a branch: copies
    assert (
        dict(base) == {"a": 1} and dict(one) == {"a": 1, "b": 2} and dict(two) == {"a": 1, "c": 3}
    )
    assert "b" not in base and "b" not in two and one.plus("a", 9)["a"] == 9 and one["a"] == 1
    with pytest.raises(KeyError):
        base["b"]


def test_to_dict_is_json_ready() -> None:
    import json

    text = json.dumps(lc.replay(job_run(rounds=1, nodes=2)).to_dict())
    assert '"status": "completed"' in text


# --------------------------------------------------------------------------- stateful

NODES = ("a", "b", "c")
P0, PLAN = digest("p0"), digest("plan")


def _allowed(state: lc.JobState, event: ev.Event) -> bool:
    try:
        lc.apply(state, event)
    except lc.IllegalTransition:
        return False
    return True


class LifecycleAgainstTheLog(RuleBasedStateMachine):
    """Drive apply with allowed and disallowed events; the written log must replay to the
    live state after every step, and refused events must change nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="fedsm-lc-"))
        self.log = EventLog.open(self.dir / "job.log", durability="never")
        self.state = lc.initial_state()
        self.refused = 0
        self.deadline = 0.0  # the round's deadline by the last RoundSent / RoundResent

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _candidates(self, data: st.DataObject) -> list[ev.Event]:
        s = self.state
        r = s.round
        statuses = {
            n: data.draw(st.sampled_from(["approved", "approved", "approved", "rejected"]))
            for n in NODES
        }
        required = {n: data.draw(st.booleans()) for n in NODES if statuses[n] != "approved"}
        out: list[ev.Event] = [
            ev.JobCreated(
                "job",
                "me",
                "Plan",
                {},
                {},
                1,
                NODES,
                {n: n for n in NODES},
                3,
                2,
                5.0,
                "fedavg",
                {},
                (),
            ),
            ev.TrainingPlanUploaded(PLAN, "Plan"),
            ev.ParamsUploaded(0, P0),
            ev.ApprovalChecked(PLAN, {n: "approved" for n in NODES}, {}),
            ev.ApprovalChecked(PLAN, statuses, required),
        ]
        nodes = tuple(data.draw(st.lists(st.sampled_from(NODES), min_size=1, unique=True)))
        rnd = data.draw(st.sampled_from([r + 1, r + 1, r, r + 2]))
        args_for = data.draw(st.lists(st.sampled_from(NODES + ("z",)), unique=True, max_size=2))
        out.append(
            ev.RoundSent(
                rnd,
                nodes,
                {n: f"q{rnd}{n}" for n in nodes},
                s.params_sha256 or P0,
                data.draw(st.sampled_from([1.0, 50.0])),
                data.draw(
                    st.sampled_from([{}, {n: {"mu": 0.5} for n in args_for if n in nodes}])
                    | st.just({n: {"mu": 0.5} for n in args_for})  # maybe a node not sent to
                ),
            )
        )
        for n in NODES:
            rid = data.draw(st.sampled_from([f"q{r}{n}", "forged"]))
            out.append(ev.ReplyReceived(r, n, rid, digest(f"{r}{n}"), 10, {}, {}))
            out.append(ev.NodeFailed(r, n, rid, 500, "x"))
        out.append(ev.RoundTimedOut(r, s.unanswered_nodes() or ("a",)))
        out.append(
            ev.RoundResent(r, s.round_nodes or ("a",), data.draw(st.sampled_from([0.0, 9.0 + r])))
        )
        replied = tuple(sorted(s.round_replies))
        out.append(ev.Aggregated(r, digest(f"agg{r}"), replied, {n: 10.0 for n in replied}, "f"))
        out.append(ev.JobCompleted(r, s.params_sha256 or P0))
        # What the researcher's round policy decides here (its events must be allowed too).
        now = data.draw(st.sampled_from([0.0, 20.0, 100.0]))
        progress = policy.Progress(
            published_round=data.draw(st.sampled_from([0, r])),
            approval_asked=data.draw(st.booleans()),
            waited_round=data.draw(st.sampled_from([0, r])),
        )
        out.extend(policy.decide(s, now, progress).events)
        if s.status.between_rounds:
            args = {n: {"mu": 0.5} for n in args_for if n in NODES}
            out.extend(policy.round_sent(s, r + 1, now, args).events)
        return out

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        dice = data.draw(st.integers(0, 199))
        if dice < 4:
            event = data.draw(any_event)
        elif dice == 4:
            event = ev.JobFailed(self.state.round, "f")
        elif dice == 5:
            event = ev.JobCancelled(self.state.round, "c")
        else:
            candidates = self._candidates(data)
            if dice < 130:  # mostly move the job on, so that rounds get explored
                candidates = [e for e in candidates if _allowed(self.state, e)] or candidates
            event = data.draw(st.sampled_from(candidates))
        before = self.state.to_dict()
        try:
            new = lc.apply(self.state, event)
        except lc.IllegalTransition as exc:
            self.refused += 1
            assert exc.state == self.state.status
            assert self.state.to_dict() == before
            return
        self.log.append(event, ts=float(self.log.last_seq))
        self.state = new
        if isinstance(event, ev.RoundSent):
            self.deadline = event.deadline
            assert set(event.aggregator_args) <= set(event.nodes)
        elif isinstance(event, ev.RoundResent) and event.deadline > 0.0:
            self.deadline = event.deadline

    @invariant()
    def replaying_the_log_gives_the_live_state(self) -> None:
        assert lc.replay(self.log.events()) == self.state

    @invariant()
    def a_round_in_flight_went_only_to_cleared_nodes_with_their_args(self) -> None:
        s = self.state
        assert type(s.status) is JobStatus
        if s.config is None or s.round == 0:
            return
        assert s.round_deadline == self.deadline
        assert set(s.round_aggregator_args) <= set(s.round_nodes)
        if s.status.in_round:  # no approval check can come after a round was sent
            assert not set(s.approval_refusals()) & set(s.round_nodes)


LifecycleAgainstTheLog.TestCase.settings = settings(
    LifecycleAgainstTheLog.TestCase.settings, stateful_step_count=40
)
test_lifecycle_against_the_log = LifecycleAgainstTheLog.TestCase
