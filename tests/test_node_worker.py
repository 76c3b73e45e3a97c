"""The worker-process executor: a plan that raises, hangs past the limit or kills its worker
gets the right error code, the node keeps serving, and the next request trains (and gives the
same bytes as training in-process)."""

from __future__ import annotations

import os

import pytest
from plans import Researcher, head, initial_params, plan_bytes, train_request, write_csv

from fedsm.core.messages import ErrorReply, PingReply, PingRequest, TrainReply
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.node.executor import InProcessTrainingExecutor, TrainingTask
from fedsm.node.node import Node
from fedsm.node.process_executor import ProcessTrainingExecutor
from fedsm.node.settings import init_node_dir
from fedsm.node.simulate import register_csv_dataset
from fedsm.repository import LocalRepository
from fedsm.transport import MemoryBroker, MemoryBus

NODE = "node-w"
TIME_LIMIT_S = 2.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    broker = MemoryBroker()
    repo = LocalRepository(tmp / "repo")
    node_dir = tmp / NODE
    settings = init_node_dir(node_dir, NODE, training_time_limit_s=TIME_LIMIT_S)
    executor = ProcessTrainingExecutor(time_limit_s=60)  # the node passes its own limit
    node = Node(
        node_dir,
        bus=MemoryBus(broker, NODE, role="node"),
        repository=repo,
        settings=settings,
        executor=executor,
    ).start()
    dataset = register_csv_dataset(
        node, write_csv(tmp / "d.csv"), name="d", tags=["t"], target="target"
    )
    plans = plan_bytes("failing_plans.py")
    node.plans.decide("approved", source=plans, by="test")
    params = initial_params(repo, plans, "GoodPlan", tmp)
    researcher = Researcher(broker)

    def ask(plan_class: str):
        request = train_request(NODE, dataset["dataset_id"], repo, plans, plan_class, params, tmp)
        return researcher.ask(NODE, request, timeout_s=90)

    yield node, executor, ask, researcher
    researcher.close()
    node.stop()
    executor.close()


def _check_failure_then_recovery(world, plan_class: str, code: ErrorNumber) -> None:
    node, executor, ask, researcher = world
    reply = ask(plan_class)
    assert isinstance(reply, ErrorReply), reply
    assert reply.error_number is code, reply.message
    assert reply.job_id == "job-test" and reply.round == 0
    pong = researcher.ask(NODE, PingRequest(**head(NODE)))
    assert isinstance(pong, PingReply)
    assert isinstance(ask("GoodPlan"), TrainReply)


def test_plan_that_raises(world):
    _, executor, _, _ = world
    executor.start()
    pid = executor.worker_pid
    _check_failure_then_recovery(world, "RaisingPlan", ErrorNumber.TRAINING_FAILED)
    assert executor.worker_pid == pid  # an exception does not cost the worker


def test_plan_that_hangs_past_the_limit(world):
    _, executor, _, _ = world
    executor.start()  # also when this test runs alone
    pid = executor.worker_pid
    _check_failure_then_recovery(world, "HangingPlan", ErrorNumber.TRAINING_TIMED_OUT)
    assert executor.worker_pid != pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the hung worker is gone, not left running


@pytest.mark.parametrize("plan_class", ["ExitingPlan", "SelfKillingPlan"])
def test_plan_that_kills_its_worker(world, plan_class):
    _, executor, _, _ = world
    executor.start()
    pid = executor.worker_pid
    _check_failure_then_recovery(world, plan_class, ErrorNumber.WORKER_CRASHED)
    assert executor.worker_pid != pid


def test_worker_and_in_process_training_give_the_same_bytes(world, tmp_path):
    _, executor, _, _ = world
    source = plan_bytes("linear_plan.py")
    repo = LocalRepository(tmp_path / "repo")
    params = initial_params(repo, source, "LinearPlan", tmp_path)
    _, params_path = repo.download_file(params["file"], tmp_path / "p.safetensors")
    csv = write_csv(tmp_path / "d.csv", seed=3)
    digests = []
    with InProcessTrainingExecutor() as in_process:
        for index, runner in enumerate((executor, in_process)):
            task = TrainingTask(
                plan_source=source.decode(),
                plan_class="LinearPlan",
                model_args={"in_features": 3},
                training_args={"epochs": 2, "batch_size": 5},
                params_path=str(params_path),
                dataset={"data_type": "csv", "path": str(csv), "target": "target"},
                seed=7,
                out_path=str(tmp_path / f"out{index}.safetensors"),
            )
            digests.append(runner.train(task).params_sha256)
    assert digests[0] == digests[1]
    assert (tmp_path / "out0.safetensors").read_bytes() == (
        tmp_path / "out1.safetensors"
    ).read_bytes()


def test_worker_is_recycled_after_its_quota(tmp_path):
    source = plan_bytes("linear_plan.py")
    repo = LocalRepository(tmp_path / "repo")
    params = initial_params(repo, source, "LinearPlan", tmp_path)
    _, params_path = repo.download_file(params["file"], tmp_path / "p.safetensors")
    csv = write_csv(tmp_path / "d.csv")
    pids, digests = [], []
    with ProcessTrainingExecutor(max_trainings_per_worker=1) as executor:
        for index in range(2):
            task = TrainingTask(
                plan_source=source.decode(),
                plan_class="LinearPlan",
                model_args={"in_features": 3},
                training_args={"batch_size": 8},
                params_path=str(params_path),
                dataset={"data_type": "csv", "path": str(csv), "target": "target"},
                seed=1,
                out_path=str(tmp_path / f"out{index}.safetensors"),
            )
            digests.append(executor.train(task).params_sha256)
            pids.append(executor.worker_pid)
    assert pids[0] != pids[1]
    assert digests[0] == digests[1]  # a new worker trains the same bytes


def test_validation_task_in_the_worker_matches_in_process(world, tmp_path):
    _, executor, _, _ = world
    source = plan_bytes("linear_plan.py")
    repo = LocalRepository(tmp_path / "repo")
    params = initial_params(repo, source, "LinearPlan", tmp_path)
    _, params_path = repo.download_file(params["file"], tmp_path / "p.safetensors")
    csv = write_csv(tmp_path / "d.csv", seed=3)
    outcomes = []
    with InProcessTrainingExecutor() as in_process:
        for index, runner in enumerate((executor, in_process)):
            task = TrainingTask(
                plan_source=source.decode(),
                plan_class="LinearPlan",
                model_args={"in_features": 3},
                training_args={"batch_size": 5, "test_ratio": 0.5, "test_metric": "RECALL"},
                params_path=str(params_path),
                dataset={"data_type": "csv", "path": str(csv), "target": "target"},
                seed=7,
                out_path=str(tmp_path / f"out{index}.safetensors"),
                do_training=False,
            )
            outcomes.append(runner.train(task))
            assert not (tmp_path / f"out{index}.safetensors").exists()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].params_sha256 == params["sha256"]
    assert outcomes[0].sample_size == 12
    assert set(outcomes[0].metrics) == {
        "global_val_accuracy",
        "global_val_loss",
        "global_val_recall",
    }
