"""One train request, start to finish: download, check, approve, train, upload.

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
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from fedsm.core.collect import digest_in_url
from fedsm.core.messages import TrainingPlanStatusRequest, TrainReply, TrainRequest
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.digests import sha256_file, sha256_hex
from fedsm.node.errors import DatasetNotRegistered, NodeIOError, RequestFailed
from fedsm.node.executor import (
    TrainingExecutor,
    TrainingOutcome,
    TrainingTask,
    describe_io_fault,
    io_fault,
)
from fedsm.node.registry import ApprovalRegistry, DatasetRegistry
from fedsm.node.settings import NodeSettings
from fedsm.repository.base import (
    DigestMismatch,
    FileNotInRepository,
    FileTooLarge,
    Repository,
    RepositoryError,
    RepositoryUnreachable,
)

__all__ = [
    "RoundContext",
    "fetch_plan",
    "check_approval",
    "node_io",
    "run_train_request",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How many checked plan sources a node keeps in memory, by digest.
PLAN_CACHE_SIZE = 8


@contextmanager
def node_io(what: str) -> Iterator[None]:
    """Turn a node-local I/O failure inside the block into :class:`NodeIOError` naming
    ``what`` (e.g. "could not write the parameters file"); other errors pass unchanged."""
    try:
        yield
    except RequestFailed:
        raise
    except Exception as exc:
        fault = io_fault(exc)
        if fault is None:
            raise
        raise NodeIOError(describe_io_fault(fault, what)) from exc


def _io(what: str, call: Callable[[], _T]) -> _T:
    with node_io(what):
        return call()


class RoundContext:
    """What serving a request needs from its node (kept apart so this module has no Node)."""

    def __init__(
        self,
        *,
        node_id: str,
        node_dir: Path,
        settings: NodeSettings,
        repository: Repository,
        executor: TrainingExecutor,
        datasets: DatasetRegistry,
        plans: ApprovalRegistry,
    ) -> None:
        self.node_id = node_id
        self.node_dir = node_dir
        self.settings = settings
        self.repository = repository
        self.executor = executor
        self.datasets = datasets
        self.plans = plans
        #: Plan sources this node downloaded and checked, by digest (the most recent few).
        self.plan_cache: dict[str, bytes] = {}

    def remember_plan(self, digest: str, source: bytes) -> None:
        """Keep a checked plan source by its digest (at most :data:`PLAN_CACHE_SIZE`)."""
        cache = self.plan_cache
        cache.pop(digest, None)
        cache[digest] = source
        while len(cache) > PLAN_CACHE_SIZE:
            cache.pop(next(iter(cache)))

    def scratch_dir(self, request_id: str) -> Path:
        """A fresh directory for one request's files (removed by the caller)."""
        path = self.node_dir / "work" / f"{request_id}-{uuid.uuid4().hex[:8]}"
        with node_io(f"could not make the scratch directory {path}"):
            path.mkdir(parents=True)
        return path


class Scratch:
    """One request's scratch directory, made on first use (a request whose files all
    travel in memory makes none) and removed by :meth:`remove`."""

    def __init__(self, ctx: RoundContext, request_id: str) -> None:
        self._ctx = ctx
        self._request_id = request_id
        self._dir: Path | None = None

    def path(self, name: str) -> Path:
        """``name`` inside the directory (made now if it is not yet)."""
        if self._dir is None:
            self._dir = self._ctx.scratch_dir(self._request_id)
        return self._dir / name

    def remove(self) -> None:
        """Remove the directory and what it holds, if it was made."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _TooLargeInMemory(Exception):
    """The parameters are larger than the executor takes in memory."""


@contextmanager
def _repository_errors(url: str, what: str, mismatch: ErrorNumber) -> Iterator[None]:
    """Turn a repository's refusal to hand out ``url`` into the :class:`RequestFailed` the
    researcher gets (digest mismatch, unreachable, unknown file, bad URL)."""
    try:
        yield
    except DigestMismatch as exc:
        raise RequestFailed(
            mismatch, f"the {what} at {url} failed its digest check: {exc}"
        ) from None
    except RepositoryUnreachable as exc:
        raise RequestFailed(
            ErrorNumber.REPOSITORY_UNREACHABLE, f"could not download the {what}: {exc}"
        ) from None
    except FileNotInRepository as exc:
        raise RequestFailed(
            ErrorNumber.BAD_REQUEST, f"the {what} at {url} is not in the repository: {exc}"
        ) from None
    except (RepositoryError, ValueError) as exc:
        raise RequestFailed(ErrorNumber.BAD_REQUEST, f"bad {what} URL {url!r}: {exc}") from None


def _download(
    ctx: RoundContext,
    url: str,
    expected_sha256: str,
    dest: Path,
    *,
    what: str,
    mismatch: ErrorNumber,
) -> None:
    """Download ``url`` to ``dest`` and check it hashes to ``expected_sha256``."""
    with _repository_errors(url, what, mismatch):
        with node_io(f"could not write the downloaded {what} to {dest}"):
            ctx.repository.download_file(url, dest)
    if digest_in_url(url) == expected_sha256:
        # The repository checked the bytes against the digest its URL names (a promise of
        # every repository: fedsm.testing.RepositoryContract holds them to it): no second
        # hash of the same bytes.
        return
    actual = _io(f"could not read the downloaded {what} {dest}", lambda: sha256_file(dest))
    if actual != expected_sha256:
        raise RequestFailed(
            mismatch,
            f"the {what} downloaded from {url} hashes to {actual}, not to the "
            f"{expected_sha256} the request names; refusing it",
        )


def _read(
    ctx: RoundContext,
    url: str,
    expected_sha256: str,
    *,
    what: str,
    mismatch: ErrorNumber,
    max_bytes: int,
    too_large_ok: bool = False,
) -> bytes:
    """The bytes at ``url``, in memory, checked to hash to ``expected_sha256``. A file over
    ``max_bytes`` is the request's fault, or with ``too_large_ok`` raises
    :class:`_TooLargeInMemory` (the caller takes it through a file)."""
    with _repository_errors(url, what, mismatch):
        with node_io(f"could not read the {what}"):
            try:
                data = ctx.repository.read_bytes(url, max_bytes=max_bytes)
            except FileTooLarge:
                if too_large_ok:
                    raise _TooLargeInMemory from None
                raise
    if digest_in_url(url) != expected_sha256 and sha256_hex(data) != expected_sha256:
        raise RequestFailed(
            mismatch,
            f"the {what} downloaded from {url} does not hash to the {expected_sha256} the "
            "request names; refusing it",
        )
    return data


def fetch_plan(
    ctx: RoundContext, request: TrainingPlanStatusRequest | TrainRequest, dest: Path
) -> bytes:
    """The request's plan bytes, checked against its digest: downloaded to ``dest``, or the
    bytes this node already downloaded and checked under that digest (the same plan every
    round of a job: not fetched and hashed again each time)."""
    digest = request.training_plan_sha256
    cached = ctx.plan_cache.get(digest)
    if cached is not None:
        return cached
    _download(
        ctx,
        request.training_plan_url,
        digest,
        dest,
        what="training plan",
        mismatch=ErrorNumber.PLAN_DIGEST_MISMATCH,
    )
    size = _io(f"could not read the downloaded training plan {dest}", lambda: dest.stat().st_size)
    limit = ctx.settings.max_plan_bytes
    if size > limit:  # not read, not recorded, not imported: the request's fault
        raise RequestFailed(
            ErrorNumber.BAD_REQUEST,
            f"the training plan is {size} bytes, over this node's max_plan_bytes ({limit})",
        )
    source = _io(f"could not read the downloaded training plan {dest}", dest.read_bytes)
    if sha256_hex(source) != digest:  # read back what was checked: the bytes the node runs
        raise RequestFailed(
            ErrorNumber.PLAN_DIGEST_MISMATCH,
            f"the training plan read back from {dest} does not hash to {digest}",
        )
    ctx.remember_plan(digest, source)
    return source


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


def _aggregator_args(
    ctx: RoundContext, request: TrainRequest, work: Scratch
) -> tuple[dict[str, Any], dict[str, str]]:
    """The strategy's args for this node: values as sent, and each file arg (``{"url",
    "sha256"}``) downloaded into ``work`` and checked against its digest before the plan
    sees it (it is loaded as safetensors, never unpickled)."""
    values: dict[str, Any] = {}
    files: dict[str, str] = {}
    for i, (name, value) in enumerate(sorted(request.aggregator_args.items())):
        if isinstance(value, dict) and set(value) == {"url", "sha256"}:
            dest = work.path(f"aggregator-{i}.safetensors")
            _download(
                ctx,
                str(value["url"]),
                str(value["sha256"]),
                dest,
                what=f"aggregator file {name!r}",
                mismatch=ErrorNumber.PARAMS_DIGEST_MISMATCH,
            )
            files[name] = str(dest)
        else:
            values[name] = value
    return values, files


def _round_params(
    ctx: RoundContext, request: TrainRequest, work: Scratch
) -> tuple[str, bytes | None]:
    """The round's global parameters, checked against their digest: as bytes (``("",
    data)``) for an executor that takes them in memory and parameters within its limit, so
    that no file is written on the node's side of the round; else downloaded into the
    scratch directory (``(path, None)``)."""
    what, mismatch = "parameters file", ErrorNumber.PARAMS_DIGEST_MISMATCH
    if ctx.executor.in_memory:
        from fedsm.training.params import MAX_PARAMS_BYTES  # imports torch

        limit = ctx.executor.max_bytes_in_memory
        try:
            data = _read(
                ctx,
                request.params_url,
                request.params_sha256,
                what=what,
                mismatch=mismatch,
                max_bytes=MAX_PARAMS_BYTES if limit is None else min(limit, MAX_PARAMS_BYTES),
                too_large_ok=limit is not None,
            )
        except _TooLargeInMemory:
            pass  # through a file, below
        else:
            return "", data
    path = work.path("params_in.safetensors")
    _download(ctx, request.params_url, request.params_sha256, path, what=what, mismatch=mismatch)
    return str(path), None


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
        params_in, params_bytes = _round_params(ctx, request, work)
        in_memory = params_bytes is not None
        try:
            plan_text = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestFailed(
                ErrorNumber.PLAN_IMPORT_FAILED, f"the training plan is not UTF-8 text: {exc}"
            ) from None
        agg_values, agg_files = _aggregator_args(ctx, request, work)
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
