"""The Job lifecycle: the table, the guards, purity, and replay == live (stateful test)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from strategies_events import any_event, digest, job_run

from fedsm.core import events as ev
from fedsm.core import lifecycle as lc
from fedsm.log.writer import EventLog


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
        assert set(machine.get_triggers(status)) == set(lc.allowed_events(status)), status


def test_the_machine_and_apply_agree_on_a_run() -> None:
    machine = lc.build_machine()
    state = lc.initial_state()
    for event in job_run(rounds=2, nodes=2):
        state = lc.apply(state, event)
        assert machine.trigger(event.type_name) is True
        assert machine.state == state.status


@pytest.mark.parametrize(
    ("type_name", "nth", "change", "reason"),
    [
        ("RoundSent", 1, {"round": 2}, "not the next round"),
        ("RoundSent", 1, {"nodes": ()}, "at least one node"),
        ("RoundSent", 1, {"nodes": ("node-0", "stranger")}, "not nodes of this job"),
        ("RoundSent", 1, {"params_sha256": digest("other")}, "current params"),
        ("RoundSent", 1, {"request_ids": {}}, "request_ids"),
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
        agg = ev.Aggregated(1, "u", digest("a"), ("node-0",), {"node-0": 1.0}, "fedavg")
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
    again = lc.apply(state, ev.RoundResent(round=1, nodes=("node-1", "node-2")))
    assert again.status == state.status == "collecting"
    assert again.request_ids == state.request_ids
    with pytest.raises(lc.IllegalTransition, match="not in round"):
        lc.apply(state, ev.RoundResent(round=1, nodes=("stranger",)))


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

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _candidates(self, data: st.DataObject) -> list[ev.Event]:
        s = self.state
        r = s.round
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
            ev.TrainingPlanUploaded("u", PLAN, "Plan"),
            ev.ParamsUploaded(0, "u0", P0),
            ev.ApprovalChecked(PLAN, {n: "approved" for n in NODES}, {}),
        ]
        nodes = tuple(data.draw(st.lists(st.sampled_from(NODES), min_size=1, unique=True)))
        rnd = data.draw(st.sampled_from([r + 1, r + 1, r, r + 2]))
        out.append(
            ev.RoundSent(
                rnd, nodes, {n: f"q{rnd}{n}" for n in nodes}, "u", s.params_sha256 or P0, 1.0
            )
        )
        for n in NODES:
            rid = data.draw(st.sampled_from([f"q{r}{n}", "forged"]))
            out.append(ev.ReplyReceived(r, n, rid, "u", digest(f"{r}{n}"), 10, {}, {}))
            out.append(ev.NodeFailed(r, n, rid, 500, "x"))
        out.append(ev.RoundTimedOut(r, s.unanswered_nodes() or ("a",)))
        out.append(ev.RoundResent(r, s.round_nodes or ("a",)))
        replied = tuple(sorted(s.round_replies))
        out.append(
            ev.Aggregated(r, "u", digest(f"agg{r}"), replied, {n: 10.0 for n in replied}, "f")
        )
        out.append(ev.JobCompleted(r, "u", s.params_sha256 or P0))
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

    @invariant()
    def replaying_the_log_gives_the_live_state(self) -> None:
        assert lc.replay(self.log.events()) == self.state


LifecycleAgainstTheLog.TestCase.settings = settings(
    LifecycleAgainstTheLog.TestCase.settings, stateful_step_count=40
)
test_lifecycle_against_the_log = LifecycleAgainstTheLog.TestCase
