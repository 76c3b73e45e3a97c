"""The round policy (fedsm.core.policy), driven alone: random worlds, clock moves and kills.

A model world answers the policy's commands with random outcomes (approvals, replies,
failures, silences, clock jumps) and a model researcher "crashes" at random points: its
process-local progress is lost and its state rebuilt from the log. After every step:

* decide, record, then act: every request published is described by an event already in
  the log (RoundSent, or RoundResent naming the node), with the recorded ids and deadline;
* every event the policy decides is accepted by the lifecycle, in order;
* the log replayed equals the live state, at every step;
* a node is counted at most once per round; a round is aggregated only from its own replies;
* the job ends (completed or failed) within a bounded number of steps;
* decide is a function: the same (state, now, progress) gives the same decision.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from fedsm.core import lifecycle, policy
from fedsm.core.events import (
    Aggregated,
    ApprovalAsked,
    ApprovalChecked,
    Event,
    JobCreated,
    NodeFailed,
    ParamsUploaded,
    ReplyReceived,
    RoundResent,
    RoundSent,
    TrainingPlanUploaded,
)
from fedsm.core.jobstate import JobState, JobStatus
from fedsm.digests import sha256_hex

NODES = ("node-a", "node-b", "node-c")
PLAN = sha256_hex("plan")


def _opening(rounds: int, min_nodes: int) -> list[Event]:
    return [
        JobCreated(
            job_id="job-1",
            researcher_id="r",
            training_plan_class="P",
            training_args={},
            model_args={},
            seed=1,
            nodes=NODES,
            datasets={n: f"ds-{n}" for n in NODES},
            round_limit=rounds,
            min_nodes=min_nodes,
            reply_deadline_s=10.0,
            aggregator="fedavg",
            aggregator_args={},
            tags=(),
        ),
        TrainingPlanUploaded(sha256=PLAN, class_name="P"),
        ParamsUploaded(round=0, sha256=sha256_hex("p0")),
    ]


class Researcher:
    """A researcher process in the model: its log, state, progress and what it published."""

    def __init__(self, log: list[Event], now: float) -> None:
        self.log = log
        self.state = lifecycle.replay(log)
        self.progress = policy.Progress()
        self.now = now
        self.published: list[tuple[int, str, str, float]] = []  # (round, node, id, deadline)

    def record(self, events: tuple[Event, ...] | list[Event]) -> None:
        for event in events:
            self.state = lifecycle.apply(self.state, event)  # raises if the policy erred
            self.log.append(event)

    def publish(self, round_: int, nodes: tuple[str, ...]) -> None:
        state = self.state
        assert state.round == round_ and state.status.in_round
        for node in nodes:
            # decide, record, then act: the log already holds the event deciding this send
            deciding = [
                e
                for e in self.log
                if (isinstance(e, RoundSent) and e.round == round_ and node in e.nodes)
                or (isinstance(e, RoundResent) and e.round == round_ and node in e.nodes)
            ]
            assert deciding, f"published round {round_} to {node} with nothing recorded"
            assert node in state.request_ids
            self.published.append((round_, node, state.request_ids[node], state.round_deadline))
        self.progress = replace(self.progress, published_round=round_)


@st.composite
def worlds(draw: st.DrawFn) -> dict:
    return {
        "rounds": draw(st.integers(1, 3)),
        "min_nodes": draw(st.integers(1, 3)),
        "choices": draw(st.lists(st.integers(0, 9), min_size=200, max_size=200)),
    }


def _choose(choices: list[int], i: list[int]) -> int:
    i[0] += 1
    return choices[i[0] % len(choices)]


def _answer_collect(r: Researcher, until: float, choices: list[int], i: list[int]) -> None:
    """Some pending nodes answer (reply or error), maybe the clock jumps past the deadline."""
    state = r.state
    for node in state.pending_nodes():
        c = _choose(choices, i)
        rid = state.request_ids[node]
        if c <= 4:
            r.record(
                [
                    ReplyReceived(
                        round=state.round,
                        node_id=node,
                        request_id=rid,
                        params_sha256=sha256_hex(f"{state.round}/{node}"),
                        sample_size=10 + c,
                        metrics={},
                        timing={},
                        training_plan_sha256=PLAN,
                    )
                ]
            )
        elif c == 5:
            r.record(
                [NodeFailed(round=state.round, node_id=node, request_id=rid, code=500, message="x")]
            )
        state = r.state
    c = _choose(choices, i)
    if c >= 7:
        r.now = until + 0.5  # the deadline passes
    elif c == 6:
        r.progress = replace(r.progress, waited_round=state.round)  # a window waited out
    else:
        r.now += 1.0


@settings(max_examples=120)
@given(world=worlds())
def test_the_policy_records_before_it_acts_and_always_ends(world: dict) -> None:
    choices, i = world["choices"], [0]
    log: list[Event] = _opening(world["rounds"], world["min_nodes"])
    r = Researcher(log, now=1000.0)
    all_published: list[tuple[int, str, str, float]] = []
    operators_acted = False
    for _step in range(400):
        state, now, progress = r.state, r.now, r.progress
        decision = policy.decide(state, now, progress)
        assert decision == policy.decide(state, now, progress)  # a function of its inputs
        r.record(decision.events)
        stop = None
        for command in decision.commands:
            if isinstance(command, policy.CheckApproval):
                # sometimes an operator has not approved yet; after a stop for it they have
                approve = operators_acted or _choose(choices, i) != 0
                r.record(
                    [
                        ApprovalChecked(
                            plan_sha256=PLAN,
                            statuses={n: "approved" if approve else "pending" for n in NODES},
                            approval_required={n: True for n in NODES},
                        )
                    ]
                )
                r.progress = replace(r.progress, approval_asked=True)
            elif isinstance(command, policy.StartRound):
                assert command.round == r.state.round + 1
                assert not r.state.approval_refusals()
                args = {n: {"mu": 0.1, "f": {"sha256": sha256_hex(n)}} for n in NODES}
                sent = policy.round_sent(r.state, command.round, r.now, args)
                r.record(sent.events)
                for follow in sent.commands:
                    if isinstance(follow, policy.Publish):
                        r.publish(follow.round, follow.nodes)
                    elif isinstance(follow, policy.Collect):
                        assert follow.until == r.state.round_deadline
                        _answer_collect(r, follow.until, choices, i)
            elif isinstance(command, policy.Publish):
                r.publish(command.round, command.nodes)
            elif isinstance(command, policy.Collect):
                assert command.until == r.state.round_deadline
                _answer_collect(r, command.until, choices, i)
            elif isinstance(command, policy.Aggregate):
                s = r.state
                assert command.round == s.round and s.round_complete()
                nodes = tuple(sorted(s.round_replies))
                r.record(
                    [
                        Aggregated(
                            round=s.round,
                            params_sha256=sha256_hex(f"agg{s.round}"),
                            nodes=nodes,
                            weights={n: float(s.round_replies[n].sample_size) for n in nodes},
                            aggregator="fedavg",
                        )
                    ]
                )
            elif isinstance(command, policy.Stop):
                stop = command
        # the log replayed is the live state, at every step
        assert lifecycle.replay(r.log) == r.state
        if stop is not None:
            if stop.finished:
                break
            assert stop.needs_approval
            operators_acted = True  # they approve, and the researcher runs again
            r.progress = replace(r.progress, approval_asked=False)
        if _choose(choices, i) == 9:  # the researcher is killed: progress lost, log kept
            all_published += r.published
            r = Researcher(list(r.log), now=r.now + 1.0)
    else:
        raise AssertionError(f"the job did not end: {r.state.status}")
    all_published += r.published
    final: JobState = r.state
    assert final.status in (JobStatus.COMPLETED, JobStatus.FAILED)
    # each node counted at most once per round; aggregates only from their round's replies
    seen = set()
    for event in r.log:
        if isinstance(event, (ReplyReceived, NodeFailed)):
            assert (event.round, event.node_id) not in seen
            seen.add((event.round, event.node_id))
        if isinstance(event, Aggregated):
            replied = {
                e.node_id for e in r.log if isinstance(e, ReplyReceived) and e.round == event.round
            }
            assert set(event.nodes) == replied
    # every request of a round, however often re-sent, carried the same id
    ids: dict[tuple[int, str], str] = {}
    for round_, node, rid, _deadline in all_published:
        assert ids.setdefault((round_, node), rid) == rid


def test_an_unapproved_plan_is_asked_once_per_drive_then_stops() -> None:
    log = _opening(1, 1)
    state = lifecycle.replay(
        [
            *log,
            ApprovalChecked(
                plan_sha256=PLAN,
                statuses={n: "pending" for n in NODES},
                approval_required={n: True for n in NODES},
            ),
        ]
    )
    fresh = policy.decide(state, 0.0, policy.Progress())
    # the asking is recorded first (ApprovalAsked), then carried out
    assert fresh.commands == (policy.CheckApproval(),)
    assert fresh.events == (ApprovalAsked(plan_sha256=PLAN, nodes=NODES),)
    asked = policy.decide(state, 0.0, policy.Progress(approval_asked=True))
    (stop,) = asked.commands
    assert isinstance(stop, policy.Stop) and stop.needs_approval and not asked.events
    assert "fedsm node plan approve" in stop.reason and PLAN in stop.reason


def test_a_round_below_quorum_fails_the_job_and_never_aggregates() -> None:
    events = _opening(2, 2) + [
        ApprovalChecked(
            plan_sha256=PLAN,
            statuses={n: "approved" for n in NODES},
            approval_required={n: True for n in NODES},
        )
    ]
    state = lifecycle.replay(events)
    sent = policy.round_sent(state, 1, 0.0).events[0]
    state = lifecycle.apply(state, sent)
    for node in NODES:
        state = lifecycle.apply(
            state,
            NodeFailed(
                round=1, node_id=node, request_id=sent.request_ids[node], code=1, message=""
            ),
        )
    decision = policy.decide(state, 1.0, policy.Progress(published_round=1))
    (failed,) = decision.events
    assert type(failed).__name__ == "JobFailed" and "min_nodes is 2" in failed.reason
    assert not any(isinstance(c, policy.Aggregate) for c in decision.commands)


def test_a_restored_round_is_resent_to_the_pending_nodes_with_a_fresh_deadline() -> None:
    events = _opening(1, 1) + [
        ApprovalChecked(
            plan_sha256=PLAN,
            statuses={n: "approved" for n in NODES},
            approval_required={n: True for n in NODES},
        )
    ]
    state = lifecycle.replay(events)
    sent = policy.round_sent(state, 1, 100.0).events[0]
    state = lifecycle.apply(state, sent)
    state = lifecycle.apply(
        state,
        NodeFailed(
            round=1, node_id="node-a", request_id=sent.request_ids["node-a"], code=1, message=""
        ),
    )
    later = 5000.0  # long after the recorded deadline: a resume gives a new window
    decision = policy.decide(state, later, policy.Progress())
    (resent,) = decision.events
    assert isinstance(resent, RoundResent)
    assert resent.nodes == ("node-b", "node-c") and resent.deadline == later + 10.0
    assert decision.commands == (
        policy.Publish(1, ("node-b", "node-c")),
        policy.Collect(1, later + 10.0),
    )
    # the same process, having published: past the deadline, the round times out
    state = lifecycle.apply(state, resent)
    decision = policy.decide(state, later + 11.0, policy.Progress(published_round=1))
    assert [type(e).__name__ for e in decision.events] == ["RoundTimedOut"]
