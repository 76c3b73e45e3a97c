"""Decide, record, then act: each break seen by users and attackers, made impossible.

Real nodes on a memory bus (tests/job_world.py). Each test names the break it holds shut.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from job_world import TRAINING_ARGS, experiment, make_world, researcher_bus, resume, run_events

from fedsm.core.events import ApprovalChecked, JobCreated, RoundSent
from fedsm.core.lifecycle import IllegalTransition
from fedsm.log.format import HEADER_SIZE
from fedsm.log.read import LogLocked, scan
from fedsm.researcher.errors import JobError, RefusedByLifecycle, TrainingPlanNotApproved
from fedsm.researcher.experiment import Experiment
from fedsm.researcher.job import Job
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.transport import MemoryBus


def _bus(world) -> MemoryBus:
    return researcher_bus(world)


def _experiment(world, run_dir: Path, **kwargs) -> Experiment:
    return experiment(world, run_dir, **kwargs)


_resume, _events = resume, run_events


@pytest.fixture
def world(tmp_path: Path):
    w = make_world(tmp_path, 3)
    yield w
    w.close()


def _reference_digest(world, tmp_path: Path, rounds: int = 2) -> str:
    exp = _experiment(world, tmp_path / "reference", round_limit=rounds, seed=3)
    try:
        return exp.run()
    finally:
        exp.close()


def test_a_log_holding_only_its_header_is_a_fresh_start(world, tmp_path: Path) -> None:
    """Killed as Job.__init__ created the log: the directory must start again, not refuse."""
    reference = _reference_digest(world, tmp_path)
    run = tmp_path / "run"
    exp = _experiment(world, run, round_limit=2, seed=3)
    exp.close()
    log_path = run / "job.log"
    with open(log_path, "r+b") as f:
        f.truncate(HEADER_SIZE)  # the log as a kill right after its creation leaves it
    assert scan(log_path).records == []
    exp = _experiment(world, run, round_limit=2, seed=3)
    try:
        assert exp.run() == reference
    finally:
        exp.close()


@pytest.mark.parametrize("keep", [1, 2])
def test_a_log_cut_inside_its_opening_resumes_to_the_same_digest(
    world, tmp_path: Path, keep: int
) -> None:
    """Killed inside the opening (JobCreated without ParamsUploaded): resume completes it."""
    reference = _reference_digest(world, tmp_path)
    run = tmp_path / "run"
    exp = _experiment(world, run, round_limit=2, seed=3)
    exp.close()
    records = scan(run / "job.log").records
    assert [type(r.event).__name__ for r in records[:3]] == [
        "JobCreated",
        "TrainingPlanUploaded",
        "ParamsUploaded",
    ]
    with open(run / "job.log", "r+b") as f:
        f.truncate(records[keep].offset)  # keep the first `keep` records
    exp = _resume(world, run)
    try:
        assert exp.run() == reference
    finally:
        exp.close()
    events = _events(run)
    assert sum(isinstance(e, JobCreated) for e in events) == 1


def test_a_bad_setting_leaves_nothing_behind(world, tmp_path: Path) -> None:
    """A min_nodes typo is refused before the log or any file exists; the directory is then
    as good as new."""
    run = tmp_path / "run"
    with pytest.raises(JobError, match="min_nodes"):
        _experiment(world, run, round_limit=2, min_nodes=30)
    assert not (run / "job.log").exists() and not (run / "files").exists()
    assert not [p for p in world.repository.root.iterdir() if p.name != ".tmp"], "uploaded"
    with pytest.raises(JobError, match="round_limit"):
        _experiment(world, run, round_limit=0)
    exp = _experiment(world, run, round_limit=1)
    try:
        exp.run()
        assert exp.job.state.status == "completed"
    finally:
        exp.close()


def test_run_again_after_not_approved_asks_the_nodes_again(world, tmp_path: Path) -> None:
    """Operators approve after a TrainingPlanNotApproved: run() and resume() ask again
    (recorded) before round 1, and the audit shows every contributor approved."""
    source = world.plan.read_bytes()
    for node in world.nodes:  # the plan is not approved anywhere yet
        node.plans.decide("rejected", source=source, by="test")
    run = tmp_path / "run"
    exp = _experiment(world, run, round_limit=1)
    with pytest.raises(TrainingPlanNotApproved, match="fedsm node plan approve"):
        exp.run()
    with pytest.raises(TrainingPlanNotApproved):
        exp.run()  # still rejected: asked again, refused again, nothing sent
    assert not any(isinstance(e, RoundSent) for e in _events(run))
    world.nodes[0].plans.decide("approved", source=source, by="test")
    world.nodes[1].plans.decide("approved", source=source, by="test")
    with pytest.raises(TrainingPlanNotApproved, match="node-3"):
        exp.run()
    exp.close()
    world.nodes[2].plans.decide("approved", source=source, by="test")
    exp = _resume(world, run)  # a new process, after the operators approved
    try:
        exp.run()
        assert exp.job.state.status == "completed"
    finally:
        exp.close()
    events = _events(run)
    checks = [e for e in events if isinstance(e, ApprovalChecked)]
    assert len(checks) == 4
    first_round = next(i for i, e in enumerate(events) if isinstance(e, RoundSent))
    last_check = max(i for i, e in enumerate(events) if isinstance(e, ApprovalChecked))
    assert last_check < first_round
    assert set(events[last_check].statuses.values()) == {"approved"}
    assert all(type(e).__name__ != "NodeFailed" for e in events)


def _job(world, tmp_path: Path, **kwargs) -> Job:
    reqs = Requests(_bus(world), default_deadline_s=2.0)
    data = FederatedDataSet({n.node_id: dict(n.datasets.list()[0]) for n in world.nodes})
    return Job(
        reqs=reqs,
        training_plan_class="BreastCancerPlan",
        training_plan_path=world.plan,
        training_args=TRAINING_ARGS,
        data=data,
        run_dir=tmp_path / "run",
        repository=world.repository,
        **{"round_limit": 2, "reply_deadline_s": 10.0, **kwargs},
    )


def _train_requests_handled(world) -> int:
    return sum(len(node.replies) for node in world.nodes)


def test_a_round_out_of_turn_publishes_nothing_and_records_nothing(world, tmp_path: Path) -> None:
    job = _job(world, tmp_path)
    try:
        seq = job.last_seq
        with pytest.raises(RefusedByLifecycle):  # before the approval check
            job.start_nodes_training_round(1)
        job.check_training_plan_is_approved_by_nodes()
        seq = job.last_seq
        for wrong in (2, 3, 0):
            with pytest.raises(IllegalTransition, match="RoundSent"):
                job.start_nodes_training_round(wrong)
            with pytest.raises(JobError):  # the same error is a JobError too
                job.start_nodes_training_round(wrong)
        assert job.last_seq == seq and job.state.round == 0
        assert _train_requests_handled(world) == 0, "a node trained a round the log never had"
        job.start_nodes_training_round(1)
        assert _train_requests_handled(world) == 3
        with pytest.raises(JobError):
            job.start_nodes_training_round(2)  # round 1 is not aggregated yet
        with pytest.raises(RefusedByLifecycle, match="ApprovalChecked"):
            job.check_training_plan_is_approved_by_nodes()  # after round 1: nobody asked
        assert _train_requests_handled(world) == 3
    finally:
        job.close()


def test_aggregate_while_nodes_are_pending_changes_nothing(world, tmp_path: Path) -> None:
    job = _job(world, tmp_path, min_nodes=3)
    try:
        job.check_training_plan_is_approved_by_nodes()
        with pytest.raises(JobError, match="nothing to aggregate"):
            job.aggregate()
        job.step(max_wait_s=0.0)  # round 1 recorded and published; no reply taken yet
        assert job.state.status == "round_sent" and job.state.pending_nodes()
        seq = job.last_seq
        with pytest.raises(JobError, match="still waiting"):
            job.aggregate()
        assert job.last_seq == seq and job.state.status == "round_sent"
        job.start_nodes_training_round(1)  # collect the round to its end
        digest = job.aggregate()
        assert job.state.status == "aggregated" and digest == job.params_sha256
    finally:
        job.close()


def test_a_failed_restore_releases_the_log(world, tmp_path: Path) -> None:
    job = _job(world, tmp_path)
    job.close()
    stranger = Requests(MemoryBus(world.broker, "someone-else", role="researcher"))
    with pytest.raises(JobError, match="belongs to researcher"):
        Job.restore(tmp_path / "run", reqs=stranger, repository=world.repository)
    stranger.bus.close()
    again = Job.restore(tmp_path / "run", reqs=Requests(_bus(world)), repository=world.repository)
    try:
        assert again.state.status == "uploaded"
        with pytest.raises(LogLocked):
            Job.restore(tmp_path / "run", reqs=Requests(_bus(world)), repository=world.repository)
    finally:
        again.close()


def test_a_moved_run_directory_resumes_and_its_log_names_no_path(world, tmp_path: Path) -> None:
    reference = _reference_digest(world, tmp_path)
    run = tmp_path / "run"
    exp = _experiment(world, run, round_limit=2, seed=3)
    exp.run(rounds=1)
    exp.close()
    raw = (run / "job.log").read_bytes()
    assert str(tmp_path).encode() not in raw and b"file://" not in raw
    moved = tmp_path / "elsewhere" / "run-moved"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    exp = _resume(world, moved)
    try:
        assert exp.run() == reference
    finally:
        exp.close()


def test_asking_about_approval_is_recorded_before_any_node_hears_of_it(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ApprovalAsked is durable before a training-plan-status request leaves: a kill right
    after it leaves no node with the plan recorded as pending, and a resume asks again."""
    from fedsm.core.events import ApprovalAsked
    from fedsm.log.writer import EventLog

    fresh = tmp_path / "fresh_plan.py"  # a plan no node has heard of
    fresh.write_text(world.plan.read_text() + "\n# yet another version\n")

    class Killed(BaseException):
        pass

    append = EventLog.append

    def append_then_die(self, event, *, ts):  # type: ignore[no-untyped-def]
        seq = append(self, event, ts=ts)
        if isinstance(event, ApprovalAsked):
            raise Killed
        return seq

    run = tmp_path / "run"
    exp = Experiment(
        tags=["breast-cancer"],
        training_plan_class="BreastCancerPlan",
        training_plan_path=fresh,
        training_args=TRAINING_ARGS,
        run_dir=run,
        bus=_bus(world),
        repository=world.repository,
        search_deadline_s=2.0,
        discovery_s=0.0,
        progress=False,
        on_round=lambda s: None,
        round_limit=1,
    )
    monkeypatch.setattr(EventLog, "append", append_then_die)
    with pytest.raises(Killed):
        exp.run()
    monkeypatch.undo()
    exp.close()
    sha = exp.job.state.plan_sha256
    for node in world.nodes:  # nobody was asked: no node has heard of this plan
        assert node.plans.status(sha) == "unknown", node.node_id
    events = _events(run)
    assert isinstance(events[-1], ApprovalAsked) and events[-1].plan_sha256 == sha
    for node in world.nodes:
        node.plans.decide("approved", source=fresh.read_bytes(), by="test")
    resumed = _resume(world, run)
    try:
        resumed.run()
        assert resumed.job.state.status == "completed"
    finally:
        resumed.close()
    kinds = [type(e).__name__ for e in _events(run)]
    checks = [i for i, k in enumerate(kinds) if k == "ApprovalChecked"]
    assert checks and all(kinds[i - 1] == "ApprovalAsked" for i in checks)
