"""One train request, start to finish: download, check, approve, train, upload.

What is fetched, and how it is checked, lives in :mod:`fedsm.node.fetch`.

A request with ``do_training`` False (the seed's ``training: False``) is served the same way
up to the training, which is replaced by a validation of the received parameters (see
:func:`fedsm.training.runner.validate_round`); nothing is uploaded and the reply names the
request's own parameters.

The order is the safety argument. The plan's bytes are downloaded and hashed, the hash is
compared with the request and looked up in the approval registry, and only then may anything
import them; the parameters are checked against their digest before the plan ever sees them.
Every refusal raises :class:`~fedsm.node.errors.RequestFailed` with the code the researcher
gets. A file the node cannot write because of its own machine (no space left, a quota, a
read-only file system: see :func:`~fedsm.node.executor.io_fault`) is not the request's fault:
the scratch directory, every download, the training's output and the upload raise
:class:`~fedsm.node.errors.NodeIOError` (``NODE_IO_ERROR``, transient: the researcher may ask
again once there is room), with one line naming the file and the reason.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from fedsm.core.messages import TrainReply, TrainRequest
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.digests import sha256_hex
from fedsm.node.errors import DatasetNotRegistered, RequestFailed
from fedsm.node.executor import TrainingOutcome, TrainingTask
from fedsm.node.fetch import (
    RoundContext,
    Scratch,
    aggregator_args,
    fetch_plan,
    node_io,
    round_params,
)
from fedsm.repository.base import RepositoryError

__all__ = ["check_approval", "run_train_request"]

log = logging.getLogger(__name__)


def check_approval(ctx: RoundContext, source: bytes, request: TrainRequest) -> None:
    """Refuse a plan that may not run here. Nothing has imported ``source`` yet."""
    digest = sha256_hex(source)
    status = ctx.plans.status(digest)
    if status == "unknown":  # so the operator sees every plan researchers sent
        ctx.plans.record_pending(
            source,
            name=request.training_plan_class,
            origin=f"train request {request.request_id} of job {request.job_id} "
            f"from {request.researcher_id}",
        )
    if status == "rejected":
        raise RequestFailed(
            ErrorNumber.PLAN_REJECTED,
            f"training plan {digest} was rejected by the operator of node {ctx.node_id}",
        )
    if not ctx.settings.enforce_approval or status == "approved":
        if status != "approved":
            log.warning("node %s runs unapproved plan %s (approval is off)", ctx.node_id, digest)
        return
    raise RequestFailed(
        ErrorNumber.PLAN_NOT_APPROVED,
        f"training plan {digest} is not approved on node {ctx.node_id}; its operator can "
        f"review it with `fedsm node plan show {digest} --dir DIR` and approve it with "
        f"`fedsm node plan approve --sha256 {digest} --dir DIR`",
    )


def run_train_request(ctx: RoundContext, request: TrainRequest) -> TrainReply:
    """Serve one train request and return the reply; refusals raise ``RequestFailed``."""
    started = time.monotonic()
    work = Scratch(ctx, request.request_id)
    try:
        source = ctx.plan_cache.get(request.training_plan_sha256) or fetch_plan(
            ctx, request, work.path("plan.py")
        )
        check_approval(ctx, source, request)
        try:
            dataset = ctx.datasets.get(request.dataset_id)
        except DatasetNotRegistered:
            raise RequestFailed(
                ErrorNumber.DATASET_NOT_FOUND,
                f"node {ctx.node_id} has no dataset {request.dataset_id!r} (search again)",
            ) from None
        params_in, params_bytes = round_params(ctx, request, work)
        in_memory = params_bytes is not None
        try:
            plan_text = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestFailed(
                ErrorNumber.PLAN_IMPORT_FAILED, f"the training plan is not UTF-8 text: {exc}"
            ) from None
        agg_values, agg_files = aggregator_args(ctx, request, work)
        downloaded = time.monotonic()
        out_path = "" if in_memory else str(work.path("params_out.safetensors"))
        task = TrainingTask(
            plan_source=plan_text,
            plan_class=request.training_plan_class,
            model_args=dict(request.model_args),
            training_args=dict(request.training_args),
            params_path=params_in,
            dataset=dataset,
            seed=request.seed,
            out_path=out_path,
            do_training=request.do_training,
            aggregator_args=agg_values,
            aggregator_files=agg_files,
            params_bytes=params_bytes,
        )
        outcome = ctx.executor.train(task, time_limit_s=ctx.settings.training_time_limit_s)
        trained = time.monotonic()
        if not request.do_training:
            return _validation_reply(ctx, request, source, outcome, started, downloaded, trained)
        if (outcome.params_bytes is None) if in_memory else not Path(out_path).is_file():
            raise RequestFailed(
                ErrorNumber.INTERNAL, "training finished but its parameters are missing"
            )
        diverged = sorted(k for k, v in outcome.metrics.items() if not math.isfinite(v))
        if diverged:
            raise RequestFailed(
                ErrorNumber.TRAINING_FAILED,
                f"training diverged: metrics {diverged} are not finite (lower the learning "
                "rate?); its parameters were not sent",
            )
        try:
            with node_io("could not store the trained parameters in the repository"):
                if outcome.params_bytes is not None and in_memory:
                    uploaded = ctx.repository.upload_bytes(outcome.params_bytes)
                else:
                    uploaded = ctx.repository.upload_file(out_path)
        except RepositoryError as exc:
            raise RequestFailed(
                ErrorNumber.REPOSITORY_UNREACHABLE, f"could not upload the parameters: {exc}"
            ) from None
        if uploaded["sha256"] != outcome.params_sha256:  # the upload hashed what it stored
            raise RequestFailed(
                ErrorNumber.INTERNAL,
                "the trained parameters file does not match the digest the trainer reported "
                "(changed after training?); it was not sent",
            )
        finished = time.monotonic()
        return TrainReply(
            request_id=request.request_id,
            researcher_id=request.researcher_id,
            node_id=ctx.node_id,
            job_id=request.job_id,
            round=request.round,
            dataset_id=request.dataset_id,
            training_plan_sha256=request.training_plan_sha256,  # checked when fetched
            params_url=uploaded["file"],
            params_sha256=uploaded["sha256"],
            sample_size=outcome.sample_size,
            metrics=outcome.metrics,
            timing={
                "download": downloaded - started,
                "training": trained - downloaded,
                "upload": finished - trained,
                "total": finished - started,
            },
            extras=outcome.extras,
        )
    finally:
        work.remove()


def _validation_reply(
    ctx: RoundContext,
    request: TrainRequest,
    source: bytes,
    outcome: TrainingOutcome,
    started: float,
    downloaded: float,
    validated: float,
) -> TrainReply:
    """The reply to a validation-only request: the request's own parameters (nothing was
    uploaded), the number of samples validated on, and the ``global_val_*`` metrics."""
    if outcome.params_sha256 != request.params_sha256:
        raise RequestFailed(
            ErrorNumber.INTERNAL,
            "validation finished but reports parameters other than the ones it was sent",
        )
    if outcome.sample_size < 1:
        raise RequestFailed(ErrorNumber.INTERNAL, "validation ran on no sample")
    bad = sorted(k for k, v in outcome.metrics.items() if not math.isfinite(v))
    if bad:
        raise RequestFailed(
            ErrorNumber.TRAINING_FAILED,
            f"validation metrics {bad} of the global parameters are not finite",
        )
    finished = time.monotonic()
    return TrainReply(
        request_id=request.request_id,
        researcher_id=request.researcher_id,
        node_id=ctx.node_id,
        job_id=request.job_id,
        round=request.round,
        dataset_id=request.dataset_id,
        training_plan_sha256=sha256_hex(source),
        params_url=request.params_url,
        params_sha256=request.params_sha256,
        sample_size=outcome.sample_size,
        metrics=outcome.metrics,
        timing={
            "download": downloaded - started,
            "training": validated - downloaded,
            "upload": 0.0,
            "total": finished - started,
        },
    )
