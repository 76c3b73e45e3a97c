"""The seed's Job between rounds: parameters replaced, nodes and training args changed, the
round limit raised, and the final validation-only round; each recorded, each surviving a
kill right after its event (resumed to the same final digest as an uninterrupted run).

Real nodes on the memory bus (tests/job_world.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from job_world import TRAINING_ARGS, experiment, make_world, researcher_bus, resume, run_events

from fedsm.core.events import JobCompleted, ParamsUploaded, RoundSent, SettingsChanged
from fedsm.log.writer import EventLog
from fedsm.researcher.errors import JobError, RefusedByLifecycle
from fedsm.researcher.experiment import Experiment
from fedsm.training.params import load_params
from fedsm.transport import MemoryBus

VALIDATING = {**TRAINING_ARGS, "test_ratio": 0.2, "test_on_global_updates": True}


def _bus(world) -> MemoryBus:
    return researcher_bus(world)


def _experiment(world, run: Path, **kwargs) -> Experiment:
    """The tests' default: a validating 2-round job, seed 5."""
    return experiment(
        world, run, **{"training_args": VALIDATING, "round_limit": 2, "seed": 5, **kwargs}
    )


_resume, _events = resume, run_events


@pytest.fixture
def world(tmp_path: Path):
    w = make_world(tmp_path, 3)
    yield w
    w.close()


# --------------------------------------------------------------------------- the script


def _halved(exp: Experiment) -> dict[str, torch.Tensor]:
    params = load_params(exp.final_params_path())
    return {k: v / 2 for k, v in params.items()}


def _script(exp: Experiment) -> str:
    """Round 1, then between rounds: new parameters, two of the three nodes, another lr;
    then the rest (round 2 and the final validation). Each step is skipped when the log
    already holds it, so the same script resumes a killed run."""
    job = exp.job
    if job.state.round == 0 or job.state.status.in_round:
        exp.run(rounds=1)
    events = _events(job.log_path.parent)
    if not any(isinstance(e, ParamsUploaded) and e.round == 1 for e in events):
        job.update_parameters(params=_halved(exp))
    if job.nodes != ["node-1", "node-2"]:
        job.nodes = ["node-2", "node-1"]
    if job.training_args.dict().get("lr") != 0.1:
        job.training_args = {**VALIDATING, "lr": 0.1}
    return exp.run()


def test_the_seed_changes_between_rounds_are_recorded_and_used(world, tmp_path: Path) -> None:
    exp = _experiment(world, tmp_path / "run")
    try:
        final = _script(exp)
        job = exp.job
        assert job.state.status == "completed"
    finally:
        exp.close()
    events = _events(tmp_path / "run")
    replaced = [e for e in events if isinstance(e, ParamsUploaded) and e.round == 1]
    assert len(replaced) == 1
    sent = [e for e in events if isinstance(e, RoundSent)]
    assert [(e.round, e.do_training) for e in sent] == [(1, True), (2, True), (3, False)]
    assert sent[1].params_sha256 == replaced[0].sha256  # round 2 trained from the new params
    assert sent[1].nodes == ("node-1", "node-2") and sent[0].nodes == ("node-1", "node-2", "node-3")
    changes = [e.changes for e in events if isinstance(e, SettingsChanged)]
    assert changes[0] == {"nodes": ["node-1", "node-2"]}
    assert changes[1]["training_args"]["lr"] == 0.1
    # the final validation: the nodes validated the final parameters and trained nothing
    validation = sent[2]
    assert validation.params_sha256 == final
    assert isinstance(events[-1], JobCompleted) and events[-1].round == 3
    summary = exp.history()[-1]
    assert summary["validation"] and summary["round"] == 3
    assert "global_val_accuracy" in summary["metrics"]


KILL_AFTER: list[tuple[str, Callable[[object], bool]]] = [
    ("ParamsUploaded", lambda e: isinstance(e, ParamsUploaded) and e.round == 1),
    ("SettingsChanged-nodes", lambda e: isinstance(e, SettingsChanged) and "nodes" in e.changes),
    (
        "SettingsChanged-args",
        lambda e: isinstance(e, SettingsChanged) and "training_args" in e.changes,
    ),
    ("RoundSent-validation", lambda e: isinstance(e, RoundSent) and not e.do_training),
    ("JobCompleted", lambda e: isinstance(e, JobCompleted)),
]


class Killed(BaseException):
    """A kill right after the chosen event is durable (not an Exception: nothing catches it)."""


def _kill_after(monkeypatch: pytest.MonkeyPatch, chosen: Callable[[object], bool]) -> None:
    append, append_all = EventLog.append, EventLog.append_all

    def after_one(self, event, *, ts):  # type: ignore[no-untyped-def]
        seq = append(self, event, ts=ts)
        if chosen(event):
            raise Killed(type(event).__name__)
        return seq

    def after_all(self, events, *, ts):  # type: ignore[no-untyped-def]
        seq = append_all(self, events, ts=ts)
        if any(chosen(e) for e in events):
            raise Killed("append_all")
        return seq

    monkeypatch.setattr(EventLog, "append", after_one)
    monkeypatch.setattr(EventLog, "append_all", after_all)


@pytest.mark.parametrize("point", [name for name, _ in KILL_AFTER])
def test_a_kill_right_after_each_new_event_resumes_to_the_same_bytes(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    reference = _experiment(world, tmp_path / "reference")
    try:
        expected = _script(reference)
    finally:
        reference.close()
    run = tmp_path / "run"
    exp = _experiment(world, run)
    with monkeypatch.context() as patch:
        _kill_after(patch, dict(KILL_AFTER)[point])
        with pytest.raises(Killed):
            _script(exp)
    exp.close()  # what the kernel does for a killed process: the log's lock goes
    resumed = _resume(world, run)
    try:
        assert _script(resumed) == expected
        assert resumed.job.state.status == "completed"
    finally:
        resumed.close()
    assert _events(run)[-1] == JobCompleted(round=3, params_sha256=expected)


def test_update_parameters_checks_before_it_records(world, tmp_path: Path) -> None:
    exp = _experiment(world, tmp_path / "run")
    try:
        job = exp.job
        seq = job.last_seq
        with pytest.raises(JobError, match="not parameters of the job's model"):
            job.update_parameters(params={"weight": torch.zeros(3)})
        with pytest.raises(JobError, match="params"):
            job.update_parameters()
        assert job.last_seq == seq
        path, url = job.update_parameters(params=_halved(exp))
        assert Path(path).is_file() and url == world.repository.url_for(job.params_sha256)
        assert job.last_seq == seq + 1
        # a file given wins over params (the seed's precedence)
        other, _ = job.update_parameters(params=_halved(exp), variable_name="other")
        path2, _url2 = job.update_parameters(params={"x": torch.zeros(1)}, filename=other)
        assert Path(path2).read_bytes() == Path(other).read_bytes()
        # not model parameters: kept and uploaded, the job unchanged
        seq = job.last_seq
        extra, extra_url = job.update_parameters(
            params={"c": torch.ones(2)}, is_model_params=False, variable_name="correction"
        )
        assert job.last_seq == seq and world.repository.exists(extra_url.rsplit("/", 1)[-1])
    finally:
        exp.close()


def test_settings_the_job_can_not_take_are_refused_unrecorded(world, tmp_path: Path) -> None:
    exp = _experiment(world, tmp_path / "run", min_nodes=2)
    try:
        job = exp.job
        seq = job.last_seq
        with pytest.raises(RefusedByLifecycle, match="no dataset"):
            job.nodes = ["node-1", "node-9"]
        with pytest.raises(RefusedByLifecycle, match="min_nodes"):
            job.nodes = ["node-1"]
        with pytest.raises(RefusedByLifecycle, match="behind"):
            job.change_settings(round_limit=0)
        assert job.last_seq == seq and job.nodes == ["node-1", "node-2", "node-3"]
        exp.run(rounds=1)
        with pytest.raises(RefusedByLifecycle, match="validation-only"):
            job.start_nodes_training_round(2, do_training=False)  # not the last round yet
    finally:
        exp.close()


def test_run_with_increase_raises_the_round_limit_and_reopens_a_completed_job(
    world, tmp_path: Path
) -> None:
    exp = _experiment(world, tmp_path / "run", round_limit=1, training_args=TRAINING_ARGS)
    try:
        exp.run()
        assert exp.job.state.status == "completed" and exp.round_limit == 1
        exp.run(rounds=2)  # nothing left and no increase: the seed runs nothing more
        assert exp.job.state.round == 1
        exp.run(rounds=2, increase=True)
        assert exp.job.state.status == "completed" and exp.job.state.round == 3
        assert exp.round_limit == 3
    finally:
        exp.close()
    # with a final validation: run(n, increase=True) ends completed too
    exp = _experiment(world, tmp_path / "run-validating", round_limit=1)
    try:
        exp.run(rounds=1)
        assert exp.job.state.status == "completed" and exp.job.state.round == 2
        exp.run(rounds=1, increase=True)  # round 3 trains, round 4 validates
        assert exp.job.state.status == "completed" and exp.job.state.round == 4
        assert [s["round"] for s in exp.history() if s["validation"]] == [2, 4]
    finally:
        exp.close()
    changes = [e.changes for e in _events(tmp_path / "run") if isinstance(e, SettingsChanged)]
    assert changes == [{"round_limit": 3}]


def test_the_seed_validation_call_with_the_last_rounds_number(world, tmp_path: Path) -> None:
    exp = _experiment(world, tmp_path / "run", round_limit=1, training_args=TRAINING_ARGS)
    try:
        job = exp.job
        job.check_training_plan_is_approved_by_nodes()
        job.start_nodes_training_round(1)
        digest = job.aggregate()
        assert job.state.status == "completed"  # no final validation asked for
    finally:
        exp.close()
    exp = _experiment(world, tmp_path / "run2", round_limit=1)
    try:
        job = exp.job
        job.check_training_plan_is_approved_by_nodes()
        job.start_nodes_training_round(1)
        digest = job.aggregate()
        assert job.state.status == "aggregated"  # test_on_global_updates: validation due
        replies = job.start_nodes_training_round(1, do_training=False)  # the seed's call
        assert sorted(replies) == ["node-1", "node-2", "node-3"]
        assert job.aggregate() == digest and job.state.status == "completed"
    finally:
        exp.close()


@pytest.mark.parametrize("again", [True, False])
def test_keep_files_dir_holds_the_files_and_a_resume_finds_them_or_fetches_them(
    world, tmp_path: Path, again: bool
) -> None:
    reference = _experiment(world, tmp_path / "reference")
    try:
        expected = reference.run()
    finally:
        reference.close()
    run, keep = tmp_path / "run", tmp_path / "kept"
    exp = _experiment(world, run, keep_files_dir=keep)
    try:
        exp.run(rounds=1)
        assert (keep / "training_plan.py").is_file() and any((keep / "params").iterdir())
        assert not (run / "files").exists()
    finally:
        exp.close()
    resumed = Experiment.resume(
        run,
        bus=_bus(world),
        repository=world.repository,
        progress=False,
        on_round=lambda s: None,
        keep_files_dir=keep if again else None,
    )
    try:
        assert resumed.run() == expected  # without it: every file fetched by digest
        assert resumed.final_params_path().is_file()
    finally:
        resumed.close()


def test_the_seeds_repo_last_msg_and_upload_aggregator_args(world, tmp_path: Path) -> None:
    exp = _experiment(world, tmp_path / "run", round_limit=1, training_args=TRAINING_ARGS)
    try:
        job = exp.job
        assert job.repo is job.repository is world.repository
        assert job.last_msg is None
        exp.run()
        assert job.last_msg is not None and job.last_msg.command == "train-reply"
        seq = job.last_seq
        correction = tmp_path / "correction.bin"
        correction.write_bytes(b"per-node state")
        msg = job.upload_aggregator_args(
            {"node-1": {"mu": 0.1}},
            {"node-1": {"c": {"w": torch.ones(2)}, "f": correction, "aggregator_name": "x"}},
        )
        assert msg["node-1"]["mu"] == 0.1 and "aggregator_name" not in msg["node-1"]
        for name in ("c", "f"):
            entry = msg["node-1"][name]
            assert entry["arg_name"] == name and Path(entry["filename"]).is_file()
            assert world.repository.exists(entry["sha256"])
            assert entry["url"] == world.repository.url_for(entry["sha256"])
        assert Path(msg["node-1"]["f"]["filename"]).read_bytes() == b"per-node state"
        assert job.last_seq == seq  # nothing about the job changed
    finally:
        exp.close()


def test_a_kill_right_after_the_round_limit_is_raised_resumes_to_the_same_bytes(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _experiment(world, tmp_path / "reference", round_limit=1)
    try:
        reference.run()
        expected = reference.run(rounds=1, increase=True)
    finally:
        reference.close()
    run = tmp_path / "run"
    exp = _experiment(world, run, round_limit=1)
    exp.run()
    with monkeypatch.context() as patch:
        _kill_after(patch, lambda e: isinstance(e, SettingsChanged))
        with pytest.raises(Killed):
            exp.run(rounds=1, increase=True)
    exp.close()
    resumed = _resume(world, run)  # the raised limit is in the log: run() carries on
    try:
        assert resumed.run() == expected and resumed.job.state.status == "completed"
    finally:
        resumed.close()
    assert [e for e in _events(run) if isinstance(e, SettingsChanged)] == [
        SettingsChanged(round=2, changes={"round_limit": 3})
    ]


def test_review_findings_stay_fixed(world, tmp_path: Path) -> None:
    """run(increase) with a round in flight; a reopened job announces its new end; the seed's
    upload_aggregator_args result passed as message args records a digest, not a path."""
    exp = _experiment(world, tmp_path / "run", round_limit=1, training_args=TRAINING_ARGS)
    try:
        job = exp.job
        job.check_training_plan_is_approved_by_nodes()
        job.step(max_wait_s=0.0)  # round 1 in flight
        assert job.state.status.in_round
        exp.run(rounds=2, increase=True)  # finishes round 1, then raises the limit for round 2
        assert job.state.status == "completed" and job.state.round == 2
        heads_before = job.last_seq
        exp.run(rounds=1, increase=True)  # reopens: its new end must reach the nodes again
        assert job.state.status == "completed" and job.state.round == 3
        assert job.last_seq > heads_before
        for node in world.nodes:
            witnessed = max(h.seq for h in node.witness.heads(job.id))
            assert witnessed == job.last_seq, node.node_id
    finally:
        exp.close()
    exp = _experiment(world, tmp_path / "run2", round_limit=1, training_args=TRAINING_ARGS)
    try:
        job = exp.job
        job.check_training_plan_is_approved_by_nodes()
        msg = job.upload_aggregator_args({}, {n: {"c": {"w": torch.ones(2)}} for n in job.nodes})
        job.start_nodes_training_round(1, aggregator_args_thr_msg=msg)
        sent = [e for e in _events(tmp_path / "run2") if isinstance(e, RoundSent)][0]
        for args in sent.aggregator_args.values():
            assert set(args["c"]) == {"sha256"}, args  # no path, no URL in the log
        raw = (tmp_path / "run2" / "job.log").read_bytes()
        assert str(tmp_path).encode() not in raw and b"file://" not in raw
    finally:
        exp.close()
