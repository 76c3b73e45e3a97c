"""The researcher's Job: Fed-BioMed's ``Job`` rebuilt on the event log and the round policy.

Every piece of state (``training_replies``, the round, the current parameters...) is the fold
of the log. What to do next is decided by :func:`fedsm.core.policy.decide`, a pure function
of that state and the clock; the Job records the decision's events, and only then carries
out its commands (:class:`~fedsm.researcher.driver.RoundDriver` does the I/O). So a request
is never published, nor a file uploaded, before the event that decides it is durable, and a
call the lifecycle refuses changes nothing outside the process.

The log names artifacts by digest only; the job keeps them under ``<run_dir>/files`` and the
repository's location is configuration. A breakpoint is just (log, seq): :meth:`Job.restore`
rebuilds a Job from ``<run_dir>/job.log`` alone, completes an opening cut by a crash, and
carries on; a round interrupted mid-way is re-sent under the same request ids, which nodes
answer from their reply cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedsm.core import lifecycle, policy
from fedsm.core.events import ApprovalAsked, JobCancelled
from fedsm.core.jobstate import JobState, JobStatus, initial_state
from fedsm.digests import sha256_file
from fedsm.errors import FedsmError
from fedsm.log.read import gc_paused, scan
from fedsm.log.writer import EventLog
from fedsm.repository.base import Repository
from fedsm.researcher import setup as jobsetup
from fedsm.researcher.datacheck import check_data_quality
from fedsm.researcher.driver import RoundDriver
from fedsm.researcher.errors import (
    JobError,
    JobFailedError,
    JobIOError,
    TrainingPlanNotApproved,
)
from fedsm.researcher.jobsettings import JobSettings
from fedsm.researcher.plansource import plan_source
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.strategies.base import Strategy, as_strategy, resolve, strategy_name
from fedsm.strategies.fedavg import FedAvg
from fedsm.training.args import TrainingArgs

__all__ = ["Job", "LOG_NAME"]

log = logging.getLogger(__name__)

LOG_NAME = jobsetup.LOG_NAME


def _log_has_records(path: Path) -> bool:
    """Whether the log at ``path`` holds at least one record (read-only; a missing file or a
    bare header is a fresh start)."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    return bool(scan(path).records)


class Job(JobSettings):
    """Trains one model over the nodes of a :class:`FederatedDataSet`, round by round.

    The first eight parameters are the seed's; the keyword-only ones are what event
    sourcing needs: ``run_dir`` holds ``job.log`` and the job's files.

    Every setting is checked before anything is written: a refused setting leaves no log and
    no file. A run directory whose log holds no record (a run killed as it created the log)
    is a fresh start; one holding a job is continued with :meth:`restore`.
    """

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
        aggregator: Strategy | type[Strategy] | str | None = None,
        durability: str = "always",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if reqs is None:
            raise JobError("a Job needs a Requests object (the researcher's bus)")
        if data is None or len(data) == 0:
            raise JobError("a Job needs a FederatedDataSet with at least one node (run a search)")
        check_data_quality(data)  # as the seed's constructor does, before anything is written
        strategy = as_strategy(aggregator)  # also the seed's aggregator=FedAverage (a class)
        targs = (
            training_args
            if isinstance(training_args, TrainingArgs)
            else TrainingArgs(dict(training_args or {}))
        )
        source, class_name = plan_source(training_plan_class, training_plan_path)
        # Decide: every setting checked, the opening event built, before anything is written.
        created = jobsetup.job_created(
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
            aggregator=strategy_name(strategy),
            aggregator_args=strategy.config(),
            tags=tags,
        )
        run_dir = Path(run_dir)
        log_path = run_dir / LOG_NAME
        if _log_has_records(log_path):
            raise JobError(
                f"{log_path} already holds a job: continue it with Job.restore({str(run_dir)!r}"
                ", ...) or Experiment.resume(...), or choose a new run directory"
            )
        self._init_shell(run_dir, keep_files_dir, reqs, repository, strategy, clock)
        # Record: the local artifacts first (nobody sees them), then the opening in one append.
        opening = jobsetup.opening_events(self._files, source, created)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._id_key = jobsetup.job_key(run_dir)
        self._log = EventLog.open(log_path, durability=durability)
        try:
            self._record_all(opening)
        except BaseException:
            self._log.close()
            raise
        self._plan_source = source
        self._data = data

    def _init_shell(
        self,
        run_dir: Path,
        keep_files_dir: str | Path | None,
        reqs: Requests,
        repository: Repository,
        aggregator: Strategy,
        clock: Callable[[], float],
    ) -> None:
        self._reqs, self._repo, self._clock, self._aggregator = reqs, repository, clock, aggregator
        self._run_dir = run_dir
        files_root = Path(keep_files_dir) if keep_files_dir else run_dir / "files"
        self._files = jobsetup.JobFiles(files_root)
        self._state: JobState = initial_state()
        self._progress = policy.Progress()
        self._driver = RoundDriver(self)

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
        keep_files_dir: str | Path | None = None,
    ) -> Job:
        """Rebuild a Job from ``<run_dir>/job.log`` alone, ready to carry on.

        A log cut inside the job's opening is completed from the job's files (the same job,
        started again); a log that holds no record raises :class:`JobError` saying to start
        the job with ``Job(...)``. On any failure the log is closed (its lock released), so
        a retry in the same process works.
        """
        run_dir = Path(run_dir)
        log_path = run_dir / LOG_NAME
        if not log_path.exists():
            raise JobError(f"no job log at {log_path}")
        job = cls.__new__(cls)
        job._init_shell(run_dir, keep_files_dir, reqs, repository, FedAvg(), clock)  # until read
        job._log = EventLog.open(log_path, durability=durability)
        try:
            job._id_key = jobsetup.job_key(run_dir)
            job._restore_from_log(log_path)
        except BaseException:
            job._log.close()
            raise
        return job

    def _restore_from_log(self, log_path: Path) -> None:
        if self._log.recovery is not None:
            log.warning("recovered the job log: %s", self._log.recovery)
        with gc_paused():
            self._state = lifecycle.replay(self._log.events())
        state = self._state
        jobsetup.check_restorable(state, log_path, self._reqs.researcher_id)
        if state.config is not None:  # the strategy the log names, with its recorded settings
            self._aggregator = resolve(state.config.aggregator, state.config.aggregator_args)
        missing = jobsetup.complete_opening(state, self._files, log_path)
        if missing:
            log.warning("completing the job's opening cut short in %s", log_path)
            self._record_all(missing)
            state = self._state
        plan = self._files.plan
        if not plan.is_file() or sha256_file(plan) != state.plan_sha256:
            assert state.plan_sha256 is not None
            plan.parent.mkdir(parents=True, exist_ok=True)
            self._repo.download_file(self._repo.url_for(state.plan_sha256), plan)
        self._plan_source = plan.read_bytes().decode("utf-8")
        config = state.config
        assert config is not None
        self._data = FederatedDataSet({n: {"dataset_id": d} for n, d in config.datasets.items()})

    # ------------------------------------------------------------------ the seed's surface

    def check_training_plan_is_approved_by_nodes(
        self, deadline_s: float | None = None
    ) -> dict[str, str]:
        """Ask every node whether it approved this plan's sha256; record and return the answers.

        Statuses: approved, rejected, pending, unknown, or ``no-reply``. Allowed until the
        first round is sent (raises ``IllegalTransition`` after, having asked nobody).
        """
        self._check_allowed("ApprovalChecked")
        state = self._state
        assert state.plan_sha256 is not None
        # Decide, record, then act: the asking is recorded before any node hears of it.
        asked = ApprovalAsked(plan_sha256=state.plan_sha256, nodes=tuple(sorted(state.nodes)))
        self._record(asked)
        event = self._driver.ask_approval(deadline_s)
        self._record(event)
        self._progress = replace(self._progress, approval_asked=True)
        return dict(event.statuses)

    def require_approval(self) -> None:
        """Raise :class:`TrainingPlanNotApproved` unless every node may run this plan."""
        if self._state.approvals is None:
            raise JobError("check_training_plan_is_approved_by_nodes() has not been run")
        refused = self._state.approval_refusals()
        if refused:
            sha = self._state.plan_sha256
            raise TrainingPlanNotApproved(
                f"training plan {sha} is not approved on {refused}; on each node run: "
                f"fedsm node plan approve --dir NODE_DIR --sha256 {sha}"
            )

    def start_nodes_training_round(
        self,
        round: int,
        aggregator_args_thr_msg: Mapping[str, Mapping[str, Any]] | None = None,
        aggregator_args_thr_files: Mapping[str, Mapping[str, Any]] | None = None,
        do_training: bool = True,
    ) -> dict[str, dict[str, Any]]:
        """Send round ``round`` (or finish it after a restore) and collect until it ends.

        Returns the round's replies. The round ends when every node replied or failed, or at
        the reply deadline (recorded as ``RoundTimedOut``). A round the lifecycle does not
        allow raises (``IllegalTransition``, ``TrainingPlanNotApproved``) before any request
        is published or anything recorded.

        ``do_training=False`` (the seed's final validation): every node validates the
        current global parameters and trains nothing; allowed once the last round is
        aggregated, and numbered after it (the seed's ``round`` of the last round is taken
        to mean the same). :meth:`aggregate` then completes the job.
        """
        state = self._state
        if state.status.in_round:
            if round != state.round:
                raise JobError(f"round {state.round} is being collected, not {round}")
        else:
            if not do_training and round == state.round:
                round = state.round + 1  # the seed numbers it with the last round's number
            self._start_round(
                round, aggregator_args_thr_msg, aggregator_args_thr_files, do_training=do_training
            )
        while self._state.status.in_round and not self._state.round_complete():
            self.step()
        return self.training_replies.get(round, {})

    def aggregate(self) -> str:
        """Aggregate the current round once it is over; return the new parameters' digest.

        Raises :class:`JobError` (nothing recorded) while nodes are still awaited, and
        :class:`JobFailedError` (recorded as ``JobFailed``) when the round ended with fewer
        replies than ``min_nodes``. After the last round the job is completed (unless the
        training args ask for a final validation round first); after a validation-only
        round, the job is completed with the parameters it validated.
        """
        state = self._state
        if not state.status.in_round:
            raise JobError(f"nothing to aggregate in state {state.status.value!r}")
        if not state.round_complete():
            raise JobError(
                f"round {state.round} is still waiting for {list(state.pending_nodes())}: "
                "collect it first (start_nodes_training_round) or let its deadline pass"
            )
        self.step()  # JobFailed below quorum, Aggregated, or JobCompleted (a validation)
        state = self._state
        if state.status is JobStatus.AGGREGATED:
            if state.round >= state.round_limit and not state.final_validation_due:
                self.step()  # JobCompleted
                self.step()  # the final head, to the nodes
            return self.params_sha256
        if state.status is JobStatus.COMPLETED:
            self.step()  # the final head, to the nodes
            return self.params_sha256
        self.step()  # the failed job's final head, to the nodes
        raise JobFailedError(self.stop_reason() or "the job failed")

    def step(self, max_wait_s: float | None = None) -> policy.Decision:
        """Take one step of the round policy: record what it decides, then carry it out.

        Returns the decision taken. ``max_wait_s`` bounds how long a ``Collect`` waits for
        replies in this step (default: until the round's deadline); a shortened wait never
        closes the round. Raises :class:`TrainingPlanNotApproved` when the plan is not
        approved on every node (after asking them once in this drive), and
        :class:`JobFailedError` when the step failed the job. A finished job's step is a
        ``Stop`` with ``finished`` set.
        """
        decision = policy.decide(self._state, self._clock(), self._progress)
        self._record_all(decision.events)
        for command in decision.commands:
            self._carry_out(command, max_wait_s)
        return decision

    def _carry_out(self, command: policy.Command, max_wait_s: float | None = None) -> None:
        try:
            self._carry_out_command(command, max_wait_s)
        except FedsmError:
            raise
        except OSError as exc:  # the researcher's own disk: one typed line, nothing lost
            raise JobIOError(
                exc.errno,
                f"{type(command).__name__.lower()} stopped: the job's files can not be "
                f"written here ({exc.strerror or exc}"
                + (f": {exc.filename}" if exc.filename else "")
                + f"); free space under {self._run_dir} and resume the job: it carries on "
                "from its log",
            ) from exc

    def _carry_out_command(self, command: policy.Command, max_wait_s: float | None) -> None:
        driver = self._driver
        if isinstance(command, policy.CheckApproval):
            self._record(driver.ask_approval(None))
            self._progress = replace(self._progress, approval_asked=True)
        elif isinstance(command, policy.StartRound):
            self._start_round(
                command.round, None, None, max_wait_s, do_training=command.do_training
            )
        elif isinstance(command, policy.Publish):
            self._reqs.forget_came_online(command.nodes)  # they get their request now
            driver.publish(command.round, command.nodes)
            self._progress = replace(
                self._progress,
                published_round=command.round,
                came_online=self._progress.came_online - set(command.nodes),
            )
        elif isinstance(command, policy.Collect):
            ran_out = driver.collect(command.until, max_wait_s)
            came = self._reqs.take_came_online()
            self._progress = replace(
                self._progress,
                waited_round=(
                    command.round if ran_out and command.closes else self._progress.waited_round
                ),
                came_online=self._progress.came_online | came,
            )
        elif isinstance(command, policy.Aggregate):
            driver.aggregate()
        elif isinstance(command, policy.AnnounceEnd):
            driver.announce_end(command.status)
            self._progress = replace(self._progress, end_announced=True)
        elif isinstance(command, policy.Stop):
            if command.needs_approval:
                raise TrainingPlanNotApproved(command.reason)
        else:  # pragma: no cover - the policy's commands are a closed set
            raise AssertionError(f"unknown command {command!r}")

    def _start_round(
        self,
        round_number: int,
        args_thr_msg: Mapping[str, Mapping[str, Any]] | None,
        args_thr_files: Mapping[str, Mapping[str, Any]] | None,
        max_wait_s: float | None = None,
        *,
        do_training: bool = True,
    ) -> None:
        """Decide round ``round_number``, record it, then publish it and collect."""
        if self._state.status.between_rounds and self._state.approval_refusals():
            self.require_approval()  # raises with the operators' command; nothing was sent
        # Checked first with no args: an illegal round prepares nothing.
        now = self._clock()
        probe = policy.round_sent(
            self._state, round_number, now, do_training=do_training, id_key=self._id_key
        )
        self._check_event(probe.events[0])
        args = (
            self._driver.aggregator_args(round_number, args_thr_msg, args_thr_files)
            if do_training
            else {}
        )
        decision = policy.round_sent(
            self._state,
            round_number,
            self._clock(),
            args,
            do_training=do_training,
            id_key=self._id_key,
        )
        self._record_all(decision.events)
        for command in decision.commands:
            self._carry_out(command, max_wait_s)

    def new_drive(self) -> None:
        """Start a new drive of the job (``Experiment.run`` does): the nodes are asked again
        about approval when the last answer was not all-approved."""
        self._progress = replace(self._progress, approval_asked=False)

    def cancel(self, reason: str = "cancelled by the researcher") -> None:
        """Stop the job for good (``JobCancelled``)."""
        self._record(JobCancelled(round=self._state.round, reason=reason))

    def close(self) -> None:
        """Close the log (and release its writer lock)."""
        self._log.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
