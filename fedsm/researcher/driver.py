"""The I/O of a Job's commands: what :mod:`fedsm.core.policy` decided, carried out.

Every method here runs after the events that decided it are in the log, and records what it
learns through ``job._record`` before it goes on. It asks the nodes about approval, prepares
a round's aggregator arguments as local files, uploads what a request names (content
addressed, so an upload after a crash is the same upload), publishes the requests
``RoundSent`` describes, takes replies until the round's deadline, downloads and checks each
reply's parameters, and streams them through the aggregator in sorted node order.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedsm.core.collect import classify
from fedsm.core.events import (
    Aggregated,
    ApprovalChecked,
    JobFailed,
    NodeFailed,
    NodeRetrying,
    ReplyReceived,
    RoundSent,
)
from fedsm.core.messages import (
    JobEndReply,
    JobEndRequest,
    TrainingPlanStatusReply,
    TrainingPlanStatusRequest,
    TrainRequest,
)
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.core.seeds import derive_seed
from fedsm.digests import is_sha256, sha256_file
from fedsm.repository.base import DigestMismatch, RepositoryError
from fedsm.researcher.errors import JobError, JobFailedError
from fedsm.strategies.base import (
    MissingReplyData,
    NodeArgsContext,
    NodeUpdate,
    StrategyError,
    aggregate_files,
)
from fedsm.training.params import ParamsFileError, load_params, save_params

if TYPE_CHECKING:
    from fedsm.researcher.job import Job

__all__ = ["RoundDriver"]

log = logging.getLogger(__name__)

#: How long the end of a job waits for nodes to acknowledge its final head.
END_WAIT_S = 5.0
#: The longest a collect waits without looking whether a pending node came back online.
ONLINE_POLL_S = 0.25


def _is_file_arg(value: Any) -> bool:
    """An aggregator arg sent through the repository: a ``pathlib.Path`` or a non-empty
    mapping of tensors. Anything else (a ``str`` too) is a value for the message."""
    if isinstance(value, Path):
        return True
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


class RoundDriver:
    """Carries out a Job's commands; every fact it learns goes through ``job._record``."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._uploaded: set[str] = set()  # digests known to be in the repository
        self.last_message: Any = None  # the seed's Job.last_msg
        self._like: tuple[str, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ uploads

    def ensure_uploaded(self, digests: list[str]) -> None:
        """Upload the job's local files with these digests unless the repository has them.

        Called before a request names them: a file becomes visible to the nodes only after
        the event that decided it is recorded, and a restore re-uploads what a crash cut.
        """
        job = self.job
        job._log.flush()  # decide, record, then act: durable before anything is visible
        for sha in digests:
            if sha in self._uploaded:
                continue
            if not job.repository.exists(sha):
                path = job._files.find(sha)
                if path is None:
                    raise JobError(
                        f"the job's file {sha} is neither in the repository nor under "
                        f"{job._files.root}; copy the run directory whole, or point the job "
                        "at the repository that holds it"
                    )
                up = job.repository.upload_file(path)
                if up["sha256"] != sha:
                    raise DigestMismatch(f"uploaded {path} as {up['sha256']}, expected {sha}")
            self._uploaded.add(sha)

    def local_params(self, sha256: str) -> Path:
        """The local file of parameters with this digest, fetched by digest from the
        repository when this machine does not hold it (a run resumed elsewhere, or with
        another ``keep_files_dir``)."""
        path = self.job.params_path(sha256)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.job.repository.download_file(self.job.repository.url_for(sha256), path)
        return path

    # ------------------------------------------------------------------ approval

    def ask_approval(self, deadline_s: float | None) -> ApprovalChecked:
        """Send ``training-plan-status`` to every node of the job; the event that records it.

        A node that does not answer within the deadline counts as ``no-reply`` and as
        requiring approval (the safe assumption).
        """
        job = self.job
        state = job.state
        config = state.config
        assert config is not None and state.plan_sha256 is not None
        self.ensure_uploaded([state.plan_sha256])  # flushes the log first
        deadline_s = config.reply_deadline_s if deadline_s is None else deadline_s
        replies = job.requests.ask(
            TrainingPlanStatusRequest,
            state.nodes,
            deadline_s,
            job_id=state.job_id,
            training_plan_url=job.repository.url_for(state.plan_sha256),
            training_plan_sha256=state.plan_sha256,
            log_head=job.log_head,
        )
        statuses: dict[str, str] = {}
        required: dict[str, bool] = {}
        for node in state.nodes:
            reply = replies.get(node)
            if isinstance(reply, TrainingPlanStatusReply):
                statuses[node] = reply.status
                required[node] = reply.approval_required
            else:
                statuses[node] = "no-reply"
                required[node] = True
        return ApprovalChecked(
            plan_sha256=state.plan_sha256, statuses=statuses, approval_required=required
        )

    # ------------------------------------------------------------------ a round's args

    def aggregator_args(
        self,
        round_number: int,
        args_thr_msg: Mapping[str, Mapping[str, Any]] | None,
        args_thr_files: Mapping[str, Mapping[str, Any]] | None,
    ) -> dict[str, dict[str, Any]]:
        """Per node: the strategy's args for this round plus any given explicitly.

        As in the seed, ``args_thr_msg`` values travel inside the train request, and so do
        the values of ``args_thr_files`` that are not files: only a :class:`pathlib.Path`
        (a file to send) or a mapping of tensors (saved as safetensors) goes through the
        repository, recorded as ``{"sha256": digest}`` of a file kept under the job's files
        (uploaded when the request is published). A ``str`` is a value, never a path. The
        strategy's own files (``create_aggregator_args``) always go through the repository.
        Every value in a message must be JSON-like (None, bool, int, float, str, lists and
        str-keyed maps): anything else raises :class:`JobError`, before anything is recorded.
        """
        job = self.job
        state = job.state
        assert state.params_sha256 is not None
        node_ids = tuple(sorted(job.nodes))
        try:
            wanted = job._aggregator.node_args(
                NodeArgsContext(
                    round=round_number,
                    node_ids=node_ids,
                    all_nodes=job.state.strategy_nodes,
                    global_params=self._global_params(),
                    state=self._strategy_state(),
                )
            )
        except StrategyError as exc:
            raise JobError(f"round {round_number}: the strategy's node args: {exc}") from exc
        out: dict[str, dict[str, Any]] = {n: {} for n in node_ids}
        files: dict[str, dict[str, Any]] = {}
        for node, args in wanted.items():
            for name, value in args.items():
                if _is_file_arg(value):
                    files.setdefault(node, {})[name] = value
                else:
                    out.setdefault(node, {})[name] = value
        for node, args in (args_thr_msg or {}).items():
            # A file named the seed's way ({arg_name, filename, url, sha256}, as
            # upload_aggregator_args returns it) is recorded by digest only: a local path or
            # URL never goes into the log.
            out.setdefault(node, {}).update(
                {
                    name: {"sha256": v["sha256"]}
                    if isinstance(v, Mapping) and is_sha256(v.get("sha256"))
                    else v
                    for name, v in args.items()
                }
            )
        for node, heavy in files.items():
            for name, value in heavy.items():
                out.setdefault(node, {})[name] = {"sha256": self._keep_file(name, node, value)}
        for node, args in (args_thr_files or {}).items():
            for name, value in args.items():
                if _is_file_arg(value):
                    value = {"sha256": self._keep_file(name, node, value)}
                out.setdefault(node, {})[name] = value
        out = {n: a for n, a in out.items() if a}
        try:  # what RoundSent will record: JSON-like values only
            RoundSent(
                round=round_number,
                nodes=(),
                request_ids={},
                params_sha256=state.params_sha256,
                deadline=0.0,
                aggregator_args=out,
            )
        except ValueError as exc:
            raise JobError(
                f"aggregator args can not be sent: {exc}; send tensors as a mapping of "
                "tensors or a file as a pathlib.Path in aggregator_args_thr_files"
            ) from None
        return out

    def _keep_file(self, name: str, node: str, value: Any) -> str:
        """Keep an aggregator arg file (a path, or a mapping of tensors to save) under the
        job's files; return its digest. Raises :class:`JobError` for a file that can not be
        read or tensors that can not be saved."""
        root = self.job._files.root
        tmp = root / "aggregator" / f"{name}-{node}.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            if isinstance(value, (str, Path)):
                shutil.copyfile(value, tmp)
                sha = sha256_file(tmp)
            else:
                sha = save_params(tmp, value)
        except (OSError, ParamsFileError, TypeError) as exc:
            tmp.unlink(missing_ok=True)
            raise JobError(f"aggregator arg {name!r} for {node}: can not keep it: {exc}") from exc
        self.job._files.store(tmp, sha, kind="aggregator")
        return sha

    # ------------------------------------------------------------------ publish

    def publish(self, round_number: int, nodes: tuple[str, ...]) -> None:
        """Send the requests ``RoundSent`` recorded for ``round_number`` to ``nodes``."""
        job = self.job
        state = job.state
        assert state.round == round_number and state.plan_sha256 and state.params_sha256
        args = state.round_aggregator_args
        file_args = [
            v["sha256"]
            for node in nodes
            for v in dict(args.get(node, {})).values()
            if isinstance(v, Mapping) and set(v) == {"sha256"} and is_sha256(v["sha256"])
        ]
        # The strategy's state of the last aggregation too: uploaded after the event naming
        # it, so a process killed in between uploads it here (the audit fetches it).
        recorded = [state.strategy_state_sha256] if state.strategy_state_sha256 else []
        self.ensure_uploaded([state.plan_sha256, state.params_sha256, *recorded, *file_args])
        offline = job.requests.offline_nodes(nodes)
        if offline:
            log.warning(
                "round %d: nodes %s are offline; their requests wait at the broker until they "
                "reconnect or the reply deadline passes",
                round_number,
                offline,
            )
        for node in nodes:
            job.requests.send(node, self.request(node))

    def request(self, node: str) -> TrainRequest:
        """The train request of ``node`` in the current round, rebuilt from the recorded
        ``RoundSent`` (and the repository's location, which is configuration)."""
        job = self.job
        state = job.state
        config = state.config
        assert config is not None and state.job_id and state.plan_sha256 and state.params_sha256
        url_for = job.repository.url_for
        agg_args = {
            name: (
                {"url": url_for(v["sha256"]), "sha256": v["sha256"]}
                if isinstance(v, Mapping) and set(v) == {"sha256"}
                else v
            )
            for name, v in dict(state.round_aggregator_args.get(node, {})).items()
        }
        return TrainRequest(
            request_id=state.request_ids[node],
            researcher_id=job.requests.researcher_id,
            node_id=node,
            deadline=state.round_deadline,
            job_id=state.job_id,
            round=state.round,
            dataset_id=config.datasets[node],
            training_plan_url=url_for(state.plan_sha256),
            training_plan_sha256=state.plan_sha256,
            training_plan_class=config.training_plan_class,
            params_url=url_for(state.params_sha256),
            params_sha256=state.params_sha256,
            training_args=dict(state.training_args),
            model_args=dict(config.model_args),
            seed=derive_seed(config.seed, state.round, node),
            aggregator_args=agg_args,
            do_training=state.round_do_training,
            log_head=job.log_head,
        )

    # ------------------------------------------------------------------ collect

    def collect(self, until: float, timeout_s: float | None = None) -> bool:
        """Take replies until every node of the round answered or ``until`` (job clock) passed;
        return True if the wait ran to its end (the round's window is used up).

        ``timeout_s`` shortens the wait to that many seconds from now (tests step a round with
        it); such a shortened wait never counts as the window's end.
        """
        job = self.job
        window = max(0.0, until - job._clock())
        stop_at = time.monotonic() + window
        if timeout_s is not None and timeout_s < window:
            stop_at, window_end = time.monotonic() + timeout_s, False
        else:
            window_end = True
        backlog: int | None = None  # messages already queued when the wait ended
        while job.state.has_pending():
            if any(job.state.is_pending(n) for n in job.requests.came_online()):
                return False  # a pending node is back: the policy sends it its request again
            remaining = stop_at - time.monotonic()
            if remaining <= 0:
                # Replies that arrived by the deadline still count, even if handling the ones
                # before them (download, fsync) took us past it; newer ones do not.
                backlog = job.requests.queued() if backlog is None else backlog - 1
                if backlog <= 0:
                    return window_end
            # Bounded waits: a node coming back online is noticed within ONLINE_POLL_S.
            message = job.requests.next_message(max(0.0, min(remaining, ONLINE_POLL_S)))
            if message is None:
                continue
            self.last_message = message
            verdict = classify(job.state, message, job._clock())
            if verdict.event is None:
                log.debug(
                    "ignored %s from %s: %s", message.command, message.node_id, verdict.reason
                )
                continue
            event = verdict.event
            if isinstance(event, ReplyReceived):
                event = self._fetch(event)
            job._record(event)
            if isinstance(event, NodeRetrying):
                log.warning(
                    "node %s answered round %d with a transient error, asked again in %.1f s: "
                    "[%d] %s",
                    event.node_id,
                    event.round,
                    max(0.0, event.retry_at - job._clock()),
                    event.code,
                    event.message,
                )
                return False  # the policy schedules the retry
            if isinstance(event, NodeFailed):
                log.warning(
                    "node %s failed in round %d: [%d] %s",
                    event.node_id,
                    event.round,
                    event.code,
                    event.message,
                )
        return False

    def _fetch(self, event: ReplyReceived) -> ReplyReceived | NodeFailed:
        """Download a node's parameters from this job's repository by digest, and check that
        they are parameters of this job's model (names, shapes, dtypes of the global
        parameters) with a positive sample size. A reply failing any of these fails the node,
        so that one bad reply can never block aggregation (nor every resume after it)."""
        job = self.job
        path = job.params_path(event.params_sha256)
        fetched = False  # only a file this reply brought may be removed again
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                job.repository.download_file(job.repository.url_for(event.params_sha256), path)
                fetched = True
            if event.sample_size <= 0:
                raise ParamsFileError(f"the node reported {event.sample_size} training samples")
            load_params(path, like=self._global_params())
            if job.state.round_do_training:  # what the strategy needs beside the parameters
                job._aggregator.check_update(
                    NodeUpdate(event.node_id, float(event.sample_size), event.extras, dict)
                )
            return event
        except MissingReplyData as exc:
            code, text = ErrorNumber.BAD_REQUEST, f"unusable reply: {exc}"
        except DigestMismatch as exc:
            code, text = ErrorNumber.PARAMS_DIGEST_MISMATCH, f"could not fetch params: {exc}"
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
        assert sha is not None
        if self._like is None or self._like[0] != sha:
            self._like = (sha, load_params(self.local_params(sha)))
        return self._like[1]

    # ------------------------------------------------------------------ the end

    def announce_end(self, status: str) -> list[str]:
        """Send every node the job's final log head (``job-end``); return the nodes that did
        not acknowledge it within a short wait. Nothing is recorded: the head is the log's
        last record, and recording the answers would move it."""
        job = self.job
        config = job.state.config
        assert config is not None and job.state.params_sha256 is not None
        # The final parameters are uploaded after the event naming them; a process killed in
        # between uploads them here, on its way out (no later request would).
        state_sha = job.state.strategy_state_sha256
        self.ensure_uploaded([job.state.params_sha256, *([state_sha] if state_sha else [])])
        wait_s = min(config.reply_deadline_s, END_WAIT_S)
        nodes = sorted(set(config.nodes) | set(job.state.nodes))  # all that ever took part
        replies = job.requests.ask(
            JobEndRequest,
            nodes,
            wait_s,
            job_id=job.state.job_id,
            status=status,
            log_head=job.log_head,
        )
        missing = [n for n in nodes if not isinstance(replies.get(n), JobEndReply)]
        if missing:
            log.warning(
                "nodes %s did not acknowledge the job's final head (seq %d); their witness "
                "files end earlier",
                missing,
                job.last_seq,
            )
        return missing

    # ------------------------------------------------------------------ aggregate

    def _strategy_state(self) -> dict[str, torch.Tensor] | None:
        """The strategy's state after the last aggregation (by the digest ``Aggregated``
        recorded; fetched from the repository when this machine lacks it), or None."""
        sha = self.job.state.strategy_state_sha256
        if sha is None:
            return None
        return load_params(self._local_file(sha))

    def _local_file(self, sha256: str) -> Path:
        """A job artifact kept by digest (not parameters), fetched by digest when absent."""
        job = self.job
        path = job._files.find(sha256)
        if path is None:
            path = job._files.aggregator(sha256)
            path.parent.mkdir(parents=True, exist_ok=True)
            job.repository.download_file(job.repository.url_for(sha256), path)
        return path

    def aggregate(self) -> str:
        """Aggregate the round's replies in sorted node order; record ``Aggregated``, then
        upload the result (and the strategy's new state). An aggregation that fails records
        ``JobFailed`` and raises."""
        job = self.job
        state = job.state
        assert state.params_sha256 is not None
        replies = state.round_replies
        nodes = sorted(replies)
        weights = {n: float(replies[n].sample_size) for n in nodes}
        items = [
            (n, self.local_params(replies[n].params_sha256), weights[n], replies[n].extras)
            for n in nodes
        ]
        state_sha = state.strategy_state_sha256
        tmp = job._files.root / "params" / "aggregate.tmp"
        state_tmp = job._files.root / "aggregator" / "state.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        state_tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            sha, new_state = aggregate_files(
                job._aggregator,
                round=state.round,
                global_params_path=self.local_params(state.params_sha256),
                replies=items,
                all_nodes=job.state.strategy_nodes,
                state_path=None if state_sha is None else self._local_file(state_sha),
                out_path=tmp,
                state_out_path=state_tmp,
                # as durable as the log that will name them (a simulation's "process" log
                # survives a killed process, as a file written without fsync does)
                durable=job._log.durability in ("always", "batch"),
            )
        except (StrategyError, ParamsFileError) as exc:  # a set of checked replies can fail
            tmp.unlink(missing_ok=True)
            state_tmp.unlink(missing_ok=True)
            reason = f"round {state.round}: aggregation failed: {exc}"
            job._record(JobFailed(round=state.round, reason=reason))
            raise JobFailedError(reason) from exc
        job._files.store(tmp, sha)
        if new_state is not None:
            job._files.store(state_tmp, new_state, kind="aggregator")
        job._record(
            Aggregated(
                round=state.round,
                params_sha256=sha,
                nodes=tuple(nodes),
                weights=weights,
                aggregator=job.state.config.aggregator,  # type: ignore[union-attr]
                state_sha256=new_state,
            )
        )
        self.ensure_uploaded([sha] if new_state is None else [sha, new_state])
        return sha
