"""The node: answers a researcher's requests over a :class:`~fedsm.transport.base.Bus`.

Handlers run on the transport's delivery thread, so they only do what is quick: ping, list
and search are answered right there (sqlite reads); a plan-status request (a download) goes
to the executor's control pool; a train request goes to the node's lane on the executor, so
trainings run one at a time and never on the delivery thread. A train request already
answered is answered again from the reply cache (in sqlite, so it survives a restart) and a
copy arriving while the first is still being served gets the same reply when it is ready
(it is not trained again).

The reply cache is scoped by researcher, request id and content (:func:`cache_key`): anyone
who may publish on a node's request topic can send a request under an id the genuine
researcher uses, and that request is served as its own; it never answers, nor blocks, the
genuine one. Only train replies are cached, never an error: a request that met a transient
fault of the node (``NODE_BUSY``: its registry locked by another process; ``NODE_IO_ERROR``:
no space left, a read-only file system) is served again, from the start, when it is re-sent
under the same id.

Failures become one error reply and one warning line, without a traceback, when they are
faults of the node's machine (see :func:`~fedsm.node.executor.io_fault`) or of the request;
only an unexpected error (``INTERNAL``) logs its traceback.

Every job-scoped request carries the researcher's log head; the node records it (see
:mod:`fedsm.node.witness`) on the delivery thread as soon as the request is addressed to it,
before serving it: one small sqlite write, without an fsync but for ``job-end`` (whose reply
says the final head is kept), made durable against a machine crash by the next synced write
(a train reply's cache write, a job-end).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack

from fedsm.core.messages import (
    BROADCAST,
    ErrorReply,
    JobEndReply,
    JobEndRequest,
    ListReply,
    ListRequest,
    Message,
    PingReply,
    PingRequest,
    Reply,
    Request,
    SearchReply,
    SearchRequest,
    TrainingPlanStatusReply,
    TrainingPlanStatusRequest,
    TrainRequest,
)
from fedsm.core.protocol import decode, encode
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.digests import sha256_hex
from fedsm.node.database import DB_FILE, NodeDatabase, ReplyCache
from fedsm.node.errors import RegistryBusy, RequestFailed
from fedsm.node.executor import TrainingExecutor, describe_io_fault, io_fault
from fedsm.node.fetch import RoundContext, fetch_plan
from fedsm.node.registry import ApprovalRegistry, DatasetRegistry, PlanTooLarge, public_dataset
from fedsm.node.round import run_train_request
from fedsm.node.settings import NodeSettings, load_settings
from fedsm.node.witness import WitnessStore
from fedsm.repository.base import Repository
from fedsm.transport.base import Bus

__all__ = ["Node", "cache_key", "failure", "request_fingerprint"]

log = logging.getLogger(__name__)


#: Fields of a train request that say when or where, not what: a re-send may change them.
#: Fields that say when and where, not what: a re-sent request may carry others. The log
#: head moves with every record the researcher appends before re-sending.
_LOCATION_FIELDS = ("deadline", "training_plan_url", "params_url", "log_head")


def _canonical(value: Any) -> Any:
    """``value`` with every map's keys sorted (so equal content packs to equal bytes)."""
    if isinstance(value, Mapping):
        return {k: _canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _without_file_urls(aggregator_args: Mapping[str, Any]) -> dict[str, Any]:
    """``aggregator_args`` minus the location of every file arg (``{"url", "sha256"}``)."""
    out: dict[str, Any] = {}
    for name, value in aggregator_args.items():
        if isinstance(value, Mapping) and "sha256" in value:
            value = {k: v for k, v in value.items() if k != "url"}
        out[name] = value
    return out


def request_fingerprint(request: TrainRequest) -> str:
    """sha256 of what a train request asks for, without when and where it says so.

    Files are named by their digests, so their URLs are left out: the deadline, the plan's and
    the params' URLs, the researcher's log head, and the ``url`` of every file arg in
    ``aggregator_args`` (one that also carries its ``sha256``). A run directory that moved
    (its repository now at another path or URL) re-sends the same request under new URLs and
    gets the cached reply.
    """
    body = request.to_dict()
    for name in _LOCATION_FIELDS:
        body.pop(name, None)
    body["aggregator_args"] = _without_file_urls(body.get("aggregator_args") or {})
    return sha256_hex(msgpack.packb(_canonical(body), use_bin_type=True))


def _fingerprint_v1(request: TrainRequest) -> str:
    """The fingerprint older nodes stored (everything but the deadline, as sent): still
    accepted, so a request answered before an upgrade is answered from the cache after it."""
    body = request.to_dict()
    body.pop("deadline", None)
    body.pop("log_head", None)  # not a field of the protocol then
    return sha256_hex(msgpack.packb(body, use_bin_type=True))


def cache_key(request: TrainRequest, fingerprint: str | None = None) -> str:
    """The reply cache's key of a train request: its id, its researcher and its content, so
    that a request sent under another's id never shares the other's entry."""
    fingerprint = request_fingerprint(request) if fingerprint is None else fingerprint
    return f"{request.request_id}/{request.researcher_id}/{fingerprint}"


def failure(exc: BaseException) -> tuple[ErrorNumber, str] | None:
    """The code and one-line detail an error reply carries for ``exc``, or None for an
    unexpected error (``INTERNAL``, whose traceback belongs in the log)."""
    if isinstance(exc, RequestFailed):
        return exc.code, exc.detail
    fault = io_fault(exc)
    if fault is not None:
        return ErrorNumber.NODE_IO_ERROR, describe_io_fault(fault)
    if isinstance(exc, RegistryBusy):
        return ErrorNumber.NODE_BUSY, str(exc)
    if isinstance(exc, PlanTooLarge):
        return ErrorNumber.BAD_REQUEST, str(exc)
    return None


class Node:
    """A hospital node: its registries, its settings, and the request handlers.

    Parameters
    ----------
    node_dir
        The directory made by ``fedsm node init`` (settings, ``node.sqlite``, scratch files).
    bus
        This node's connection; the node owns it from now on and closes it in :meth:`stop`.
    repository
        Where plans and parameters are downloaded from and results uploaded to.
    settings
        Defaults to :func:`~fedsm.node.settings.load_settings` of ``node_dir``.
    executor
        Runs trainings. A given executor is shared, not owned: the node never closes it.
        Without one, the node makes and owns a
        :class:`~fedsm.node.process_executor.ProcessTrainingExecutor`.
    durable
        fsync the registry on every write (``False`` for simulated nodes).
    """

    def __init__(
        self,
        node_dir: str | Path,
        *,
        bus: Bus,
        repository: Repository,
        settings: NodeSettings | None = None,
        executor: TrainingExecutor | None = None,
        durable: bool = True,
    ) -> None:
        self.node_dir = Path(node_dir)
        self.settings = settings if settings is not None else load_settings(self.node_dir)
        self.node_id = self.settings.node_id
        self.bus = bus
        self.repository = repository
        self._owns_executor = executor is None
        if executor is None:
            from fedsm.node.process_executor import ProcessTrainingExecutor

            executor = ProcessTrainingExecutor(time_limit_s=self.settings.training_time_limit_s)
        self.executor = executor
        self.db = NodeDatabase(
            self.node_dir / DB_FILE,
            durable=durable,
            busy_timeout_s=self.settings.registry_busy_timeout_s,
        )
        self.datasets = DatasetRegistry(self.db)
        self.plans = ApprovalRegistry(
            self.db,
            max_plan_bytes=self.settings.max_plan_bytes,
            max_pending_plans=self.settings.max_pending_plans,
        )
        self.replies = ReplyCache(self.db)
        self.witness = WitnessStore(self.db)
        self._ctx = RoundContext(
            node_id=self.node_id,
            node_dir=self.node_dir,
            settings=self.settings,
            repository=repository,
            executor=executor,
            datasets=self.datasets,
            plans=self.plans,
        )
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}  # cache key -> copies waiting for the reply
        self._started = False
        self._stopped = False
        self.trainings_run = 0  # trainings actually started (idempotence is visible here)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Node:
        """Subscribe to the bus and get the executor ready; returns ``self``."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"node {self.node_id} was stopped; make a new Node")
            if self._started:
                return self
            self._started = True
        self.executor.start()
        self.bus.subscribe(self.handle)
        log.info("node %s started", self.node_id)
        return self

    def stop(self) -> None:
        """Stop answering, close the bus (announcing offline) and what the node owns."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self.bus.close()
        finally:
            if self._owns_executor:
                self.executor.close(wait=True)
            self.db.close()
        log.info("node %s stopped", self.node_id)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- dispatch

    def handle(self, message: Message) -> None:
        """Serve one message from the bus. Never raises: failures become error replies."""
        if self._stopped:
            return
        if not isinstance(message, Request):
            log.warning(
                "node %s dropped a %r message: a node only serves requests",
                self.node_id,
                message.command,
            )
            return
        if message.node_id not in (self.node_id, BROADCAST):
            log.warning(
                "node %s dropped a %s request addressed to %s",
                self.node_id,
                message.command,
                message.node_id,
            )
            return
        try:
            self._witness(message)
            if isinstance(message, PingRequest):
                self._send(PingReply(**self._reply_head(message)))
            elif isinstance(message, ListRequest):
                datasets = tuple(public_dataset(d) for d in self.datasets.list())
                self._send(ListReply(**self._reply_head(message), datasets=datasets))
            elif isinstance(message, SearchRequest):
                found = tuple(public_dataset(d) for d in self.datasets.search(message.tags))
                self._send(SearchReply(**self._reply_head(message), datasets=found))
            elif isinstance(message, TrainingPlanStatusRequest):
                self.executor.submit_control(lambda: self._guarded(message, self._serve_status))
            elif isinstance(message, TrainRequest):
                self._accept_train(message)
            elif isinstance(message, JobEndRequest):
                self._send(
                    JobEndReply(
                        **self._reply_head(message),
                        job_id=message.job_id,
                        seq=message.log_head["seq"],
                    )
                )
            else:
                raise RequestFailed(
                    ErrorNumber.UNKNOWN_COMMAND, f"command {message.command!r} is not served"
                )
        except Exception as exc:  # never let one request take the node down
            self._fail(message, exc)

    def _witness(self, request: Request) -> None:
        """Keep the log head a job-scoped request carries (before serving it: a request that
        fails was still received). Only ``job-end`` is fsynced here; see the module doc."""
        head = getattr(request, "log_head", None)
        if head is None:
            return
        self.witness.record(
            request.job_id,  # type: ignore[attr-defined]  # every request with a head has one
            request.researcher_id,
            head,
            request.command,
            sync=isinstance(request, JobEndRequest),
        )

    def _reply_head(self, request: Request) -> dict[str, str]:
        return {
            "request_id": request.request_id,
            "researcher_id": request.researcher_id,
            "node_id": self.node_id,
        }

    def _send(self, reply: Reply) -> None:
        if self._stopped:
            log.info("node %s stopped; %s reply not sent", self.node_id, reply.command)
            return
        try:
            self.bus.reply(reply)
        except Exception:
            log.exception("node %s could not send its %s reply", self.node_id, reply.command)

    def _send_error(self, request: Request, code: ErrorNumber, detail: str) -> None:
        job_id = getattr(request, "job_id", None)
        # A node being stopped interrupts its trainings on purpose: not a failure to warn of.
        log.log(
            logging.INFO if self._stopped else logging.WARNING,
            "node %s: %s request %s (job %s) failed with %s (%d): %s",
            self.node_id,
            request.command,
            request.request_id,
            job_id,
            code.name,
            int(code),
            detail,
        )
        self._send(
            ErrorReply(
                **self._reply_head(request),
                code=int(code),
                message=f"{code.meaning}: {detail}"[:60_000],
                job_id=job_id,
                round=getattr(request, "round", -1),
            )
        )

    def _fail(self, request: Request, exc: Exception) -> None:
        """Answer ``request`` with the error reply for ``exc`` (see :func:`failure`)."""
        if self._stopped:  # stopped while serving it (its registry closed): not a failure
            log.info(
                "node %s stopped while serving %s %s; not answered (%s: %s)",
                self.node_id,
                request.command,
                request.request_id,
                type(exc).__name__,
                exc,
            )
            return
        known = failure(exc)
        if known is None:
            log.exception("node %s: %s request failed", self.node_id, request.command)
            known = ErrorNumber.INTERNAL, f"{type(exc).__name__}: {exc}"
        self._send_error(request, *known)

    def _guarded(self, request: Request, serve: Callable[[Any], None]) -> None:
        """Run ``serve(request)`` off the delivery thread, turning failures into replies."""
        if self._stopped:
            return
        try:
            serve(request)
        except Exception as exc:
            self._fail(request, exc)

    # ----------------------------------------------------------------- plan status

    def _serve_status(self, request: TrainingPlanStatusRequest) -> None:
        work = self._ctx.scratch_dir(request.request_id)
        try:
            source = fetch_plan(self._ctx, request, work / "plan.py")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        status = self.plans.status(request.training_plan_sha256)
        if status == "unknown":  # so the operator sees what researchers ask for
            self.plans.record_pending(
                source,
                name=f"plan of job {request.job_id}",
                origin=f"status request {request.request_id} from {request.researcher_id}",
            )
        self._send(
            TrainingPlanStatusReply(
                **self._reply_head(request),
                job_id=request.job_id,
                training_plan_sha256=request.training_plan_sha256,
                status=status,
                approval_required=self.settings.enforce_approval,
            )
        )

    # ----------------------------------------------------------------- train

    def _cached_reply(self, request: TrainRequest, key: str) -> Reply | None:
        """The reply cached for this very request (same id, researcher and content), or None.

        An entry of another request under the same id (another researcher's, or other
        content) is not this request's: it is left alone and this request is served."""
        cached = self.replies.get(key)
        if cached is None:
            # Nodes of earlier versions keyed the cache by request id alone; their
            # fingerprints cover the researcher id and the content too.
            cached = self.replies.get(request.request_id)
            if cached is None:
                return None
            if cached[0] not in (request_fingerprint(request), _fingerprint_v1(request)):
                log.info(
                    "node %s: request id %s is cached for another request (another "
                    "researcher, or other content); serving this one as its own",
                    self.node_id,
                    request.request_id,
                )
                return None
        reply = decode(cached[1])
        assert isinstance(reply, Reply)
        return reply

    def _accept_train(self, request: TrainRequest) -> None:
        key = cache_key(request)
        cached = self._cached_reply(request, key)
        if cached is not None:
            log.info("node %s answers train %s from its cache", self.node_id, request.request_id)
            self._send(cached)
            return
        with self._lock:
            if key in self._in_flight:
                self._in_flight[key] += 1
                log.info(
                    "node %s: train %s is already being served", self.node_id, request.request_id
                )
                return
            self._in_flight[key] = 1
        try:
            self.executor.submit(self, lambda: self._serve_train(request, key))
        except BaseException:
            with self._lock:
                self._in_flight.pop(key, None)
            raise

    def _serve_train(self, request: TrainRequest, key: str) -> None:
        reply: Reply | None = None
        error: Exception | None = None
        try:
            if self._stopped:
                return
            reply = self._cached_reply(request, key)  # answered while this copy was queued
            if reply is None:
                self.trainings_run += 1
                train_reply = run_train_request(self._ctx, request)
                if self._stopped:  # stopped while training: the registry is closed
                    log.info(
                        "node %s stopped during train %s; reply dropped",
                        self.node_id,
                        request.request_id,
                    )
                    return
                # Kept before it is sent: a reply that could not be kept (a full disk) is not
                # sent; the request is answered NODE_IO_ERROR and served again when re-sent.
                # The key ends with the request's fingerprint (see cache_key).
                self.replies.put(key, key.rsplit("/", 1)[1], encode(train_reply))
                reply = train_reply
        except Exception as exc:
            error = exc
        finally:
            with self._lock:
                copies = self._in_flight.pop(key, 1)
        # Answered only once the request is no longer in flight: a re-send prompted by this
        # answer (a transient error) is served again, not taken for a copy of this one.
        if error is not None:
            self._fail(request, error)
        elif reply is not None:
            for _ in range(copies):
                self._send(reply)
