"""The pure reply filter: any stream of replies, late, duplicated, foreign or wrong, counts each
node of the round at most once, and only what classify accepts ever reaches the lifecycle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsm.core import lifecycle
from fedsm.core.collect import classify, digest_in_url, train_request_id
from fedsm.core.events import (
    Aggregated,
    ApprovalChecked,
    JobCreated,
    NodeFailed,
    ParamsUploaded,
    ReplyReceived,
    RoundSent,
    TrainingPlanUploaded,
)
from fedsm.core.messages import ErrorReply, PingReply, TrainReply
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.testing.strategies import job_run

JOB = "job-1"
KEY = b"k" * 32
NODES = ("node-a", "node-b", "node-c")
SHA = "0" * 64  # the plan and the global parameters
REPLY_SHA = "ab" * 32  # what every node says it sent

#: URLs that name the reply's file (its digest is the last path segment)...
GOOD_URLS = (
    f"file:///root/{REPLY_SHA}",
    f"https://host:8443/files/{REPLY_SHA}",
    f"https://host/files/{REPLY_SHA}?token=t0k",
    f"file:///moved/repository/{REPLY_SHA}/",
)
#: ...and URLs that do not: no digest, another file, not lowercase, a longer name.
BAD_URLS = (
    "u",
    f"https://host/files/{SHA}",
    f"https://host/files/{REPLY_SHA.upper()}",
    f"https://host/files/{REPLY_SHA}/extra",
    f"https://host/files/{REPLY_SHA}0",
    f"https://host/{REPLY_SHA}.safetensors",
)


def state_in_round(round_number: int = 2):
    events = [
        JobCreated(
            job_id=JOB,
            researcher_id="res",
            training_plan_class="P",
            training_args={},
            model_args={},
            seed=0,
            nodes=NODES,
            datasets={n: f"d-{n}" for n in NODES},
            round_limit=5,
            min_nodes=1,
            reply_deadline_s=1.0,
            aggregator="fedavg",
            aggregator_args={},
            tags=(),
        ),
        TrainingPlanUploaded(sha256=SHA, class_name="P"),
        ParamsUploaded(round=0, sha256=SHA),
        ApprovalChecked(
            plan_sha256=SHA,
            statuses={n: "approved" for n in NODES},
            approval_required={n: True for n in NODES},
        ),
    ]
    for rnd in range(1, round_number + 1):
        ids = {n: train_request_id(JOB, rnd, n, KEY) for n in NODES}
        events.append(
            RoundSent(
                round=rnd,
                nodes=NODES,
                request_ids=ids,
                params_sha256=SHA,
                deadline=0.0,
                aggregator_args={},
            )
        )
        if rnd == round_number:
            break
        for n in NODES:  # earlier rounds: everyone replied, then aggregation
            events.append(
                ReplyReceived(
                    round=rnd,
                    node_id=n,
                    request_id=ids[n],
                    params_sha256=SHA,
                    sample_size=1,
                    metrics={},
                    timing={},
                )
            )
        events.append(
            Aggregated(
                round=rnd,
                params_sha256=SHA,
                nodes=NODES,
                weights={n: 1.0 for n in NODES},
                aggregator="fedavg",
            )
        )
    return lifecycle.replay(events)


reply = st.builds(
    lambda kind, job, rnd, node, right_id, url: (kind, job, rnd, node, right_id, url),
    st.sampled_from(["train", "train-other-plan", "error", "ping"]),
    st.sampled_from([JOB, "job-other"]),
    st.sampled_from([1, 2, 3]),
    st.sampled_from(NODES + ("node-z",)),
    st.booleans(),
    st.sampled_from(GOOD_URLS + GOOD_URLS + BAD_URLS),
)


def build(kind, job, rnd, node, right_id, url):
    request_id = train_request_id(job, rnd, node, KEY) if right_id else "req-stale"
    head = dict(request_id=request_id, researcher_id="res", node_id=node)
    if kind.startswith("train"):
        return TrainReply(
            **head,
            job_id=job,
            round=rnd,
            dataset_id="d",
            training_plan_sha256=SHA if kind == "train" else "f" * 64,
            params_url=url,
            params_sha256=REPLY_SHA,
            sample_size=3,
        )
    if kind == "error":
        return ErrorReply(**head, code=500, message="boom", job_id=job, round=rnd)
    return PingReply(**head)


@given(st.lists(reply, max_size=40))
def test_each_node_is_counted_at_most_once_and_only_when_it_should(draws) -> None:
    state = state_in_round(2)
    counted: dict[str, object] = {}
    for draw in draws:
        message = build(*draw)
        verdict = classify(state, message)
        kind, job, rnd, node, right_id, url = draw
        should = (
            kind in ("train", "train-other-plan", "error")
            and job == JOB
            and rnd == 2
            and node in NODES
            and right_id
            and node not in counted
        )
        assert (verdict.event is not None) == should, verdict.reason
        if verdict.event is not None:
            good_url = url in GOOD_URLS
            expected_type = ReplyReceived if kind == "train" and good_url else NodeFailed
            assert isinstance(verdict.event, expected_type)
            if kind == "train-other-plan":  # a node that ran another plan is not counted in
                if good_url:
                    assert verdict.event.code == 201 and "f" * 64 in verdict.event.message
                else:
                    assert verdict.event.code in (201, 202)
            elif kind == "train" and not good_url:  # its URL names another file than its digest
                assert verdict.event.code == int(ErrorNumber.PARAMS_DIGEST_MISMATCH)
                assert REPLY_SHA in verdict.event.message
            elif kind == "train":  # the reply is recorded by digest; the URL is not kept
                assert verdict.event.params_sha256 == REPLY_SHA
                assert not hasattr(verdict.event, "params_url")
            state = lifecycle.apply(state, verdict.event)  # never illegal
            counted[node] = verdict.event
        else:
            assert verdict.reason
    assert set(state.round_replies) | set(state.round_failures) == set(counted)
    assert sorted(state.pending_nodes()) == sorted(set(NODES) - set(counted))


def test_request_ids_are_a_function_of_job_round_and_node() -> None:
    assert train_request_id(JOB, 1, "a", KEY) == train_request_id(JOB, 1, "a", KEY)
    ids = {train_request_id(j, r, n, KEY) for j in (JOB, "j2") for r in (1, 2) for n in ("a", "b")}
    assert len(ids) == 8


def test_the_digest_a_url_names_is_its_last_path_segment() -> None:
    for url in GOOD_URLS:
        assert digest_in_url(url) == REPLY_SHA, url
    for url in BAD_URLS:
        assert digest_in_url(url) != REPLY_SHA, url
    assert digest_in_url(f"https://host/files/{SHA}") == SHA
    assert digest_in_url("u") is None and digest_in_url("") is None


def test_a_reply_whose_url_names_another_file_fails_the_node_and_counts_it() -> None:
    state = state_in_round(2)
    ok = build("train", JOB, 2, "node-a", True, GOOD_URLS[1])
    bad = build("train", JOB, 2, "node-b", True, f"https://host/files/{SHA}")
    accepted = classify(state, ok).event
    assert isinstance(accepted, ReplyReceived) and accepted.params_sha256 == REPLY_SHA
    failed = classify(state, bad).event
    assert isinstance(failed, NodeFailed) and failed.node_id == "node-b"
    assert failed.code == int(ErrorNumber.PARAMS_DIGEST_MISMATCH) == 202
    assert failed.request_id == train_request_id(JOB, 2, "node-b", KEY) and failed.round == 2
    state = lifecycle.apply(lifecycle.apply(state, accepted), failed)
    assert sorted(state.round_replies) == ["node-a"] and sorted(state.round_failures) == ["node-b"]
    # Counted once: the same reply again (even with a good URL) is a duplicate.
    again = build("train", JOB, 2, "node-b", True, GOOD_URLS[0])
    assert classify(state, again).event is None
    assert state.pending_nodes() == ("node-c",)


@pytest.mark.parametrize(
    "events",
    [
        job_run(),
        job_run(3, 4, fail=("node-1",)),
        job_run(1, 1),
        job_run(2, 5, fail=("node-0", "node-4")),
    ],
)
def test_the_o1_pending_checks_agree_with_the_pending_nodes(events) -> None:
    """``is_pending``/``has_pending`` (O(1), used per message) say what ``pending_nodes``
    (O(K)) says, at every step of any valid run."""
    state = lifecycle.initial_state()
    for event in events:
        state = lifecycle.apply(state, event)
        if state.config is None:
            continue
        pending = set(state.pending_nodes())
        assert state.has_pending() == bool(pending)
        for node in set(state.config.nodes) | set(state.round_nodes) | {"stranger"}:
            assert state.is_pending(node) == (node in pending)
