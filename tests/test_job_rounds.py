"""Rounds under real conditions: silent nodes, failing nodes, quorum, faults on the bus."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from job_world import TRAINING_ARGS, SilentNode, make_world

from fedsm.core import lifecycle
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.log.read import scan
from fedsm.researcher.errors import JobError, JobFailedError, TrainingPlanNotApproved
from fedsm.researcher.experiment import Experiment
from fedsm.researcher.job import Job
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.transport import Faults, MemoryBus


def _events(log_path: Path) -> list:
    return [record.event for record in scan(log_path).records]


def _experiment(world, tmp_path: Path, **kwargs) -> Experiment:
    return Experiment(
        tags=["breast-cancer"],
        training_plan_class="BreastCancerPlan",
        training_plan_path=world.plan,
        training_args=TRAINING_ARGS,
        run_dir=tmp_path / "run",
        bus=world.researcher(),
        repository=world.repository,
        search_deadline_s=2.0,
        discovery_s=0.0,  # the nodes are in this process, online already
        progress=False,
        on_round=lambda summary: None,
        **kwargs,
    )


def test_a_silent_node_times_out_and_the_round_carries_on(tmp_path: Path) -> None:
    world = make_world(tmp_path, 2)
    try:
        silent = SilentNode(world, "node-9", world.nodes[0].datasets.list()[0])
        exp = _experiment(world, tmp_path, round_limit=2, min_nodes=2, reply_deadline_s=0.5)
        exp.run()
        events = _events(exp.job.log_path)
        timeouts = [e for e in events if type(e).__name__ == "RoundTimedOut"]
        assert [(e.round, e.missing) for e in timeouts] == [(1, ("node-9",)), (2, ("node-9",))]
        aggregated = [e for e in events if type(e).__name__ == "Aggregated"]
        assert [e.nodes for e in aggregated] == [("node-1", "node-2")] * 2
        assert exp.job.state.status == "completed"
        assert silent.train_requests == 2
    finally:
        world.close()


def test_too_few_replies_fail_the_job_with_a_clear_message(tmp_path: Path) -> None:
    world = make_world(tmp_path, 1)
    try:
        SilentNode(world, "node-8", world.nodes[0].datasets.list()[0])
        SilentNode(world, "node-9", world.nodes[0].datasets.list()[0])
        exp = _experiment(world, tmp_path, round_limit=2, min_nodes=2, reply_deadline_s=0.3)
        with pytest.raises(JobFailedError) as info:
            exp.run()
        assert "only 1 of 3 nodes replied" in str(info.value)
        assert "min_nodes is 2" in str(info.value)
        events = _events(exp.job.log_path)
        assert type(events[-1]).__name__ == "JobFailed" and events[-1].round == 1
        assert exp.job.state.status == "failed"
    finally:
        world.close()


def test_a_node_answering_with_an_error_is_dropped_from_the_round(tmp_path: Path) -> None:
    world = make_world(tmp_path, 3)
    try:
        exp = _experiment(world, tmp_path, round_limit=1, min_nodes=2, reply_deadline_s=10)
        broken = world.nodes[2]
        Path(broken.datasets.list()[0]["path"]).unlink()  # its data disappeared
        exp.run()
        events = _events(exp.job.log_path)
        failed = [e for e in events if type(e).__name__ == "NodeFailed"]
        assert [(e.round, e.node_id) for e in failed] == [(1, "node-3")]
        assert failed[0].code in {
            int(ErrorNumber.DATASET_INVALID),
            int(ErrorNumber.TRAINING_FAILED),
            int(ErrorNumber.DATASET_NOT_FOUND),
        }
        aggregated = [e for e in events if type(e).__name__ == "Aggregated"]
        assert aggregated[0].nodes == ("node-1", "node-2")
        assert not [e for e in events if type(e).__name__ == "RoundTimedOut"]
    finally:
        world.close()


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 10_000),
    drop=st.sampled_from([0.0, 0.2]),
    duplicate=st.sampled_from([0.0, 0.5]),
    reorder=st.sampled_from([0, 2]),
)
def test_faulty_bus_never_counts_a_reply_twice_and_replay_equals_live(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    drop: float,
    duplicate: float,
    reorder: int,
) -> None:
    """Node buses drop, duplicate and reorder their replies; the researcher's is reliable.

    A reorder window holds a node's reply until its next message pushes it out, so replies
    arrive a round late: exactly the late replies the Job must ignore.
    """
    tmp_path = tmp_path_factory.mktemp("faulty")
    faults = Faults(drop=drop, duplicate=duplicate, reorder_window=reorder, seed=seed)
    world = make_world(tmp_path, 3, faults=faults)
    try:
        reqs = Requests(world.researcher(), default_deadline_s=1.0)
        data = FederatedDataSet({n.node_id: dict(n.datasets.list()[0]) for n in world.nodes})
        job = Job(
            reqs=reqs,
            training_plan_class="BreastCancerPlan",
            training_plan_path=world.plan,
            training_args=TRAINING_ARGS,
            data=data,
            run_dir=tmp_path / "run",
            repository=world.repository,
            round_limit=3,
            min_nodes=1,
            reply_deadline_s=0.4,
            durability="never",
        )
        # Approval answers cross the faulty bus too: ask until every node's answer arrived
        # (bounded). A round can not be sent before that (approval is a fact per round).
        for _ in range(20):
            statuses = job.check_training_plan_is_approved_by_nodes(deadline_s=0.4)
            if set(statuses.values()) == {"approved"}:
                break
            with pytest.raises(TrainingPlanNotApproved):
                job.start_nodes_training_round(1)
            assert job.state.status == "approval_checked" and job.state.round == 0
        else:
            pytest.fail(f"approval answers never all arrived: {statuses}")
        for rnd in (1, 2, 3):
            job.start_nodes_training_round(rnd)
            world.broker.flush()  # release anything the reorder window still holds
            try:
                job.aggregate()
            except JobFailedError:
                break
        live = job.state
        job.close()  # durability "never": the log is complete on disk once closed
        events = _events(job.log_path)
        assert lifecycle.replay(events) == live
        counted = collections.Counter(
            (e.round, e.node_id)
            for e in events
            if type(e).__name__ in ("ReplyReceived", "NodeFailed")
        )
        assert all(n == 1 for n in counted.values())
        for rnd in range(1, live.round + 1):  # every round ended: aggregated or failed
            assert rnd in live.aggregates or live.status == "failed"
        if drop == 0.0 and reorder == 0:
            assert live.status == "completed" and not live.timed_out
    finally:
        world.close()


def test_an_unapproved_plan_fails_early_with_the_command_that_fixes_it(tmp_path: Path) -> None:
    world = make_world(tmp_path, 2)
    try:
        changed = tmp_path / "changed_plan.py"
        changed.write_text(world.plan.read_text() + "\n# one more line\n")
        exp = Experiment(
            tags=["breast-cancer"],
            training_plan_class="BreastCancerPlan",
            training_plan_path=changed,
            training_args=TRAINING_ARGS,
            run_dir=tmp_path / "run",
            bus=world.researcher(),
            repository=world.repository,
            progress=False,
            discovery_s=0.0,
        )
        with pytest.raises(TrainingPlanNotApproved) as info:
            exp.run()
        sha = exp.job.state.plan_sha256
        assert f"fedsm node plan approve --dir NODE_DIR --sha256 {sha}" in str(info.value)
        assert exp.job.state.approvals.statuses == {"node-1": "unknown", "node-2": "unknown"}
        assert exp.job.state.round == 0  # no round was sent
        for node in world.nodes:  # the operators now see it waiting for their decision
            assert node.plans.status(sha) == "pending"
    finally:
        world.close()


def test_breakpoints_are_log_and_seq_and_experiment_run_counts_rounds(tmp_path: Path) -> None:
    world = make_world(tmp_path, 2)
    try:
        exp = _experiment(world, tmp_path, round_limit=3, min_nodes=2, reply_deadline_s=10)
        exp.run(rounds=1)
        assert sorted(exp.job.state.aggregates) == [1]  # exactly one round, not two
        saved = exp.job.save_state(tmp_path / "bp")
        assert json.loads((tmp_path / "bp" / "breakpoint.json").read_text()) == saved
        exp.job.load_state(saved)  # the log's end: fine
        exp.run(rounds=1)
        assert sorted(exp.job.state.aggregates) == [1, 2]
        with pytest.raises(JobError, match=f"fedsm replay .* --at {saved['seq']}"):
            exp.job.load_state(saved)  # the log moved on since
        exp.run()
        assert exp.job.state.status == "completed"
        assert exp.run() == exp.job.params_sha256  # nothing left to do, no error
        exp.close()
    finally:
        world.close()


def test_resuming_under_another_researcher_id_is_refused(tmp_path: Path) -> None:
    world = make_world(tmp_path, 2)
    try:
        exp = _experiment(world, tmp_path, round_limit=2, min_nodes=2, reply_deadline_s=10)
        exp.run(rounds=1)
        exp.close()
        exp.job.requests.bus.close()  # the researcher process "stopped"
        other = MemoryBus(world.broker, "researcher-other", role="researcher")
        world.extra.append(other)
        with pytest.raises(JobError, match="belongs to researcher 'researcher-test'"):
            Experiment.resume(tmp_path / "run", bus=other, repository=world.repository)
        again = Experiment.resume(
            tmp_path / "run",
            bus=world.researcher(),
            repository=world.repository,
            progress=False,
            on_round=lambda s: None,
        )
        again.run()
        assert again.job.state.status == "completed"
        again.close()
    finally:
        world.close()
