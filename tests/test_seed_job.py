"""The seed's Job surface, called with the seed's names and arguments, against real nodes.

Each test calls one name of Fed-BioMed's ``Job`` (or ``FederatedDataSet``) as a seed user
would, and checks the seed's result: ``training_replies``, ``training_plan``, aggregator
args through messages and files, ``shapes``/``sample_sizes``, ``validate_minimal_arguments``
and the data quality check a Job runs when it is built.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from job_world import TRAINING_ARGS, make_world

from fedsm.core.events import NodeFailed, ParamsUploaded, ReplyReceived, RoundSent
from fedsm.digests import sha256_file
from fedsm.log.read import scan
from fedsm.researcher.errors import DataQualityCheckError, JobError
from fedsm.researcher.job import Job
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.training.params import load_params
from fedsm.training.plan import TorchTrainingPlan
from fedsm.transport import MemoryBus

SEED_KEYS = {
    "success",
    "msg",
    "node_id",
    "dataset_id",
    "params_path",
    "params",
    "timing",
    "sample_size",
    "metrics",
}
VALIDATING = {**TRAINING_ARGS, "test_ratio": 0.25, "test_on_global_updates": True}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    w = make_world(tmp_path_factory.mktemp("world"), 3)
    yield w
    w.close()


def _bus(world) -> MemoryBus:
    """The researcher's bus, as a new process would connect it (the previous one is gone)."""
    for thing in world.extra:
        if isinstance(thing, MemoryBus) and thing.participant_id == "researcher-test":
            thing.close()
    return world.researcher()


def _data(world) -> FederatedDataSet:
    return FederatedDataSet({n.node_id: dict(n.datasets.list()[0]) for n in world.nodes})


def _job(world, run_dir: Path, **kwargs) -> Job:
    """A Job built with the seed's arguments (plus where it keeps its log and files)."""
    kwargs = {"training_args": TRAINING_ARGS, "round_limit": 1, "reply_deadline_s": 30.0, **kwargs}
    data = kwargs.pop("data", None) or _data(world)
    return Job(
        reqs=Requests(_bus(world), default_deadline_s=5.0),
        nodes=None,
        training_plan_class="BreastCancerPlan",
        training_plan_path=str(world.plan),
        model_args={},
        data=data,
        run_dir=run_dir,
        repository=world.repository,
        **kwargs,
    )


def _record_times(log_path: Path) -> tuple[dict[int, float], dict[tuple[int, str], float]]:
    sent: dict[int, float] = {}
    answered: dict[tuple[int, str], float] = {}
    for record in scan(log_path).records:
        event = record.event
        if isinstance(event, RoundSent):
            sent[event.round] = record.ts
        elif isinstance(event, (ReplyReceived, NodeFailed)):
            answered[(event.round, event.node_id)] = record.ts
    return sent, answered


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory: pytest.TempPathFactory):
    """One round trained, then the seed's final validation (``do_training=False``)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    job = _job(world, run, training_args=VALIDATING)
    job.check_training_plan_is_approved_by_nodes()
    job.start_nodes_training_round(1, aggregator_args_thr_msg={}, aggregator_args_thr_files={})
    job.aggregate()
    assert job.state.final_validation_due
    job.start_nodes_training_round(1, {}, {}, do_training=False)  # the seed's numbering
    job.aggregate()
    assert job.state.status == "completed" and job.state.validation_rounds == (2,)
    yield job
    job.close()


def test_training_replies_have_the_seed_keys_per_round_and_node(finished, world) -> None:
    job = finished
    replies = job.training_replies
    assert sorted(replies) == [1, 2]  # the validation-only round too
    sent, answered = _record_times(job.log_path)
    dataset_ids = _data(world).dataset_ids()
    for rnd in (1, 2):
        assert sorted(replies[rnd]) == ["node-1", "node-2", "node-3"]
        for node, entry in replies[rnd].items():
            assert SEED_KEYS <= set(entry) and {"params_url", "params_sha256"} <= set(entry)
            event = job.state.replies[rnd][node]
            assert entry["success"] is True and entry["msg"] == ""
            assert entry["node_id"] == node and entry["dataset_id"] == dataset_ids[node]
            assert entry["sample_size"] == event.sample_size > 0
            assert entry["metrics"] == dict(event.metrics)
            assert entry["params_sha256"] == event.params_sha256
            assert entry["params_url"] == world.repository.url_for(event.params_sha256)
            timing = entry["timing"]
            assert {k: v for k, v in timing.items() if k != "rtime_total"} == dict(event.timing)
            assert timing["rtime_total"] == answered[(rnd, node)] - sent[rnd] > 0
    for entry in replies[1].values():  # a trained round: the node's parameters
        assert entry["params_path"] == job.params_path(entry["params_sha256"])
        expected = load_params(entry["params_path"])
        assert entry["params"].keys() == expected.keys()
        assert all(torch.equal(entry["params"][k], expected[k]) for k in expected)
    for entry in replies[2].values():  # validation only: metrics, no parameters
        assert entry["params_path"] is None and entry["params"] is None
        assert entry["metrics"]


def test_training_replies_load_params_on_first_access_only(finished, monkeypatch) -> None:
    import fedsm.training.params as params_module

    loads: list[Path] = []
    real = params_module.load_params

    def counting(path, *args, **kwargs):
        loads.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(params_module, "load_params", counting)
    replies = finished.training_replies
    entry = replies[1]["node-2"]
    assert loads == [] and "node-2" in repr(entry)  # building and printing load nothing
    first = entry["params"]
    assert entry["params"] is first and loads == [entry["params_path"]]
    again = finished.training_replies[1]["node-2"]  # rebuilt: not kept for every round
    assert again["params"] is not first and len(loads) == 2


def test_training_replies_are_the_same_after_close_and_restore(finished, world) -> None:
    before = {
        rnd: {n: (e["timing"], e["params_sha256"], e["metrics"]) for n, e in nodes.items()}
        for rnd, nodes in finished.training_replies.items()
    }
    finished.close()  # read from the log file once the writer is closed
    after_close = {
        rnd: {n: (e["timing"], e["params_sha256"], e["metrics"]) for n, e in nodes.items()}
        for rnd, nodes in finished.training_replies.items()
    }
    assert after_close == before
    restored = Job.restore(
        finished.log_path.parent, reqs=Requests(_bus(world)), repository=world.repository
    )
    try:
        again = {
            rnd: {n: (e["timing"], e["params_sha256"], e["metrics"]) for n, e in nodes.items()}
            for rnd, nodes in restored.training_replies.items()
        }
        assert again == before
    finally:
        restored.close()


def test_a_failed_node_is_in_training_replies_with_its_error(tmp_path: Path) -> None:
    world = make_world(tmp_path, 3)
    try:
        job = _job(world, tmp_path / "run", min_nodes=2)
        try:
            Path(world.nodes[2].datasets.list()[0]["path"]).unlink()  # its data disappeared
            job.check_training_plan_is_approved_by_nodes()
            replies = job.start_nodes_training_round(1, {}, {})
            failed = job.state.failures[1]["node-3"]
            entry = replies["node-3"]
            assert SEED_KEYS <= set(entry)
            assert entry["success"] is False and entry["msg"] == failed.message != ""
            assert entry["params_path"] is None and entry["params"] is None
            assert entry["node_id"] == "node-3" and entry["dataset_id"] == "dataset-node-3"
            sent, answered = _record_times(job.log_path)
            assert entry["timing"]["rtime_total"] == answered[(1, "node-3")] - sent[1]
            assert [n for n, e in replies.items() if e["success"]] == ["node-1", "node-2"]
            assert job.training_replies[1]["node-3"]["msg"] == failed.message
        finally:
            job.close()
    finally:
        world.close()


def test_training_plan_is_a_ready_instance_of_the_uploaded_source(finished) -> None:
    job = finished
    plan = job.training_plan
    assert isinstance(plan, TorchTrainingPlan) and job.training_plan is plan  # built once
    assert type(plan).__name__ == job.training_plan_name == "BreastCancerPlan"
    assert plan.source() == Path(job.training_plan_file).read_text()  # the exact upload
    assert sha256_file(job.training_plan_file) == job.state.plan_sha256
    assert plan.model_args() == job.model_args
    assert plan.training_args()["lr"] == VALIDATING["lr"]
    assert plan.training_args()["test_on_global_updates"] is True
    initial = next(
        r.event.sha256
        for r in scan(job.log_path).records
        if isinstance(r.event, ParamsUploaded) and r.event.round == 0
    )
    expected = load_params(job.params_path(initial))  # post_init seeded as the job's model
    got = plan.get_params()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_aggregator_args_through_files_are_only_tensors_and_paths(world, tmp_path: Path) -> None:
    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"aggregator state")
    job = _job(world, tmp_path / "run")
    try:
        job.check_training_plan_is_approved_by_nodes()
        nodes = job.nodes
        seq = job.last_seq
        with pytest.raises(JobError, match="aggregator args can not be sent"):
            job.start_nodes_training_round(1, {}, {nodes[0]: {"bad": {1, 2}}})
        assert job.last_seq == seq and job.state.round == 0  # nothing recorded
        thr_msg = {n: {"aggregator_name": "fedprox", "mu": 0.1} for n in nodes}
        thr_files = {
            n: {
                "correction": {"w": torch.full((2,), float(i))},
                "state_file": extra,
                "strategy": "scaffold",
                "path_as_str": str(extra),  # a str is a value, even naming a file
                "steps": [1, 2, 3],
                "lr": 0.5,
            }
            for i, n in enumerate(nodes)
        }
        job.start_nodes_training_round(1, thr_msg, thr_files)
        sent = next(r.event for r in scan(job.log_path).records if isinstance(r.event, RoundSent))
        for i, node in enumerate(nodes):
            args = sent.aggregator_args[node]
            assert args["aggregator_name"] == "fedprox" and args["mu"] == 0.1
            assert args["strategy"] == "scaffold" and args["path_as_str"] == str(extra)
            assert args["steps"] == [1, 2, 3] and args["lr"] == 0.5
            assert set(args["correction"]) == {"sha256"} and set(args["state_file"]) == {"sha256"}
            assert args["state_file"]["sha256"] == sha256_file(extra)
            tensors = job._files.aggregator(args["correction"]["sha256"])
            assert torch.equal(load_params(tensors)["w"], torch.full((2,), float(i)))
            for digest in (args["state_file"]["sha256"], args["correction"]["sha256"]):
                assert world.repository.exists(digest)  # uploaded before the request named it
    finally:
        job.close()


def test_shapes_and_sample_sizes_are_the_seeds(world) -> None:
    reqs = Requests(_bus(world), default_deadline_s=5.0)
    found = reqs.search(["breast-cancer"])
    data = found.data()
    assert found.sample_sizes() == [data[n]["shape"][0] for n in found.node_ids()]
    assert found.shapes() == {n: data[n]["shape"][0] for n in found.node_ids()}
    assert found.sample_sizes() == [data[n]["sample_count"] for n in found.node_ids()]
    assert all(size > 0 for size in found.sample_sizes())


def test_validate_minimal_arguments_is_the_seeds(finished, world) -> None:
    job = finished
    state = job.state
    args = {
        "training_plan_url": world.repository.url_for(state.plan_sha256),
        "training_plan_class": job.training_plan_name,
        "params_url": world.repository.url_for(state.params_sha256),
    }
    fields = ["training_plan_url", "training_plan_class", "params_url"]
    assert Job.validate_minimal_arguments(args, fields) is True
    assert job.validate_minimal_arguments(args, fields) is True
    assert Job.validate_minimal_arguments({**args, "params_url": None}, fields) is False
    assert Job.validate_minimal_arguments({"training_plan_class": "X"}, fields) is False
    for bad in ("not a url", "ftp://host/x", "file://relative/x", "http://", "params.pt"):
        assert Job.validate_minimal_arguments({**args, "params_url": bad}, fields) is False
    http = {**args, "params_url": "https://repo.example:8443/files/" + "a" * 64}
    assert Job.validate_minimal_arguments(http, fields) is True


def test_a_job_runs_the_seeds_data_quality_check(world, tmp_path: Path) -> None:
    entries = _data(world).data()
    odd = dict(entries["node-3"])
    odd["shape"] = [odd["shape"][0], odd["shape"][1] + 1]
    odd["dtypes"] = [*odd["dtypes"], "object"]
    run = tmp_path / "run"
    with pytest.raises(DataQualityCheckError, match="node-3"):
        _job(world, run, data=FederatedDataSet({**entries, "node-3": odd}))
    assert not (run / "job.log").exists()  # refused before anything was written
