"""The fast paths of replay agree with the definitions they stand in for.

``fedsm.core.lifecycle`` checks a ``RoundSent``/``Aggregated`` against the state without
building ``approval_refusals()``, ``unanswered_nodes()`` or the ``nodes``/``round_limit``
properties (replay runs those checks once per round); these tests hold the shortcuts to the
:class:`~fedsm.core.jobstate.JobState` methods, and the refusals to the same messages.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsm.core import events as ev
from fedsm.core import lifecycle as lc
from fedsm.core.eventschema import APPROVAL_STATUSES
from fedsm.testing.strategies import digest, job_run

NODES = tuple(f"node-{i}" for i in range(4))


def _states(events: list[ev.Event]) -> list[lc.JobState]:
    states, state = [], lc.initial_state()
    for event in events:
        state = lc.apply(state, event)
        states.append(state)
    return states


@settings(max_examples=200, deadline=None)
@given(
    statuses=st.dictionaries(st.sampled_from(NODES), st.sampled_from(sorted(APPROVAL_STATUSES))),
    required=st.dictionaries(st.sampled_from(NODES), st.booleans()),
    plan=st.sampled_from(["plan", "other", None]),
    round_nodes=st.lists(st.sampled_from(NODES), min_size=1, max_size=4, unique=True),
)
def test_approved_is_no_refusal_among_the_round_nodes(
    statuses: dict[str, str], required: dict[str, bool], plan: str | None, round_nodes: list[str]
) -> None:
    events = job_run(rounds=1, nodes=len(NODES))
    state = _states(events[:4])[-1]  # approval checked
    check = None
    if plan is not None:
        check = ev.ApprovalChecked(digest(plan), statuses, required)
    state = dataclasses.replace(state, approvals=check)
    nodes = tuple(round_nodes)
    refused = {n: v for n, v in state.approval_refusals().items() if n in nodes}
    assert lc._approved(state, nodes) is (not refused)


@pytest.mark.parametrize("fail", [(), ("node-1",), NODES])
def test_round_complete_and_effective_settings_agree_along_runs(fail: tuple[str, ...]) -> None:
    events = job_run(rounds=3, nodes=len(NODES), fail=fail)
    if len(fail) == len(NODES):  # nobody replies: stop before the aggregation is refused
        events = events[: next(i for i, e in enumerate(events) if e.type_name == "Aggregated")]
    for state in _states(events):
        assert lc._round_complete(state) is state.round_complete()
        if state.config is not None:
            assert lc._effective(state, "nodes", state.config.nodes) == state.config.nodes
            assert tuple(lc._effective(state, "nodes", state.config.nodes)) == state.nodes
            limit = lc._effective(state, "round_limit", state.config.round_limit)
            assert int(limit) == state.round_limit


def test_effective_settings_follow_settings_changed() -> None:
    events = job_run(rounds=2, nodes=3)
    states = _states(events)
    i = next(i for i, e in enumerate(events) if e.type_name == "Aggregated")
    changed = lc.apply(
        states[i], ev.SettingsChanged(1, {"nodes": ["node-0", "node-2"], "round_limit": 5})
    )
    assert changed.config is not None
    assert tuple(lc._effective(changed, "nodes", changed.config.nodes)) == changed.nodes
    assert lc._effective(changed, "round_limit", 2) == changed.round_limit == 5


def test_a_timed_out_round_is_complete() -> None:
    events = job_run(rounds=1, nodes=3)
    i = next(i for i, e in enumerate(events) if e.type_name == "ReplyReceived")
    state = _states(events[: i + 1])[-1]  # one reply of three
    assert not lc._round_complete(state) and not state.round_complete()
    out = lc.apply(state, ev.RoundTimedOut(1, state.unanswered_nodes()))
    assert lc._round_complete(out) is out.round_complete() is True


def _refusal(state: lc.JobState, event: ev.Event) -> str:
    with pytest.raises(lc.IllegalTransition) as info:
        lc.apply(state, event)
    return info.value.reason


def test_refused_rounds_and_aggregations_keep_their_messages() -> None:
    events = job_run(rounds=2, nodes=3)
    states = [lc.initial_state(), *_states(events)]
    sent_at = next(i for i, e in enumerate(events) if e.type_name == "RoundSent")
    before, sent = states[sent_at], events[sent_at]
    assert isinstance(sent, ev.RoundSent)
    assert _refusal(before, dataclasses.replace(sent, round=3)) == (
        "round 3 is not the next round (1)"
    )
    strangers = dataclasses.replace(
        sent, nodes=("node-0", "x"), request_ids={"node-0": "a", "x": "b"}
    )
    assert _refusal(before, strangers) == "nodes ['x'] are not nodes of this job"
    other = dataclasses.replace(sent, params_sha256=digest("other"))
    assert _refusal(before, other) == (
        f"sent params {digest('other')[:12]}..., but the current params are {before.params_sha256}"
    )
    args = dataclasses.replace(sent, aggregator_args={"node-9": {}, "node-0": {}})
    assert (
        _refusal(before, args) == "aggregator args for nodes ['node-9'] that are not in the round"
    )
    over = dataclasses.replace(before, overrides={"round_limit": 0})
    assert _refusal(over, sent) == "round 1 is over the round_limit"
    unapproved = dataclasses.replace(before, approvals=None)
    assert _refusal(unapproved, sent) == (
        "the training plan is not approved on "
        "{'node-0': 'unchecked', 'node-1': 'unchecked', 'node-2': 'unchecked'}"
    )

    agg_at = next(i for i, e in enumerate(events) if e.type_name == "Aggregated")
    before, agg = states[agg_at], events[agg_at]
    assert isinstance(agg, ev.Aggregated)
    assert _refusal(before, dataclasses.replace(agg, round=2)) == (
        "round 2 is not the current round 1"
    )
    fewer = dataclasses.replace(agg, nodes=("node-0",), weights={"node-0": 1.0})
    assert _refusal(before, fewer) == (
        "contributors ['node-0'] are not the replied ['node-0', 'node-1', 'node-2']"
    )
    early = states[agg_at - 1]  # the last reply not folded in yet
    replied = sorted(early.round_replies)
    early_agg = dataclasses.replace(agg, nodes=tuple(replied), weights=dict.fromkeys(replied, 1.0))
    assert _refusal(early, early_agg) == "nodes ['node-2'] have not answered yet"
    assert early.unanswered_nodes() == ("node-2",)
    validation = dataclasses.replace(before, round_do_training=False)
    assert _refusal(validation, agg) == "round 1 only validated: nothing to aggregate"
