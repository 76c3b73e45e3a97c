"""The researcher's Job: Fed-BioMed's ``Job`` rebuilt on the event log and the lifecycle.

Every step is recorded as an event before anything relies on it, and every piece of state
(``training_replies``, the round, the current parameters...) is the fold of the log: the Job
holds the log, the folded :class:`~fedsm.core.lifecycle.JobState`, and handles to the bus and the
repository, nothing else. Parameters stay on disk, addressed by digest, under
``<run_dir>/files``.

A breakpoint is just (log, seq): :meth:`Job.restore` rebuilds a Job from ``<run_dir>/job.log``
alone and carries on; a round interrupted mid-way is re-sent under the same request ids,
which nodes answer from their reply cache.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedsm.core import lifecycle
from fedsm.core.events import (
    Event,
    JobFailed,
    ParamsUploaded,
    TrainingPlanUploaded,
)
from fedsm.log.writer import EventLog
from fedsm.repository.base import Repository
from fedsm.researcher import approval, breakpoints
from fedsm.researcher import setup as jobsetup
from fedsm.researcher.datacheck import check_data_quality
from fedsm.researcher.driver import RoundDriver
from fedsm.researcher.errors import (
    JobError,
    JobFailedError,
)
from fedsm.researcher.plansource import plan_source
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.strategies.fedavg import FedAvg
from fedsm.training import runner
from fedsm.training.args import TrainingArgs
from fedsm.training.params import file_sha256, save_params

__all__ = ["Job", "LOG_NAME"]

log = logging.getLogger(__name__)

LOG_NAME = "job.log"


def _validate_minimal_arguments(obj: Mapping[str, Any] | None, fields: Iterable[str]) -> bool:
    """The seed's check that ``obj`` has a non-None value for every name in ``fields``."""
    return obj is not None and all(obj.get(name) is not None for name in fields)


class Job:
    """Trains one model over the nodes of a :class:`FederatedDataSet`, round by round.

    The first eight parameters are the seed's; the keyword-only ones are what event
    sourcing needs: ``run_dir`` holds ``job.log`` and the job's files.
    """

    validate_minimal_arguments = staticmethod(_validate_minimal_arguments)

    def __init__(
        self,
        reqs: Requests | None = None,
        nodes: Iterable[str] | None = None,
        training_plan_class: type | str | None = None,
        training_plan_path: str | Path | None = None,
        training_args: TrainingArgs | Mapping[str, Any] | None = None,
        model_args: Mapping[str, Any] | None = None,
        data: FederatedDataSet | None = None,
        keep_files_dir: str | Path | None = None,
        *,
        run_dir: str | Path,
        repository: Repository,
        round_limit: int = 1,
        min_nodes: int | None = None,
        reply_deadline_s: float = 60.0,
        seed: int = 0,
        tags: Iterable[str] = (),
        aggregator: FedAvg | type[FedAvg] | None = None,
        durability: str = "always",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if reqs is None:
            raise JobError("a Job needs a Requests object (the researcher's bus)")
        if data is None or len(data) == 0:
            raise JobError("a Job needs a FederatedDataSet with at least one node (run a search)")
        self._reqs = reqs
        self._repo = repository
        self._clock = clock
        if isinstance(aggregator, type):  # Experiment(aggregator=FedAvg), as in the seed
            aggregator = aggregator()
        self._aggregator = aggregator or FedAvg()
        self._run_dir = Path(run_dir)
        self._files = Path(keep_files_dir) if keep_files_dir else self._run_dir / "files"
        self._files.mkdir(parents=True, exist_ok=True)
        log_path = self._run_dir / LOG_NAME
        if log_path.exists() and log_path.stat().st_size > 0:
            raise JobError(f"{log_path} already holds a job: use Job.restore({str(run_dir)!r})")
        targs = (
            training_args
            if isinstance(training_args, TrainingArgs)
            else TrainingArgs(dict(training_args or {}))
        )
        source, class_name = plan_source(training_plan_class, training_plan_path)
        self._plan_source = source
        # Upload first, then record: an event states a fact that has already happened.
        plan_up, params_up = jobsetup.upload_plan_and_initial_params(
            self, source, class_name, targs.dict(), dict(model_args or {}), seed
        )

        self._log = EventLog.open(log_path, durability=durability)
        self._state = lifecycle.initial_state()
        self._driver = RoundDriver(self)
        self._record(
            jobsetup.job_created(
                researcher_id=reqs.researcher_id,
                data=data,
                nodes=nodes,
                plan_class=class_name,
                training_args=targs.dict(),
                model_args=dict(model_args or {}),
                seed=seed,
                round_limit=round_limit,
                min_nodes=min_nodes,
                reply_deadline_s=reply_deadline_s,
                aggregator=self._aggregator.name,
                tags=tags,
            )
        )
        self._record(
            TrainingPlanUploaded(
                url=plan_up["file"], sha256=plan_up["sha256"], class_name=class_name
            )
        )
        self._record(ParamsUploaded(round=0, url=params_up["file"], sha256=params_up["sha256"]))
        self._data = data

    # ------------------------------------------------------------------ restore

    @classmethod
    def restore(
        cls,
        run_dir: str | Path,
        *,
        reqs: Requests,
        repository: Repository,
        durability: str = "always",
        clock: Callable[[], float] = time.time,
    ) -> Job:
        """Rebuild a Job from ``<run_dir>/job.log`` alone, ready to carry on."""
        run_dir = Path(run_dir)
        log_path = run_dir / LOG_NAME
        if not log_path.exists():
            raise JobError(f"no job log at {log_path}")
        job = cls.__new__(cls)
        job._reqs, job._repo, job._clock = reqs, repository, clock
        job._aggregator = FedAvg()  # the only aggregator a log can name for now
        job._run_dir, job._files = run_dir, run_dir / "files"
        job._files.mkdir(parents=True, exist_ok=True)
        job._log = EventLog.open(log_path, durability=durability)
        if job._log.recovery is not None:
            log.warning("recovered the job log: %s", job._log.recovery)
        job._state = lifecycle.replay(job._log.events())
        job._driver = RoundDriver(job)
        state = job._state
        try:
            jobsetup.check_restorable(state, log_path, reqs.researcher_id, job._aggregator.name)
        except JobError:
            job._log.close()
            raise
        plan_path = job._files / "training_plan.py"
        if not plan_path.exists() or file_sha256(plan_path) != state.plan_sha256:
            job._repo.download_file(state.plan_url, plan_path)
        job._plan_source = plan_path.read_text(encoding="utf-8")
        config = state.config
        job._data = FederatedDataSet({n: {"dataset_id": d} for n, d in config.datasets.items()})
        return job

    # ------------------------------------------------------------------ the seed's surface

    @property
    def id(self) -> str:
        """The job id (``job-<hex>``), from ``JobCreated``."""
        return self._state.job_id

    @property
    def requests(self) -> Requests:
        """The researcher's requests (its bus)."""
        return self._reqs

    @property
    def nodes(self) -> list[str]:
        """The nodes this job trains on (sorted)."""
        return list(self._state.config.nodes)

    @property
    def state(self) -> lifecycle.JobState:
        """The lifecycle state: the fold of the log so far."""
        return self._state

    @property
    def log_path(self) -> Path:
        """The job's event log."""
        return self._log.path

    @property
    def repository(self) -> Repository:
        """The file repository the job uploads to and downloads from."""
        return self._repo

    @property
    def training_plan_name(self) -> str:
        """The training plan's class name."""
        return self._state.config.training_plan_class

    @property
    def training_plan_file(self) -> Path:
        """The local copy of the plan source that was uploaded (and approved by sha256)."""
        return self._files / "training_plan.py"

    @functools.cached_property
    def training_plan(self) -> type:
        """The plan class, imported from the exact source that was uploaded."""
        return runner.load_plan_class(self._plan_source, self.training_plan_name)

    @property
    def training_args(self) -> TrainingArgs:
        """The training arguments every node receives."""
        return TrainingArgs(dict(self._state.config.training_args))

    @property
    def model_args(self) -> dict[str, Any]:
        """The model arguments every node receives."""
        return dict(self._state.config.model_args)

    @property
    def aggregator_args(self) -> dict[str, Any]:
        """The aggregator's arguments recorded at creation (empty for FedAvg)."""
        return dict(self._state.config.aggregator_args)

    @property
    def training_replies(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Per round, per node: what the node sent (from the log), with the local params path."""
        out: dict[int, dict[str, dict[str, Any]]] = {}
        for rnd, replies in self._state.replies.items():
            out[rnd] = {
                node: {
                    "node_id": node,
                    "dataset_id": self._state.config.datasets.get(node, ""),
                    "params_url": r.params_url,
                    "params_sha256": r.params_sha256,
                    "params_path": self.params_path(r.params_sha256),
                    "sample_size": r.sample_size,
                    "metrics": dict(r.metrics),
                    "timing": dict(r.timing),
                }
                for node, r in sorted(replies.items())
            }
        return out

    @property
    def params_sha256(self) -> str:
        """Digest of the current global parameters."""
        return self._state.params_sha256

    def params_path(self, sha256: str) -> Path:
        """Where parameters with this digest are (or will be) kept locally."""
        return self._files / "params" / f"{sha256}.safetensors"

    def waiting_for_nodes(self, responses: Mapping[str, Any] | None = None) -> bool:
        """Whether nodes of the current round have neither replied nor failed yet."""
        if self._state.status not in ("round_sent", "collecting"):
            return False
        if responses is None:
            return bool(self._state.pending_nodes())
        return bool(set(self._state.round_nodes) - set(responses))

    def check_data_quality(self) -> None:
        """Compare the nodes' datasets; raise :class:`DataQualityCheckError` on a mismatch."""
        check_data_quality(self._data)

    def check_training_plan_is_approved_by_nodes(
        self, deadline_s: float | None = None
    ) -> dict[str, str]:
        """Ask every node whether it approved this plan's sha256; record and return the answers.

        Statuses: approved, rejected, pending, unknown, or ``no-reply``.
        """
        event = approval.ask_nodes(self._reqs, self._state, deadline_s)
        self._record(event)
        return dict(event.statuses)

    def require_approval(self) -> None:
        """Raise :class:`TrainingPlanNotApproved` unless every node may run this plan."""
        approval.require(self._state.approvals)

    def upload_aggregator_args(
        self,
        args_thr_msg: Mapping[str, Mapping[str, Any]] | None,
        args_thr_files: Mapping[str, Mapping[str, Any]] | None,
    ) -> dict[str, dict[str, Any]]:
        """Per node: the small args as they are, the heavy ones uploaded.

        A heavy arg (a file path, or a tensor map saved as safetensors) becomes
        ``{"url": ..., "sha256": ...}`` in the node's message, so that Scaffold-style
        per-node state travels through the repository, never the bus.
        """
        out: dict[str, dict[str, Any]] = {
            n: dict((args_thr_msg or {}).get(n, {})) for n in self.nodes
        }
        for node, heavy in (args_thr_files or {}).items():
            for name, value in heavy.items():
                if isinstance(value, (str, Path)):
                    path = Path(value)
                else:
                    tmp = self._files / f"aggregator_{name}_{node}.tmp"
                    path = self._store_params(tmp, save_params(tmp, value))
                up = self._repo.upload_file(path)
                out.setdefault(node, {})[name] = {"url": up["file"], "sha256": up["sha256"]}
        return out

    def start_nodes_training_round(
        self,
        round: int,
        aggregator_args_thr_msg: Mapping[str, Mapping[str, Any]] | None = None,
        aggregator_args_thr_files: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Send round ``round`` (or re-send it after a restore) and collect until done.

        Returns the round's replies. The round ends when every node replied or failed, or at
        the reply deadline (recorded as ``RoundTimedOut``).
        """
        self._driver.send_round(round, aggregator_args_thr_msg, aggregator_args_thr_files)
        self._driver.collect()
        return self.training_replies.get(round, {})

    def aggregate(self) -> str:
        """Aggregate the current round (or fail the job if too few replied); return the digest."""
        return self._driver.aggregate()

    def update_parameters(
        self, params: Mapping[str, Any] | None = None, filename: str | Path | None = None
    ) -> str:
        """Save (if given tensors) and upload initial parameters; return their URL.

        Only before the first round: afterwards parameters come from aggregation.
        """
        if self._state.status not in ("uploaded", "approval_checked") or self._state.round:
            raise JobError("parameters can be replaced only before the first round")
        if (params is None) == (filename is None):
            raise JobError("give exactly one of params or filename")
        if params is not None:
            tmp = self._files / "update_params.tmp"
            sha = save_params(tmp, params)
            path = self._store_params(tmp, sha)
        else:
            path = Path(filename)  # type: ignore[arg-type]
        up = self._repo.upload_file(path)
        self._record(ParamsUploaded(round=0, url=up["file"], sha256=up["sha256"]))
        return up["file"]

    def save_state(self, breakpoint_path: str | Path | None = None) -> dict[str, Any]:
        """A breakpoint: the log's path and its last seq. No other file is needed to restore.

        With ``breakpoint_path`` (a directory, as in the seed) it is also written there as
        ``breakpoint.json``.
        """
        self._log.flush()
        return breakpoints.save(self._log.path, self._log.last_seq, self._state, breakpoint_path)

    def load_state(self, saved_state: Mapping[str, Any]) -> None:
        """Check a breakpoint from :meth:`save_state` against this job's log.

        The log only grows, so a breakpoint at the log's end is the job as it stands; an
        earlier one can be inspected with ``fedsm replay --at SEQ`` but not continued from.
        """
        breakpoints.check(saved_state, self._log.path, self._log.last_seq, self._state)

    def stop_reason(self) -> str | None:
        """Why the job failed or was cancelled (from its last event), or None."""
        if self._state.status not in ("failed", "cancelled"):
            return None
        last = None
        for record in self._log.records(from_seq=self._log.last_seq):
            last = record.event
        return getattr(last, "reason", None)

    def close(self) -> None:
        """Close the log (and release its writer lock)."""
        self._log.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _record(self, event: Event) -> None:
        """Check ``event`` against the lifecycle, append it, and only then adopt the new state."""
        new_state = lifecycle.apply(self._state, event)
        self._log.append(event, ts=self._clock())
        self._state = new_state

    def _store_params(self, tmp: Path, sha256: str) -> Path:
        final = self.params_path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return final

    def _fail(self, reason: str) -> None:
        self._record(JobFailed(round=self._state.round, reason=reason))
        raise JobFailedError(reason)
