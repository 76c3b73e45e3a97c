"""The worker-process executor: a plan that raises, hangs past the limit or kills its worker
gets the right error code, the node keeps serving, and the next request trains (and gives the
same bytes as training in-process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from plans import Researcher, head, initial_params, plan_bytes, train_request, write_csv

from fedsm.core.messages import ErrorReply, PingReply, PingRequest, TrainReply
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.node.errors import TrainingTimedOut, WorkerCrashed
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


# --------------------------------------------------------------------------- the worker process
#
# The worker is `python -m fedsm.node.worker_main` speaking length-prefixed msgpack on its
# stdin/stdout. What a plan does to fds 0 and 1 must not reach the protocol; what a broken or
# hostile worker writes must give a typed error at once; no worker is left behind.

PRINTING_PLAN = """

import os as _os
import sys as _sys


class PrintingPlan(LinearPlan):
    def training_step(self, data, target):
        print("a plan's print")
        _sys.stdout.write("sys.stdout.write\\n")
        _sys.__stdout__.write("sys.__stdout__.write\\n")
        _os.write(1, b"\\xff\\xff\\xff\\xff raw bytes on fd 1\\n")
        assert _sys.stdin.read() == ""  # stdin is /dev/null, not the node's frames
        return super().training_step(data, target)
"""


def _linear_task(tmp_path, *, source=None, plan_class="LinearPlan", name="out", **fields):
    source = plan_bytes("linear_plan.py") if source is None else source
    repo = LocalRepository(tmp_path / "repo")
    params = initial_params(repo, plan_bytes("linear_plan.py"), "LinearPlan", tmp_path)
    _, params_path = repo.download_file(params["file"], tmp_path / "p.safetensors")
    csv = write_csv(tmp_path / "d.csv", seed=3)
    args = dict(
        plan_source=source.decode(),
        plan_class=plan_class,
        model_args={"in_features": 3},
        training_args={"epochs": 2, "batch_size": 5},
        params_path=str(params_path),
        dataset={"data_type": "csv", "path": str(csv), "target": "target"},
        seed=7,
        out_path=str(tmp_path / f"{name}.safetensors"),
    )
    args.update(fields)
    return TrainingTask(**args)


def _gone(pid: int) -> bool:
    """The process has ended and been reaped (or is a zombie of someone else's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] == "Z"


def _wait_gone(pid: int, within_s: float) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def test_a_plan_that_prints_or_reads_stdin_does_not_touch_the_protocol(world, tmp_path):
    _, executor, _, _ = world
    source = plan_bytes("linear_plan.py") + PRINTING_PLAN.encode()
    printing = executor.train(_linear_task(tmp_path, source=source, plan_class="PrintingPlan"))
    plain = executor.train(_linear_task(tmp_path, name="plain"))
    assert printing.params_sha256 == plain.params_sha256


def test_the_worker_inherits_no_unrelated_file_descriptor(tmp_path):
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    os.set_inheritable(write_end, True)
    ours = {os.readlink(f"/proc/self/fd/{read_end}")}
    executor = ProcessTrainingExecutor(preload=False)
    try:
        executor.start()
        pid = executor.worker_pid
        links = {
            int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
        }
        assert not ours & set(links.values()), links
        assert links[0] == "/dev/null"  # a plan reading stdin gets nothing
        assert links[1] == links[2]  # fd 1 is the log, not the protocol pipe
        to_node = os.readlink(f"/proc/self/fd/{executor._worker.proc.stdout.fileno()}")
        assert to_node in links.values() and to_node not in (links[1], links[2])
    finally:
        executor.close()
        os.close(read_end)
        os.close(write_end)
    assert _gone(pid)


# A stand-in worker (`python -c FAKE_WORKER KIND PIDFILE`) that misbehaves in one way.
FAKE_WORKER = r"""
import os, struct, sys, time
import msgpack

kind, pidfile = sys.argv[1], sys.argv[2]
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))

def frame(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body

if kind == "garbage-at-start":
    os.write(1, b"Traceback (most recent call last): not a frame\n")
    time.sleep(60)
if kind == "silent":
    time.sleep(60)
os.write(1, frame({"kind": "ready", "pid": os.getpid()}))
if kind == "oversized":
    os.write(1, struct.pack(">I", 512 << 20) + b"\x00" * 100)
elif kind == "not-msgpack":
    os.write(1, struct.pack(">I", 5) + b"\xc1" * 5)
elif kind == "not-a-map":
    os.write(1, frame([1, 2, 3]))
elif kind == "half-a-frame":
    os.write(1, struct.pack(">I", 100) + b"x" * 10)
elif kind == "replies-then-exits":
    (length,) = struct.unpack(">I", sys.stdin.buffer.read(4))
    sys.stdin.buffer.read(length)  # the task
    reply = {"kind": "ok", "params_sha256": "0" * 64, "sample_size": 1, "metrics": {}}
    os.write(1, frame(reply))
    os._exit(0)
elif kind == "exits":
    os.write(1, struct.pack(">I", 100) + b"x" * 10)
    os._exit(3)
time.sleep(60)
"""


@pytest.fixture
def fake_worker(monkeypatch, tmp_path):
    """``start(kind)`` -> an executor whose worker is FAKE_WORKER; the fake's PID is read from
    its pid file; every fake is checked to be killed and reaped."""
    from fedsm.node import process_executor

    pidfiles = []

    def start(kind: str, **kwargs):
        pidfile = tmp_path / f"{kind}.pid"
        pidfiles.append(pidfile)
        monkeypatch.setattr(
            process_executor,
            "_worker_command",
            lambda preload: [sys.executable, "-c", FAKE_WORKER, kind, str(pidfile)],
        )
        return ProcessTrainingExecutor(preload=False, **kwargs)

    yield start
    for pidfile in pidfiles:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"fake worker {pid} was left running")


def test_a_worker_dead_before_reading_its_task_is_reported_with_its_last_words(
    fake_worker, tmp_path
):
    """The task is larger than a pipe holds, so the node is still sending when the worker
    (which never reads) dies: what the worker wrote is read and named all the same."""
    executor = fake_worker("exits")
    try:
        task = _linear_task(tmp_path, source=plan_bytes("linear_plan.py") + b"#" * 300_000)
        with pytest.raises(WorkerCrashed, match="exit code 3, after 14 bytes of an unfinished"):
            executor.train(task, time_limit_s=5.0)
    finally:
        executor.close()


@pytest.mark.parametrize(
    ("kind", "error", "words"),
    [
        ("oversized", WorkerCrashed, "exceeds the limit"),
        ("not-msgpack", WorkerCrashed, "not msgpack"),
        ("not-a-map", WorkerCrashed, "not a map"),
        ("exits", WorkerCrashed, "exit code 3, after 14 bytes of an unfinished frame"),
        ("half-a-frame", TrainingTimedOut, "limit of 1 s"),
    ],
)
def test_a_worker_writing_garbage_is_a_typed_error_not_a_hang(
    fake_worker, tmp_path, kind, error, words
):
    executor = fake_worker(kind)
    try:
        started = time.monotonic()
        with pytest.raises(error, match=words):
            executor.train(_linear_task(tmp_path), time_limit_s=1.0)
        assert time.monotonic() - started < 15
        pid = int((tmp_path / f"{kind}.pid").read_text())
        assert _gone(pid)  # killed by PID and reaped
        assert executor.worker_pid is None
    finally:
        executor.close()


@pytest.mark.parametrize(
    ("kind", "words"),
    [("garbage-at-start", "sent garbage while starting"), ("silent", "did not start within")],
)
def test_a_worker_that_does_not_say_ready_is_a_typed_error(fake_worker, tmp_path, kind, words):
    executor = fake_worker(kind, start_timeout_s=2.0)
    try:
        started = time.monotonic()
        with pytest.raises(WorkerCrashed, match=words):
            executor.start()
        assert time.monotonic() - started < 15
        assert _gone(int((tmp_path / f"{kind}.pid").read_text()))
    finally:
        executor.close()


def test_a_reply_written_just_before_the_worker_exits_is_read(fake_worker, tmp_path):
    """The worker's last words count, even when it is already gone when the node looks."""
    executor = fake_worker("replies-then-exits")
    try:
        outcome = executor.train(_linear_task(tmp_path), time_limit_s=30)
        assert outcome.params_sha256 == "0" * 64 and outcome.sample_size == 1
        assert _wait_gone(int((tmp_path / "replies-then-exits.pid").read_text()), 10)
    finally:
        executor.close()


HANGING_WITH_MARKER = """

class MarkingHangingPlan(_Base):
    def training_step(self, data, target):
        open(MARKER_PATH, "w").close()
        time.sleep(3600)
"""


def test_close_without_wait_kills_a_running_training(tmp_path):
    marker = tmp_path / "training-started"
    source = (
        plan_bytes("failing_plans.py")
        + HANGING_WITH_MARKER.replace("MARKER_PATH", repr(str(marker))).encode()
    )
    task = _linear_task(tmp_path, source=source, plan_class="MarkingHangingPlan")
    executor = ProcessTrainingExecutor(preload=False)
    executor.start()
    pid = executor.worker_pid
    errors = []

    def train():
        try:
            executor.train(task, time_limit_s=120)
        except Exception as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    try:
        end = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < end:
            time.sleep(0.05)
        assert marker.exists()
        started = time.monotonic()
        executor.close(wait=False)
        thread.join(15)
        assert not thread.is_alive()
        assert time.monotonic() - started < 15
        assert len(errors) == 1 and isinstance(errors[0], WorkerCrashed), errors
        assert _gone(pid)
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


NODE_THAT_DIES = """
import sys, time
from fedsm.node.process_executor import ProcessTrainingExecutor
executor = ProcessTrainingExecutor(preload=False)
executor.start()
print(executor.worker_pid, flush=True)
time.sleep(120)
"""


def test_the_worker_ends_when_its_node_is_killed():
    node = subprocess.Popen(
        [sys.executable, "-c", NODE_THAT_DIES], stdout=subprocess.PIPE, text=True
    )
    worker_pid = None
    try:
        worker_pid = int(node.stdout.readline())
        assert not _gone(worker_pid)
        node.kill()
        node.wait(10)
        assert _wait_gone(worker_pid, 10), "the worker outlived its node"
    finally:
        node.kill()
        node.wait(10)
        node.stdout.close()
        if worker_pid is not None and not _gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
