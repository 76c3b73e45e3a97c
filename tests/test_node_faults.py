"""A node under faults of its own machine and under a participant who claims request ids.

* Disk full (injected, :mod:`faults`) at four points of a train request: the scratch
  directory, a download written into it, the training's parameters file, the upload into a
  local repository. Each is answered ``NODE_IO_ERROR`` with one line naming the file, nothing
  is cached, no traceback is logged; once space is back the same request (same id) trains.
* The registry locked by another process past the busy timeout: ``NODE_BUSY``, then served.
* The error mapping of the training layer (what the worker process reports too), by the
  exception's chain.
* A request sent under the id of another one (another researcher's, or other content; before
  it, or while it runs) is served as its own: it never answers nor blocks the genuine one.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from faults import FaultyDisk, under
from plans import (
    RESEARCHER,
    Researcher,
    initial_params,
    plan_bytes,
    sha256,
    train_request,
    write_csv,
)

from fedsm.core.messages import ErrorReply, TrainReply
from fedsm.core.protocol import encode
from fedsm.core.protocol_errors import TRANSIENT_ERRORS, ErrorNumber
from fedsm.node.database import DB_FILE, RegistryIOError
from fedsm.node.errors import RegistryBusy
from fedsm.node.executor import InProcessTrainingExecutor, error_code_for
from fedsm.node.node import Node, cache_key, failure
from fedsm.node.registry import PlanTooLarge
from fedsm.node.settings import init_node_dir, load_settings
from fedsm.node.simulate import register_csv_dataset
from fedsm.repository import LocalRepository
from fedsm.transport import MemoryBroker, MemoryBus

NODE = "node-f"
EVIL = "researcher-evil"


@pytest.fixture
def executor(request):
    """One per test: a lane of a stopped node (same node id) never delays the next test.
    Parameters travel as bytes (the default) unless the test is parametrized with
    ``in_memory`` False (through scratch files, as with a worker process)."""
    in_memory = getattr(request, "param", True)
    with InProcessTrainingExecutor(in_memory=in_memory) as own:
        yield own


class World:
    def __init__(self, tmp: Path, executor: InProcessTrainingExecutor, **settings) -> None:
        self.tmp = tmp
        self.broker = MemoryBroker()
        self.repo = LocalRepository(tmp / "repo")
        self.node_dir = tmp / NODE
        init_node_dir(self.node_dir, NODE)
        self.settings = dataclasses.replace(load_settings(self.node_dir, env={}), **settings)
        self.node = Node(
            self.node_dir,
            bus=MemoryBus(self.broker, NODE, role="node"),
            repository=self.repo,
            settings=self.settings,
            executor=executor,
        ).start()
        self.dataset = register_csv_dataset(
            self.node, write_csv(tmp / "data.csv"), name="d", tags=["x"], target="target"
        )
        self.researcher = Researcher(self.broker)
        self.evil = Researcher(self.broker, EVIL)
        self.linear = plan_bytes("linear_plan.py")
        self.node.plans.decide("approved", source=self.linear, by="test")
        self.params = initial_params(self.repo, self.linear, "LinearPlan", tmp)

    def train(self, plan: bytes | None = None, plan_class: str = "LinearPlan", **extra):
        return train_request(
            NODE,
            self.dataset["dataset_id"],
            self.repo,
            self.linear if plan is None else plan,
            plan_class,
            self.params,
            self.tmp,
            **extra,
        )

    def close(self) -> None:
        self.researcher.close()
        self.evil.close()
        self.node.stop()


@pytest.fixture
def world(tmp_path, executor):
    w = World(tmp_path, executor)
    yield w
    w.close()


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks


# --------------------------------------------------------------------------- disk full


def _points(world: World) -> dict[str, object]:
    work = world.node_dir / "work"
    return {
        "scratch directory": under(work),
        "download into the scratch directory": under(work, name_prefix=".part-"),
        "parameters file": under(work, name_prefix=".params_out"),
        "upload into the local repository": under(world.repo.root, name_prefix=".part-"),
    }


@pytest.mark.parametrize(
    ("point", "executor"),
    [
        (point, in_memory)
        for in_memory in (True, False)
        for point in (
            "scratch directory",  # the plan's download: a file in either mode
            "download into the scratch directory",
            "parameters file",  # written by a training through files only
            "upload into the local repository",
        )
        if in_memory is False or point != "parameters file"
    ],
    indirect=["executor"],
)
def test_disk_full_is_node_io_error_then_the_same_request_trains(world, caplog, point):
    caplog.set_level(logging.INFO)
    request = world.train()
    with FaultyDisk() as disk:
        disk.fill(point, _points(world)[point])
        reply = world.researcher.ask(NODE, request)
        assert disk.hits[point] >= 1
        assert isinstance(reply, ErrorReply), reply
        assert reply.error_number is ErrorNumber.NODE_IO_ERROR, reply.message
        assert reply.error_number in TRANSIENT_ERRORS
        assert "No space left on device" in reply.message and "disk full" in reply.message
        assert "\n" not in reply.message
        assert len(world.node.replies) == 0  # an error is never cached
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("NODE_IO_ERROR" in r.getMessage() for r in warned), warned
        _no_traceback(caplog)

        disk.free()  # the operator made room
        again = world.researcher.ask(NODE, request)  # the same request id, re-sent
    assert isinstance(again, TrainReply), again
    assert world.node.trainings_run == 2
    assert len(world.node.replies) == 1
    # answered from the cache from now on
    assert encode(world.researcher.ask(NODE, request)) == encode(again)
    assert world.node.trainings_run == 2
    assert not list((world.node_dir / "work").iterdir())  # no scratch left behind


def test_the_reply_is_not_sent_when_it_could_not_be_kept(world, monkeypatch, caplog):
    """The reply cache's write fails (the registry's disk is full): NODE_IO_ERROR, nothing
    cached, and the re-sent request trains and is answered."""
    caplog.set_level(logging.INFO)
    request = world.train()
    put = world.node.replies.put

    def full(*args, **kwargs):
        raise RegistryIOError(
            f"could not read or write the node registry {DB_FILE}: "
            "database or disk is full; no space left on the device?"
        )

    monkeypatch.setattr(world.node.replies, "put", full)
    reply = world.researcher.ask(NODE, request)
    assert isinstance(reply, ErrorReply) and reply.error_number is ErrorNumber.NODE_IO_ERROR
    assert "disk is full" in reply.message
    _no_traceback(caplog)
    monkeypatch.setattr(world.node.replies, "put", put)
    assert isinstance(world.researcher.ask(NODE, request), TrainReply)
    assert world.node.trainings_run == 2


def test_a_worker_that_cannot_write_its_parameters_reports_node_io_error(world, tmp_path):
    """The training worker's own code path (``python -m fedsm.node.worker_main``), run in this
    process so that the disk can be filled under it: its error reply carries 901."""
    from fedsm.node.executor import TrainingTask
    from fedsm.node.worker_main import _serve

    params = tmp_path / "in.safetensors"
    world.repo.download_file(world.params["file"], params)
    task = TrainingTask(
        plan_source=world.linear.decode(),
        plan_class="LinearPlan",
        model_args={"in_features": 3},
        training_args={"lr": 0.1, "epochs": 1, "batch_size": 8},
        params_path=str(params),
        dataset=world.dataset | {"path": str(tmp_path / "data.csv")},
        seed=1,
        out_path=str(tmp_path / "out" / "params_out.safetensors"),
    )
    (tmp_path / "out").mkdir()
    with FaultyDisk() as disk:
        disk.fill("out", under(tmp_path / "out"))
        reply = _serve({"kind": "train", "task": task.to_dict()})
    assert reply["kind"] == "error", reply
    assert reply["code"] == ErrorNumber.NODE_IO_ERROR, reply
    assert "No space left on device" in reply["message"]
    ok = _serve({"kind": "train", "task": task.to_dict()})
    assert ok["kind"] == "ok", ok


def _raised(exc: BaseException, cause: BaseException | None) -> BaseException:
    try:
        raise exc from cause
    except BaseException as caught:  # noqa: BLE001 - a test of the chain
        return caught


def test_error_mapping_follows_the_exception_chain():
    from fedsm.training.params import ParamsFileError

    enospc = OSError(errno.ENOSPC, "No space left on device", "/node/work/params_out")
    erofs = OSError(errno.EROFS, "Read-only file system", "/node/work")
    eacces = OSError(errno.EACCES, "Permission denied", "/node/work")
    io = ErrorNumber.NODE_IO_ERROR
    assert error_code_for(_raised(ParamsFileError("cannot write"), enospc)) is io
    assert error_code_for(_raised(ParamsFileError("cannot write"), erofs)) is io
    assert error_code_for(ParamsFileError("not safetensors")) is ErrorNumber.PARAMS_INVALID
    assert error_code_for(_raised(ParamsFileError("x"), eacces)) is ErrorNumber.PARAMS_INVALID
    # a context two links away (raised while handling), and sqlite's full disk
    inner = _raised(RuntimeError("wrapped"), _raised(ValueError("mid"), enospc))
    assert error_code_for(inner) is io
    full = sqlite3.OperationalError("database or disk is full")
    assert error_code_for(_raised(RuntimeError("x"), full)) is io
    assert error_code_for(RegistryIOError("could not write the registry")) is io
    assert error_code_for(RegistryBusy("locked")) is ErrorNumber.NODE_BUSY
    too_large = PlanTooLarge("plan too large", size=10, limit=5)
    assert error_code_for(too_large) is ErrorNumber.BAD_REQUEST
    assert error_code_for(ValueError("a plan bug")) is ErrorNumber.TRAINING_FAILED
    # what the node answers for an exception outside the training
    assert failure(enospc)[0] is io and "disk full" in failure(enospc)[1]
    assert failure(RegistryBusy("locked")) == (ErrorNumber.NODE_BUSY, "locked")
    assert failure(too_large) == (ErrorNumber.BAD_REQUEST, "plan too large")
    assert failure(KeyError("a bug")) is None  # INTERNAL, with its traceback in the log
    # a cycle in the chain does not hang the walk
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert error_code_for(a) is ErrorNumber.TRAINING_FAILED


# --------------------------------------------------------------------------- registry busy


@pytest.mark.parametrize(
    ("log_head", "trained_before_busy"),
    [
        # the witness of the head, on receipt, is the first write: nothing was trained
        ({"seq": 7, "hash": "ab" * 32}, 0),
        # no head: the first write is the reply cache's, after the training
        (None, 1),
    ],
)
def test_a_registry_locked_by_another_process_is_node_busy_then_served(
    tmp_path, executor, caplog, log_head, trained_before_busy
):
    caplog.set_level(logging.INFO)
    world = World(tmp_path, executor, registry_busy_timeout_s=0.2)
    try:
        request = world.train(log_head=log_head)
        other = sqlite3.connect(world.node_dir / DB_FILE, timeout=0.1, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")  # an operator command holding the write lock
            reply = world.researcher.ask(NODE, request, timeout_s=30)
            assert isinstance(reply, ErrorReply), reply
            assert reply.error_number is ErrorNumber.NODE_BUSY, reply.message
            assert "locked by another process" in reply.message
            assert world.node.trainings_run == trained_before_busy
            other.execute("ROLLBACK")
        finally:
            other.close()
        _no_traceback(caplog)
        again = world.researcher.ask(NODE, request)
        assert isinstance(again, TrainReply), again
        assert world.node.trainings_run == trained_before_busy + 1
    finally:
        world.close()


# --------------------------------------------------------------------------- claimed ids


def test_an_id_claimed_by_another_researcher_does_not_block_the_genuine_request(world):
    genuine = world.train()
    # another participant sends first, under the genuine id, as another researcher and with
    # other content (it may publish on the node's request topic: no ACL keeps it out)
    claim = dataclasses.replace(genuine, researcher_id=EVIL, seed=genuine.seed + 1)
    claimed = world.evil.ask(NODE, claim)
    assert isinstance(claimed, TrainReply) and claimed.researcher_id == EVIL
    # a second claim whose content fails: its error goes to its sender, not to the genuine one
    bad = dataclasses.replace(genuine, researcher_id=EVIL, params_sha256="0" * 64)
    assert world.evil.ask(NODE, bad).error_number is ErrorNumber.PARAMS_DIGEST_MISMATCH

    reply = world.researcher.ask(NODE, genuine)
    assert isinstance(reply, TrainReply), reply
    assert reply.researcher_id == RESEARCHER
    assert world.node.trainings_run == 3
    assert world.researcher.replies.empty()  # nothing of the claims reached the researcher
    # the genuine reply is the genuine content's training (the same request under a fresh
    # id trains to the same bits), not the claim's
    fresh = world.researcher.ask(NODE, dataclasses.replace(genuine, request_id="req-fresh"))
    assert fresh.params_sha256 == reply.params_sha256 != claimed.params_sha256
    # both stay cached, each for its own sender
    assert encode(world.researcher.ask(NODE, genuine)) == encode(reply)
    assert encode(world.evil.ask(NODE, claim)) == encode(claimed)
    assert world.node.trainings_run == 4


def test_an_id_claimed_with_other_content_by_the_same_researcher_is_served_as_its_own(world):
    first = world.train()
    assert isinstance(world.researcher.ask(NODE, first), TrainReply)
    other = dataclasses.replace(first, round=1)
    reply = world.researcher.ask(NODE, other)
    assert isinstance(reply, TrainReply) and reply.round == 1, reply
    assert world.node.trainings_run == 2
    assert len(world.node.replies) == 2


def test_an_entry_of_an_older_node_under_the_bare_id_does_not_block_other_content(world):
    genuine = world.train()
    world.node.replies.put(genuine.request_id, "f" * 64, b"not this request's reply")
    reply = world.researcher.ask(NODE, genuine)
    assert isinstance(reply, TrainReply), reply
    assert world.node.replies.get(cache_key(genuine)) is not None


def test_a_claim_in_flight_is_not_merged_with_the_genuine_request(world, tmp_path):
    """The claim (a plan that waits) is being trained when the genuine request arrives under
    the same id: the genuine one is not counted as a copy of the claim, it trains itself."""
    release = tmp_path / "release"
    waiting = plan_bytes("waiting_plan.py", release)
    world.node.plans.decide("approved", source=waiting, by="test")
    genuine = world.train()
    claim = dataclasses.replace(
        world.train(waiting, "WaitingPlan"), request_id=genuine.request_id, researcher_id=EVIL
    )
    world.evil.bus.send(NODE, claim)
    time.sleep(0.3)  # the claim is in flight (its training waits for the release file)
    world.researcher.bus.send(NODE, genuine)
    time.sleep(0.3)
    release.write_text("go")
    reply = world.researcher.wait(genuine.request_id)
    assert isinstance(reply, TrainReply), reply
    assert reply.training_plan_sha256 == sha256(world.linear)
    assert world.evil.wait(genuine.request_id).training_plan_sha256 == sha256(waiting)
    assert world.node.trainings_run == 2


def test_a_copy_re_sent_while_the_first_runs_trains_once(world, tmp_path):
    """Today's answer to a copy arriving while the first is trained: no second training, the
    same reply for each copy (the researcher counts one)."""
    release = tmp_path / "release"
    waiting = plan_bytes("waiting_plan.py", release)
    world.node.plans.decide("approved", source=waiting, by="test")
    request = world.train(waiting, "WaitingPlan")
    world.researcher.bus.send(NODE, request)
    time.sleep(0.3)
    world.researcher.bus.send(NODE, dataclasses.replace(request, deadline=request.deadline + 5))
    time.sleep(0.3)
    release.write_text("go")
    first = world.researcher.wait(request.request_id)
    second = world.researcher.wait(request.request_id)
    assert isinstance(first, TrainReply) and encode(first) == encode(second)
    assert world.node.trainings_run == 1
    with pytest.raises(TimeoutError):
        world.researcher.wait(request.request_id, timeout_s=0.5)


def test_a_plan_over_max_plan_bytes_is_refused_before_it_is_read(tmp_path, executor, caplog):
    """The size cap applies to the plan a train request downloads too, not only to what the
    registry stores: refused as the request's fault, nothing recorded, nothing trained."""
    w = World(tmp_path, executor, max_plan_bytes=1000)  # the approved plan fits
    try:
        big = w.linear + b"\n# padding" * 100
        reply = w.researcher.ask(NODE, w.train(plan=big))
        assert isinstance(reply, ErrorReply), reply
        assert reply.error_number is ErrorNumber.BAD_REQUEST, reply.message
        assert "max_plan_bytes (1000)" in reply.message
        assert w.node.trainings_run == 1  # served once, refused before any import
        assert w.node.plans.status(sha256(big)) == "unknown"  # not recorded as pending
        _no_traceback(caplog)
    finally:
        w.close()
