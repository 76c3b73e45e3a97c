"""One federated round, driven for a Job: send, collect (with a deadline), aggregate.

Kept apart from :mod:`fedsm.researcher.job` so that the Job stays the seed's surface and this module
holds the round's I/O: publishing train requests, taking replies from the inbox until every
node answered or the deadline passed, downloading and checking each node's parameters, and
streaming them through the aggregator in canonical (sorted node id) order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedsm.core.collect import classify, train_request_id
from fedsm.core.events import (
    Aggregated,
    JobCompleted,
    NodeFailed,
    ReplyReceived,
    RoundResent,
    RoundSent,
    RoundTimedOut,
)
from fedsm.core.messages import TrainRequest
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.core.seeds import derive_seed
from fedsm.repository.base import DigestMismatch, RepositoryError
from fedsm.repository.errors import InvalidRepositoryUrl
from fedsm.researcher.errors import JobError
from fedsm.strategies.fedavg import AggregationError
from fedsm.training.params import ParamsFileError, load_params

if TYPE_CHECKING:
    from fedsm.researcher.job import Job

__all__ = ["RoundDriver"]

log = logging.getLogger(__name__)


class RoundDriver:
    """Does the I/O of a Job's rounds; every fact goes through ``job._record``."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._collect_until = 0.0  # monotonic deadline of the round being collected
        self._like: tuple[str, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ send

    def send_round(
        self,
        round_number: int,
        args_thr_msg: Mapping[str, Mapping[str, Any]] | None = None,
        args_thr_files: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Publish round ``round_number``; after a restore mid-round, re-send it unchanged."""
        job = self.job
        state = job.state
        deadline_s = state.config.reply_deadline_s
        if state.status in ("round_sent", "collecting"):
            if state.round != round_number:
                raise JobError(f"round {state.round} is being collected, not {round_number}")
            pending = sorted(state.pending_nodes())
            if pending:
                # The aggregator's args are a function of the recorded state, so the re-sent
                # request is the very request the node may already have answered.
                agg_args = self._aggregator_args(round_number, None, None)
                for node in pending:
                    request = self._request(
                        node, round_number, agg_args.get(node, {}), job._clock() + deadline_s
                    )
                    job.requests.send(node, request)
                job._record(RoundResent(round=round_number, nodes=tuple(pending)))
            self._collect_until = time.monotonic() + deadline_s
            return
        if state.status not in ("approval_checked", "aggregated"):
            raise JobError(
                f"can not start a round in state {state.status!r}"
                + (
                    ": run check_training_plan_is_approved_by_nodes() first"
                    if state.status == "uploaded"
                    else ""
                )
            )
        nodes = list(state.config.nodes)
        offline = job.requests.offline_nodes(nodes)
        if offline:
            log.warning(
                "round %d: nodes %s are offline; their requests wait at the broker until they "
                "reconnect or the reply deadline (%.0f s) passes",
                round_number,
                offline,
                deadline_s,
            )
        agg_args = self._aggregator_args(round_number, args_thr_msg, args_thr_files)
        deadline = job._clock() + deadline_s
        request_ids = {}
        for node in nodes:
            request = self._request(node, round_number, agg_args.get(node, {}), deadline)
            job.requests.send(node, request)
            request_ids[node] = request.request_id
        self._collect_until = time.monotonic() + deadline_s
        job._record(
            RoundSent(
                round=round_number,
                nodes=tuple(nodes),
                request_ids=request_ids,
                params_url=state.params_url,
                params_sha256=state.params_sha256,
                deadline=deadline,
            )
        )

    def _aggregator_args(
        self,
        round_number: int,
        args_thr_msg: Mapping[str, Mapping[str, Any]] | None,
        args_thr_files: Mapping[str, Mapping[str, Any]] | None,
    ) -> dict[str, dict[str, Any]]:
        """Per node: the aggregator's own args for this round, plus any given explicitly."""
        job = self.job
        state = job.state
        small, files = job._aggregator.create_aggregator_args(
            round_number=round_number,
            node_ids=list(state.config.nodes),
            global_params_path=job.params_path(state.params_sha256),
            out_dir=job._files / "aggregator",
        )
        for node, args in (args_thr_msg or {}).items():
            small.setdefault(node, {}).update(args)
        for node, args in (args_thr_files or {}).items():
            files.setdefault(node, {}).update(args)
        return job.upload_aggregator_args(small, files)

    def _request(
        self, node: str, round_number: int, agg_args: Mapping[str, Any], deadline: float
    ) -> TrainRequest:
        state = self.job.state
        config = state.config
        return TrainRequest(
            request_id=train_request_id(state.job_id, round_number, node),
            researcher_id=self.job.requests.researcher_id,
            node_id=node,
            deadline=deadline,
            job_id=state.job_id,
            round=round_number,
            dataset_id=config.datasets[node],
            training_plan_url=state.plan_url,
            training_plan_sha256=state.plan_sha256,
            training_plan_class=config.training_plan_class,
            params_url=state.params_url,
            params_sha256=state.params_sha256,
            training_args=dict(config.training_args),
            model_args=dict(config.model_args),
            seed=derive_seed(config.seed, round_number, node),
            aggregator_args=dict(agg_args),
        )

    # ------------------------------------------------------------------ collect

    def collect(self, timeout_s: float | None = None) -> None:
        """Take replies until every node of the round answered or the deadline passed.

        ``timeout_s`` shortens the wait to that many seconds from now (tests step a round
        with it); by default the round's reply deadline applies.
        """
        job = self.job
        if timeout_s is not None:
            self._collect_until = min(self._collect_until, time.monotonic() + timeout_s)
        backlog: int | None = None  # messages already queued when the deadline passed
        while job.state.pending_nodes():
            remaining = self._collect_until - time.monotonic()
            if remaining <= 0:
                # Replies that arrived by the deadline still count, even if handling the
                # ones before them (download, fsync) took us past it; newer ones do not.
                backlog = job.requests.queued() if backlog is None else backlog - 1
                if backlog <= 0:
                    break
            message = job.requests.next_message(max(0.0, remaining))
            if message is None:
                break
            verdict = classify(job.state, message)
            if verdict.event is None:
                log.debug(
                    "ignored %s from %s: %s", message.command, message.node_id, verdict.reason
                )
                continue
            event = verdict.event
            if isinstance(event, ReplyReceived):
                event = self._fetch(event)
            job._record(event)
            if isinstance(event, NodeFailed):
                log.warning(
                    "node %s failed in round %d: [%d] %s",
                    event.node_id,
                    event.round,
                    event.code,
                    event.message,
                )
        missing = sorted(job.state.pending_nodes())
        if missing:
            log.warning("round %d timed out waiting for %s", job.state.round, missing)
            job._record(RoundTimedOut(round=job.state.round, missing=tuple(missing)))

    def _fetch(self, event: ReplyReceived) -> ReplyReceived | NodeFailed:
        """Download a node's parameters, check their digest, and check that they are
        parameters of this job's model (names, shapes, dtypes of the global parameters) with a
        positive sample size. A reply failing any of these fails the node, so that one bad
        reply can never block aggregation (nor every resume after it)."""
        job = self.job
        path = job.params_path(event.params_sha256)
        fetched = False  # only a file this reply brought may be removed again
        try:
            claimed = job.repository.digest_of_url(event.params_url)
            if claimed != event.params_sha256:
                raise DigestMismatch(
                    f"the reply names digest {event.params_sha256} but its URL is the file "
                    f"{claimed}"
                )
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                job.repository.download_file(event.params_url, path)
                fetched = True
            if event.sample_size <= 0:
                raise ParamsFileError(f"the node reported {event.sample_size} training samples")
            load_params(path, like=self._global_params())
            return event
        except DigestMismatch as exc:
            code, text = ErrorNumber.PARAMS_DIGEST_MISMATCH, f"could not fetch params: {exc}"
        except InvalidRepositoryUrl as exc:
            code, text = ErrorNumber.BAD_REQUEST, f"params URL is not of this repository: {exc}"
        except RepositoryError as exc:
            code, text = ErrorNumber.REPOSITORY_UNREACHABLE, f"could not fetch params: {exc}"
        except ParamsFileError as exc:
            code, text = ErrorNumber.PARAMS_INVALID, f"unusable reply: {exc}"
        if fetched:
            path.unlink(missing_ok=True)
        return NodeFailed(
            round=event.round,
            node_id=event.node_id,
            request_id=event.request_id,
            code=int(code),
            message=f"researcher: {text}",
        )

    def _global_params(self) -> dict[str, Any]:
        """The current global parameters, loaded once per round (the shape every reply needs)."""
        sha = self.job.state.params_sha256
        if self._like is None or self._like[0] != sha:
            self._like = (sha, load_params(self.job.params_path(sha)))
        return self._like[1]

    # ------------------------------------------------------------------ aggregate

    def aggregate(self) -> str:
        """FedAvg of the round's replies in sorted node order; fail the job below quorum."""
        job = self.job
        state = job.state
        if state.status not in ("collecting", "round_sent"):
            raise JobError(f"nothing to aggregate in state {state.status!r}")
        replies = state.replies.get(state.round, {})
        config = state.config
        if len(replies) < config.min_nodes:
            failed = sorted(state.failures.get(state.round, {}))
            missing = sorted(state.timed_out.get(state.round, ()))
            job._fail(
                f"round {state.round}: only {len(replies)} of {len(state.round_nodes)} nodes "
                f"replied, min_nodes is {config.min_nodes} (failed: {failed}, no reply: "
                f"{missing}); check those nodes (fedsm node start ...) or lower min_nodes"
            )
        nodes = sorted(replies)
        weights = {n: float(replies[n].sample_size) for n in nodes}
        items = [(n, job.params_path(replies[n].params_sha256), weights[n]) for n in nodes]
        tmp = job.params_path("aggregate").with_suffix(".tmp")
        try:
            sha = job._aggregator.aggregate_files(items, tmp)
        except AggregationError as exc:  # replies were checked one by one; a set can still fail
            tmp.unlink(missing_ok=True)
            job._fail(f"round {state.round}: aggregation failed: {exc}")
        path = job._store_params(tmp, sha)
        up = job.repository.upload_file(path)
        job._record(
            Aggregated(
                round=state.round,
                params_url=up["file"],
                params_sha256=sha,
                nodes=tuple(nodes),
                weights=weights,
                aggregator=job._aggregator.name,
            )
        )
        if state.round >= config.round_limit:
            job._record(JobCompleted(round=state.round, params_url=up["file"], params_sha256=sha))
        return sha
