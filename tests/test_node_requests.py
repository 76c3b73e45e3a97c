"""Node over the real memory bus and local repository, training in-process (real runner).

Covers each request type, the approval gate (marker-file plans), digest checks, the reply
cache (also across a restart), and serving while a training runs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import msgpack
import pytest
from plans import (
    Researcher,
    head,
    initial_params,
    plan_bytes,
    sha256,
    train_request,
    write_csv,
)

from fedsm.core.messages import (
    ErrorReply,
    ListReply,
    ListRequest,
    PingReply,
    PingRequest,
    SearchReply,
    SearchRequest,
    TrainingPlanStatusReply,
    TrainingPlanStatusRequest,
    TrainReply,
)
from fedsm.core.protocol import encode
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.digests import sha256_file
from fedsm.node.executor import InProcessTrainingExecutor
from fedsm.node.node import Node, request_fingerprint
from fedsm.node.settings import NodeSettings, init_node_dir
from fedsm.node.simulate import register_csv_dataset
from fedsm.repository import LocalRepository
from fedsm.transport import MemoryBroker, MemoryBus

NODE = "node-a"


@pytest.fixture(scope="module")
def executor():
    with InProcessTrainingExecutor() as shared:
        yield shared


class World:
    def __init__(self, tmp: Path, executor: InProcessTrainingExecutor) -> None:
        self.tmp = tmp
        self.executor = executor
        self.broker = MemoryBroker()
        self.repo = LocalRepository(tmp / "repo")
        self.node_dir = tmp / NODE
        init_node_dir(self.node_dir, NODE)
        self.node = self.start_node()
        self.dataset = register_csv_dataset(
            self.node, write_csv(tmp / "data.csv"), name="d", tags=["x", "y"], target="target"
        )
        self.researcher = Researcher(self.broker)
        self.linear = plan_bytes("linear_plan.py")
        self.params = initial_params(self.repo, self.linear, "LinearPlan", tmp)

    def start_node(self) -> Node:
        bus = MemoryBus(self.broker, NODE, role="node")
        return Node(self.node_dir, bus=bus, repository=self.repo, executor=self.executor).start()

    def approve(self, source: bytes) -> None:
        self.node.plans.decide("approved", source=source, by="test")

    def train(self, plan: bytes, plan_class: str, **extra):
        dataset_id = extra.pop("dataset_id", self.dataset["dataset_id"])
        return train_request(
            NODE, dataset_id, self.repo, plan, plan_class, self.params, self.tmp, **extra
        )

    def status_request(self, plan: bytes) -> TrainingPlanStatusRequest:
        path = self.tmp / f"status-{sha256(plan)[:8]}.py"
        path.write_bytes(plan)
        up = self.repo.upload_file(path)
        return TrainingPlanStatusRequest(
            **head(NODE),
            job_id="job-test",
            training_plan_url=up["file"],
            training_plan_sha256=up["sha256"],
        )


@pytest.fixture
def world(tmp_path, executor):
    w = World(tmp_path, executor)
    yield w
    w.researcher.close()
    w.node.stop()


def test_ping_list_and_search(world):
    pong = world.researcher.ask(NODE, PingRequest(**head(NODE)))
    assert isinstance(pong, PingReply) and pong.node_id == NODE

    listed = world.researcher.ask(NODE, ListRequest(**head(NODE)))
    assert isinstance(listed, ListReply)
    assert [d["dataset_id"] for d in listed.datasets] == [world.dataset["dataset_id"]]
    assert listed.datasets[0]["sample_count"] == 24
    assert "path" not in listed.datasets[0]  # the node never tells where its data is

    found = world.researcher.ask(NODE, SearchRequest(**head(NODE), tags=["x"]))
    assert isinstance(found, SearchReply) and len(found.datasets) == 1
    assert "path" not in found.datasets[0]


def test_search_without_match_answers_empty(world):
    reply = world.researcher.ask(NODE, SearchRequest(**head(NODE), tags=["x", "absent"]))
    assert isinstance(reply, SearchReply)
    assert reply.datasets == ()


def test_plan_status_unknown_is_recorded_pending_then_approved(world):
    request = world.status_request(world.linear)
    first = world.researcher.ask(NODE, request)
    assert isinstance(first, TrainingPlanStatusReply)
    assert (first.status, first.approval_required) == ("unknown", True)
    assert world.node.plans.status(sha256(world.linear)) == "pending"

    again = world.researcher.ask(NODE, world.status_request(world.linear))
    assert again.status == "pending"
    world.node.plans.decide("approved", sha256=sha256(world.linear), by="test")
    approved = world.researcher.ask(NODE, world.status_request(world.linear))
    assert approved.status == "approved"
    world.node.plans.decide("rejected", sha256=sha256(world.linear), by="test")
    assert world.researcher.ask(NODE, world.status_request(world.linear)).status == "rejected"


def test_plan_status_with_wrong_digest_is_an_error(world):
    request = world.status_request(world.linear)
    wrong = TrainingPlanStatusRequest(
        **head(NODE),
        job_id="job-test",
        training_plan_url=request.training_plan_url,
        training_plan_sha256=sha256(b"something else"),
    )
    reply = world.researcher.ask(NODE, wrong)
    assert isinstance(reply, ErrorReply)
    assert reply.error_number is ErrorNumber.PLAN_DIGEST_MISMATCH


def test_train_an_approved_plan(world):
    world.approve(world.linear)
    request = world.train(world.linear, "LinearPlan")
    reply = world.researcher.ask(NODE, request)
    assert isinstance(reply, TrainReply), reply
    assert (reply.job_id, reply.round, reply.dataset_id) == ("job-test", 0, request.dataset_id)
    assert reply.sample_size == 24
    assert set(reply.timing) == {"download", "training", "upload", "total"}
    assert reply.timing["total"] >= reply.timing["training"] >= 0
    assert "train_loss" in reply.metrics
    _, path = world.repo.download_file(reply.params_url, world.tmp / "out.safetensors")
    assert sha256_file(path) == reply.params_sha256 != request.params_sha256
    assert not any((world.node_dir / "work").iterdir())  # scratch files cleaned up


def test_unapproved_plan_is_never_executed(world, tmp_path):
    marker = tmp_path / "imported.txt"
    plan = plan_bytes("marker_plan.py", marker)
    reply = world.researcher.ask(NODE, world.train(plan, "MarkerPlan"))
    assert isinstance(reply, ErrorReply)
    assert reply.error_number is ErrorNumber.PLAN_NOT_APPROVED
    assert "fedsm node plan approve" in reply.message
    assert not marker.exists()
    assert world.node.plans.status(sha256(plan)) == "pending"  # the operator can see it

    world.node.plans.decide("rejected", source=plan, by="test")
    reply = world.researcher.ask(NODE, world.train(plan, "MarkerPlan"))
    assert reply.error_number is ErrorNumber.PLAN_REJECTED
    assert not marker.exists()


def test_plan_changed_by_one_byte_after_approval_is_refused(world, tmp_path):
    marker = tmp_path / "imported.txt"
    plan = plan_bytes("marker_plan.py", marker)
    world.approve(plan)
    changed = plan + b"\n"
    reply = world.researcher.ask(NODE, world.train(changed, "MarkerPlan"))
    assert isinstance(reply, ErrorReply)
    assert reply.error_number is ErrorNumber.PLAN_NOT_APPROVED
    assert not marker.exists()
    # the approved bytes themselves do run (so the marker test above could fail)
    reply = world.researcher.ask(NODE, world.train(plan, "MarkerPlan"))
    assert isinstance(reply, TrainReply), reply
    assert marker.exists()


def test_tampered_params_are_refused_before_loading(world, tmp_path):
    marker = tmp_path / "imported.txt"
    plan = plan_bytes("marker_plan.py", marker)
    world.approve(plan)
    # 1. the request names a digest the file does not have
    request = world.train(plan, "MarkerPlan", params_sha256=sha256(b"other params"))
    reply = world.researcher.ask(NODE, request)
    assert reply.error_number is ErrorNumber.PARAMS_DIGEST_MISMATCH
    # 2. the file in the repository was changed after upload
    stored = next(
        p
        for p in (world.tmp / "repo").rglob("*")
        if p.is_file() and sha256_file(p) == world.params["sha256"]
    )
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.chmod(0o644)
    stored.write_bytes(bytes(data))
    reply = world.researcher.ask(NODE, world.train(plan, "MarkerPlan"))
    assert isinstance(reply, ErrorReply)
    assert reply.error_number is ErrorNumber.PARAMS_DIGEST_MISMATCH
    assert not marker.exists()  # the plan never ran, so the params were never loaded


def test_unknown_dataset(world):
    world.approve(world.linear)
    reply = world.researcher.ask(
        NODE, world.train(world.linear, "LinearPlan", dataset_id="no-such-dataset")
    )
    assert reply.error_number is ErrorNumber.DATASET_NOT_FOUND


def test_duplicate_train_request_trains_once_also_after_restart(world):
    world.approve(world.linear)
    request = world.train(world.linear, "LinearPlan")
    # two copies back to back: the second arrives while the first is queued or training
    world.researcher.bus.send(NODE, request)
    world.researcher.bus.send(NODE, request)
    first = world.researcher.wait(request.request_id)
    second = world.researcher.wait(request.request_id)
    assert isinstance(first, TrainReply)
    assert encode(first) == encode(second)
    assert world.node.trainings_run == 1

    world.node.stop()
    world.node = world.start_node()  # same directory, fresh process state
    third = world.researcher.ask(NODE, request)
    assert encode(third) == encode(first)
    assert world.node.trainings_run == 0


def test_request_id_reused_for_another_request_is_served_as_its_own(world):
    """The reply cache is scoped by content: a request that reuses a known id with other
    content (a pre-claim, or a stale id) neither gets the cached reply nor blocks anything."""
    world.approve(world.linear)
    request = world.train(world.linear, "LinearPlan")
    first = world.researcher.ask(NODE, request)
    assert isinstance(first, TrainReply)
    other = world.train(world.linear, "LinearPlan", request_id=request.request_id, round=1)
    reply = world.researcher.ask(NODE, other)
    assert isinstance(reply, TrainReply) and reply.round == 1
    again = world.researcher.ask(NODE, request)  # the first one still answered from cache
    assert isinstance(again, TrainReply) and again.params_sha256 == first.params_sha256


def _file_arg(url: str, digest: str) -> dict[str, str]:
    return {"url": url, "sha256": digest}


def test_fingerprint_leaves_out_when_and_where_but_not_what(world):
    digest = world.params["sha256"]
    request = world.train(
        world.linear,
        "LinearPlan",
        aggregator_args={"state": _file_arg("file:///a/x", digest), "mu": 0.5},
    )
    same = request_fingerprint(request)
    moved = dataclasses.replace(
        request,
        deadline=request.deadline + 60,
        training_plan_url="http://elsewhere/files/" + request.training_plan_sha256,
        params_url="file:///moved/" + request.params_sha256,
        aggregator_args={"mu": 0.5, "state": {"sha256": digest, "url": "http://b/" + digest}},
    )
    assert request_fingerprint(moved) == same
    changed = [
        dataclasses.replace(request, params_sha256=sha256(b"other")),
        dataclasses.replace(request, training_plan_sha256=sha256(b"other")),
        dataclasses.replace(request, round=1),
        dataclasses.replace(request, aggregator_args={"state": _file_arg("file:///a/x", "0" * 64)}),
        dataclasses.replace(
            request,
            aggregator_args={"state": _file_arg("file:///a/x", digest), "mu": 0.25},
        ),
        # a map without a digest is named by its url: that url is content
        dataclasses.replace(request, aggregator_args={"state": {"url": "file:///a/x"}}),
    ]
    fingerprints = {request_fingerprint(r) for r in changed}
    assert same not in fingerprints and len(fingerprints) == len(changed)
    no_digest = dataclasses.replace(request, aggregator_args={"state": {"url": "file:///b"}})
    assert request_fingerprint(no_digest) != request_fingerprint(changed[-1])


def test_a_moved_run_resending_under_new_urls_gets_the_cached_reply(world):
    world.approve(world.linear)
    digest = world.params["sha256"]
    request = world.train(
        world.linear,
        "LinearPlan",
        aggregator_args={"state": _file_arg(world.params["file"], digest)},
    )
    first = world.researcher.ask(NODE, request)
    assert isinstance(first, TrainReply), first
    assert world.node.trainings_run == 1
    # the run directory moves: its repository answers at another path now
    (world.tmp / "repo").rename(world.tmp / "moved-repo")
    moved = LocalRepository(world.tmp / "moved-repo")
    again = dataclasses.replace(
        request,
        deadline=time.time() + 600,
        training_plan_url=moved.url_for(request.training_plan_sha256),
        params_url=moved.url_for(request.params_sha256),
        aggregator_args={"state": _file_arg(moved.url_for(digest), digest)},
    )
    assert again.training_plan_url != request.training_plan_url
    assert encode(world.researcher.ask(NODE, again)) == encode(first)
    assert world.node.trainings_run == 1
    # after a restart too (the cache is in the node's sqlite file)
    world.node.stop()
    world.node = world.start_node()
    assert encode(world.researcher.ask(NODE, again)) == encode(first)
    assert world.node.trainings_run == 0


def test_a_reply_cached_under_the_old_fingerprint_is_still_served(world):
    request = world.train(world.linear, "LinearPlan")
    body = request.to_dict()
    body.pop("deadline")
    body.pop("log_head")  # not a field of the protocol then
    old = sha256(msgpack.packb(body, use_bin_type=True))  # what nodes stored before
    cached = TrainReply(
        request_id=request.request_id,
        researcher_id=request.researcher_id,
        node_id=NODE,
        job_id=request.job_id,
        round=0,
        dataset_id=request.dataset_id,
        training_plan_sha256=request.training_plan_sha256,
        params_url=request.params_url,
        params_sha256=request.params_sha256,
        sample_size=24,
    )
    world.node.replies.put(request.request_id, old, encode(cached))
    assert encode(world.researcher.ask(NODE, request)) == encode(cached)
    assert world.node.trainings_run == 0


def test_node_answers_while_training_and_ignores_stray_messages(world, tmp_path):
    release = tmp_path / "release"
    plan = plan_bytes("waiting_plan.py", release)
    world.approve(plan)
    request = world.train(plan, "WaitingPlan")
    world.researcher.bus.send(NODE, request)
    try:
        assert isinstance(world.researcher.ask(NODE, PingRequest(**head(NODE)), 10), PingReply)
        status = world.researcher.ask(NODE, world.status_request(plan), 10)
        assert status.status == "approved"
        # garbage and a reply delivered to a node are dropped, not fatal
        world.broker.deliver_raw("node", NODE, b"\xc1 not msgpack")
        world.node.handle(PingReply(request_id="r-1", researcher_id="x", node_id="y"))
        assert world.researcher.replies.empty()
        assert isinstance(world.researcher.ask(NODE, PingRequest(**head(NODE)), 10), PingReply)
    finally:
        release.write_text("go")
    reply = world.researcher.wait(request.request_id)
    assert isinstance(reply, TrainReply)


def test_with_approval_switched_off_unknown_plans_run_but_rejected_ones_do_not(world):
    world.node.stop()
    settings = NodeSettings(node_id=NODE, approval_required=False, allow_unapproved=True)
    world.node = Node(
        world.node_dir,
        bus=MemoryBus(world.broker, NODE, role="node"),
        repository=world.repo,
        settings=settings,
        executor=world.executor,
    ).start()
    status = world.researcher.ask(NODE, world.status_request(world.linear))
    assert (status.status, status.approval_required) == ("unknown", False)
    assert isinstance(
        world.researcher.ask(NODE, world.train(world.linear, "LinearPlan")), TrainReply
    )
    world.node.plans.decide("rejected", sha256=sha256(world.linear), by="test")
    reply = world.researcher.ask(NODE, world.train(world.linear, "LinearPlan"))
    assert reply.error_number is ErrorNumber.PLAN_REJECTED


def test_a_diverged_training_is_an_error_and_nothing_is_uploaded(world):
    plan = plan_bytes("linear_plan.py") + (
        b"\n\nclass DivergingPlan(LinearPlan):\n"
        b"    def training_step(self, data, target):\n"
        b"        return super().training_step(data, target) * float('nan')\n"
    )
    world.approve(plan)
    before = {p.name for p in world.repo.root.iterdir()}
    reply = world.researcher.ask(NODE, world.train(plan, "DivergingPlan"))
    assert isinstance(reply, ErrorReply), reply
    assert reply.error_number is ErrorNumber.TRAINING_FAILED
    assert "diverged" in reply.message
    after = {p.name for p in world.repo.root.iterdir()}
    assert after - before <= {sha256(plan)}  # the plan itself, no parameters
