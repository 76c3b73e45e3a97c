"""Validation-only rounds (``TrainRequest.do_training=False``) on memory-bus nodes.

A node asked to validate loads the plan (same approval gate) and the global parameters (same
digest check), evaluates them as the "global validation before training" of a normal round
does, uploads nothing, and names the parameters it was sent. The reply cache answers a
duplicate.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import pytest
from job_world import make_world
from plans import Researcher

from fedsm.core.messages import ErrorReply, TrainReply, TrainRequest
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.training.runner import evaluate, initial_params, train_round, validate_round

ARGS = {"lr": 0.5, "epochs": 1, "batch_size": 32}
VAL_ARGS = {**ARGS, "test_ratio": 0.25, "test_metric": "F1_SCORE"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    w = make_world(root, 3)
    source = w.plan.read_text()
    init = root / "init.safetensors"
    initial_params(
        plan_source=source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=ARGS,
        seed=3,
        out_path=init,
    )
    w.params = w.repository.upload_file(init)
    w.plan_up = w.repository.upload_file(w.plan)
    w.init = init
    w.source = source
    researcher = Researcher(w.broker)
    w.extra.append(researcher.bus)
    w.ask = researcher.ask
    yield w
    w.close()


def _request(world, node_id: str, **extra) -> TrainRequest:
    fields = dict(
        request_id="req-" + uuid.uuid4().hex[:12],
        researcher_id="researcher-test",
        node_id=node_id,
        deadline=time.time() + 600,
        job_id="job-validation",
        round=4,
        dataset_id=f"dataset-{node_id}",
        training_plan_url=world.plan_up["file"],
        training_plan_sha256=world.plan_up["sha256"],
        training_plan_class="BreastCancerPlan",
        params_url=world.params["file"],
        params_sha256=world.params["sha256"],
        training_args=VAL_ARGS,
        model_args={},
        seed=1234,
        do_training=False,
    )
    fields.update(extra)
    return TrainRequest(**fields)


def _repository_files(world) -> set[Path]:
    return {p for p in world.repository.root.rglob("*") if p.is_file()}


def _record(world, node_id: str) -> dict:
    node = next(n for n in world.nodes if n.node_id == node_id)
    return node.datasets.get(f"dataset-{node_id}")


def test_validation_uploads_nothing_and_names_the_params_it_was_sent(world):
    before = _repository_files(world)
    for node in world.nodes:
        request = _request(world, node.node_id)
        reply = world.ask(node.node_id, request)
        assert isinstance(reply, TrainReply), reply
        assert reply.params_sha256 == request.params_sha256 == world.params["sha256"]
        assert reply.params_url == request.params_url
        assert reply.round == 4 and reply.job_id == "job-validation"
        assert reply.dataset_id == request.dataset_id
        assert reply.training_plan_sha256 == world.plan_up["sha256"]
        total = _record(world, node.node_id)["sample_count"]
        assert reply.sample_size == int(total * 0.25) > 0
        assert set(reply.metrics) == {
            "global_val_accuracy",
            "global_val_f1_score",
            "global_val_loss",
        }
        assert set(reply.timing) == {"download", "training", "upload", "total"}
        assert reply.timing["upload"] == 0.0
    assert _repository_files(world) == before  # no parameters file was uploaded


def test_metrics_equal_a_direct_evaluation_and_a_training_rounds_global_validation(world):
    node_id = "node-2"
    reply = world.ask(node_id, _request(world, node_id))
    assert isinstance(reply, TrainReply), reply
    direct = validate_round(
        plan_source=world.source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=VAL_ARGS,
        params_path=world.init,
        dataset=_record(world, node_id),
        seed=1234,
    )
    assert reply.metrics == direct.metrics and reply.sample_size == direct.sample_size
    # what a training round of the same request reports as its global validation
    trained = train_round(
        plan_source=world.source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args={**VAL_ARGS, "test_on_global_updates": True},
        params_path=world.init,
        dataset=_record(world, node_id),
        seed=1234,
        out_path=world.root / "trained.safetensors",
    )
    assert {k: v for k, v in trained.metrics.items() if k.startswith("global_val_")} == (
        reply.metrics
    )
    # deterministic: a new request (new id) asking the same gives the same numbers
    again = world.ask(node_id, _request(world, node_id))
    assert again.metrics == reply.metrics and again.request_id != reply.request_id


def test_without_a_validation_split_the_whole_dataset_is_validated(world):
    node_id = "node-3"
    request = _request(world, node_id, training_args=ARGS)
    reply = world.ask(node_id, request)
    assert isinstance(reply, TrainReply), reply
    record = _record(world, node_id)
    assert reply.sample_size == record["sample_count"]
    assert set(reply.metrics) == {"global_val_accuracy", "global_val_loss"}
    whole = evaluate(
        plan_source=world.source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=ARGS,
        params_path=world.init,
        dataset=record,
    )
    assert reply.metrics["global_val_accuracy"] == whole["accuracy"]
    assert reply.metrics["global_val_loss"] == pytest.approx(whole["loss"], rel=1e-12)


def test_unapproved_and_rejected_plans_are_still_refused(world, tmp_path):
    node = world.nodes[0]
    other = world.source + "\n# a plan nobody approved\n"
    path = tmp_path / "other_plan.py"
    path.write_text(other)
    uploaded = world.repository.upload_file(path)
    plan_fields = dict(training_plan_url=uploaded["file"], training_plan_sha256=uploaded["sha256"])
    reply = world.ask(node.node_id, _request(world, node.node_id, **plan_fields))
    assert isinstance(reply, ErrorReply)
    assert reply.error_number is ErrorNumber.PLAN_NOT_APPROVED, reply.message

    node.plans.decide("rejected", source=other.encode(), by="test")
    reply = world.ask(node.node_id, _request(world, node.node_id, **plan_fields))
    assert isinstance(reply, ErrorReply)
    assert reply.error_number is ErrorNumber.PLAN_REJECTED, reply.message


def test_params_are_digest_checked(world):
    request = _request(world, "node-1", params_sha256="0" * 64)
    reply = world.ask("node-1", request)
    assert isinstance(reply, ErrorReply)
    assert reply.error_number is ErrorNumber.PARAMS_DIGEST_MISMATCH, reply.message


def test_a_duplicate_is_answered_from_the_cache(world):
    node = world.nodes[1]
    request = _request(world, node.node_id)
    first = world.ask(node.node_id, request)
    assert isinstance(first, TrainReply), first
    served = node.trainings_run
    resent = dataclasses.replace(request, deadline=request.deadline + 60)
    second = world.ask(node.node_id, resent)
    assert second == first
    assert node.trainings_run == served  # nothing was run again

    # the same request id asking to train is another request (the cache is scoped by
    # content): served as its own, not answered with the validation's cached reply
    training = dataclasses.replace(request, do_training=True)
    reply = world.ask(node.node_id, training)
    assert isinstance(reply, TrainReply), reply
    assert reply.params_sha256 != first.params_sha256
    assert node.trainings_run == served + 1
