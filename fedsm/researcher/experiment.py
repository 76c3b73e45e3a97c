"""Experiment: search the nodes, check the data and the plan's approval, run the rounds.

The seed's ``Experiment`` wrapped every method so that an error printed a message and called
``sys.exit``; here errors are typed exceptions (:mod:`fedsm.researcher.errors`) and the run can be
resumed from its log after any interruption with :meth:`Experiment.resume`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedsm.core import policy
from fedsm.repository.base import Repository
from fedsm.researcher.datacheck import check_data_quality
from fedsm.researcher.errors import JobError, JobFailedError
from fedsm.researcher.job import Job
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.strategies.fedavg import FedAvg
from fedsm.transport.base import Bus

__all__ = ["Experiment", "RoundSummary"]

log = logging.getLogger(__name__)


class RoundSummary(dict):
    """Per-round figures derived from the log: round, nodes, replies, sample-weighted metrics."""

    def line(self, round_limit: int) -> str:
        """One line for a terminal or a log."""
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(self["metrics"].items()))
        what = (
            f"final validation (round {self['round']})"
            if self.get("validation")
            else f"round {self['round']}/{round_limit}"
        )
        return (
            f"{what}: {len(self['nodes'])} replies"
            + (f", failed {self['failed']}" if self["failed"] else "")
            + (f", no reply {self['missing']}" if self["missing"] else "")
            + (f" {metrics}" if metrics else "")
        )


class Experiment:
    """Runs ``round_limit`` federated rounds of a training plan over the nodes found by ``tags``.

    Parameters
    ----------
    tags:
        Dataset tags to search for (every tag must be carried by a node's dataset).
    training_plan_class / training_plan_path:
        A ``TorchTrainingPlan`` subclass, or its class name together with the file holding it.
    min_nodes:
        Replies needed for a round to count; default: a majority of the round's nodes.
    reply_deadline_s:
        How long a round waits for replies before it carries on without the missing nodes.
    run_dir:
        Where the job's log and files live; resume later with :meth:`Experiment.resume`.
    bus / repository:
        The researcher's transport and file repository (memory bus and local directory for
        the embedded default, MQTT and HTTP across machines).
    keep_files_dir:
        Where the job keeps its files (plan, parameters by digest); default
        ``run_dir/files``. Not recorded (a path of this machine): give it again to
        :meth:`resume`, or leave it out and the files are fetched from the repository.
    require_approval:
        Make :meth:`check_training_plan_status` raise when a node has not approved the plan.
        Rounds themselves always need it: the lifecycle refuses to send a round unless the
        last recorded approval check cleared every node (nodes enforce it too), and
        :meth:`run` asks the nodes again, once per call, while the answer is not yes.
    """

    def __init__(
        self,
        tags: Iterable[str] | None = None,
        nodes: Iterable[str] | None = None,
        training_data: FederatedDataSet | None = None,
        training_plan_class: type | str | None = None,
        training_plan_path: str | Path | None = None,
        training_args: Mapping[str, Any] | None = None,
        model_args: Mapping[str, Any] | None = None,
        round_limit: int = 1,
        aggregator: FedAvg | type[FedAvg] | None = None,
        *,
        min_nodes: int | None = None,
        reply_deadline_s: float = 60.0,
        search_deadline_s: float = 10.0,
        run_dir: str | Path,
        bus: Bus,
        repository: Repository,
        seed: int = 0,
        require_approval: bool = True,
        progress: bool | None = None,
        on_round: Callable[[RoundSummary], None] | None = None,
        durability: str = "always",
        clock: Callable[[], float] = time.time,
        keep_files_dir: str | Path | None = None,
    ) -> None:
        self._reqs = Requests(bus, default_deadline_s=search_deadline_s, clock=clock)
        self._progress = sys.stderr.isatty() if progress is None else progress
        self._on_round = on_round
        self._bar: Any = None
        self.require_approval = require_approval
        self._job: Job | None = None
        if training_data is None:
            if tags is None:
                raise JobError("give tags to search for, or training_data")
            training_data = self._reqs.search(list(tags), nodes=nodes)
            if len(training_data) == 0:
                offline = self._reqs.offline_nodes(nodes or [])
                raise JobError(
                    f"no node has a dataset tagged {list(tags)}"
                    + (f" (offline: {offline})" if offline else "")
                )
        check_data_quality(training_data)
        self._job = Job(
            reqs=self._reqs,
            nodes=nodes,
            training_plan_class=training_plan_class,
            training_plan_path=training_plan_path,
            training_args=training_args,
            model_args=model_args,
            data=training_data,
            run_dir=run_dir,
            repository=repository,
            round_limit=round_limit,
            min_nodes=min_nodes,
            reply_deadline_s=reply_deadline_s,
            seed=seed,
            tags=tags or (),
            aggregator=aggregator,
            durability=durability,
            clock=clock,
            keep_files_dir=keep_files_dir,
        )

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        *,
        bus: Bus,
        repository: Repository,
        require_approval: bool = True,
        progress: bool | None = None,
        on_round: Callable[[RoundSummary], None] | None = None,
        durability: str = "always",
        clock: Callable[[], float] = time.time,
        keep_files_dir: str | Path | None = None,
    ) -> Experiment:
        """Rebuild an experiment from ``<run_dir>/job.log`` alone; :meth:`run` carries on."""
        self = cls.__new__(cls)
        self._reqs = Requests(bus, clock=clock)
        self._progress = sys.stderr.isatty() if progress is None else progress
        self._on_round = on_round
        self._bar = None
        self.require_approval = require_approval
        self._job = Job.restore(
            run_dir,
            reqs=self._reqs,
            repository=repository,
            durability=durability,
            clock=clock,
            keep_files_dir=keep_files_dir,
        )
        return self

    # ------------------------------------------------------------------ properties

    @property
    def job(self) -> Job:
        """The Job this experiment drives."""
        assert self._job is not None
        return self._job

    @property
    def round_current(self) -> int:
        """The last round started (0 before the first)."""
        return self.job.state.round

    @property
    def round_limit(self) -> int:
        """The number of rounds the job was created for."""
        return self.job.state.round_limit

    @property
    def finished(self) -> bool:
        """Whether the job completed, failed or was cancelled."""
        return self.job.state.status.terminal

    def final_params_path(self) -> Path:
        """Local file of the current global parameters (fetched by digest if this machine
        does not hold it)."""
        return self.job._driver.local_params(self.job.params_sha256)

    def history(self) -> list[RoundSummary]:
        """One summary per aggregated round and per finished validation round, from the log.

        A validation round's summary has ``validation=True``: its metrics are the nodes'
        validation of the parameters ``params_sha256`` it was sent, which it did not change.
        """
        state = self.job.state
        out = []
        ended = {r: a.params_sha256 for r, a in state.aggregates.items()}
        for rnd in state.validation_rounds:
            if rnd != state.round or state.round_complete():
                ended[rnd] = ""
        for rnd in sorted(ended):
            replies = state.replies.get(rnd, {})
            total = sum(r.sample_size for r in replies.values()) or 1
            metrics: dict[str, float] = {}
            for reply in replies.values():
                for key, value in reply.metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + value * reply.sample_size / total
            validation = not ended[rnd]
            out.append(
                RoundSummary(
                    round=rnd,
                    nodes=sorted(replies),
                    failed=sorted(state.failures.get(rnd, {})),
                    missing=list(state.timed_out.get(rnd, ())),
                    params_sha256=(
                        next(iter(replies.values())).params_sha256
                        if validation and replies
                        else ended[rnd]
                    ),
                    metrics=metrics,
                    validation=validation,
                )
            )
        return out

    # ------------------------------------------------------------------ running

    def check_training_plan_status(self) -> dict[str, str]:
        """Ask the nodes about the plan's approval (recorded in the log) and return statuses."""
        statuses = self.job.check_training_plan_is_approved_by_nodes()
        if self.require_approval:
            self.job.require_approval()
        return statuses

    def run_once(self) -> RoundSummary | None:
        """Run (or finish, after a restore) one round; None when the job is over.

        Steps the job's round policy (:meth:`Job.step`) until a round is aggregated or the
        job stops. Raises :class:`TrainingPlanNotApproved` when a node has not approved the
        plan (after asking the nodes again in this drive) and
        :class:`~fedsm.researcher.errors.JobFailedError` when the job fails.
        """
        job = self.job
        seen = len(self.history())
        while True:  # a finished job's step announces its final head to the nodes, then stops
            decision = job.step()
            if any(isinstance(c, policy.Stop) for c in decision.commands):
                break
            history = self.history()
            if len(history) > seen:  # a round was aggregated, or the final validation ended
                state = job.state
                if state.status.between_rounds and state.round >= state.round_limit:
                    if not state.final_validation_due:
                        job.step()  # record JobCompleted with the last round
                elif state.status.in_round and not state.round_do_training:
                    job.step()  # the final validation is over: record JobCompleted
                summary = history[-1]
                self._report(summary)
                return summary
        if job.state.status.stopped:
            raise JobFailedError(
                f"the job {job.state.status.value}: {job.stop_reason()} "
                f"(see: fedsm replay {job.log_path})"
            )
        return None

    def run(self, rounds: int | None = None, increase: bool = False) -> str:
        """Run the remaining rounds (or ``rounds`` more of them, counting a round interrupted
        mid-way as one); return the digest of the current global parameters.

        With ``increase`` (the seed's), ``rounds`` more than remain raise the round limit to
        fit them (recorded; a completed job is reopened); without, only the remaining rounds
        run. When ``test_on_global_updates`` is in the training args, the nodes validate the
        final parameters in a last, validation-only round (its metrics in :meth:`history`).

        Raises :class:`~fedsm.researcher.errors.JobFailedError` if the job fails or had failed.
        """
        if rounds is not None and increase:
            state = self.job.state
            base = state.round - 1 if state.status.in_round else state.round
            if base + rounds > state.round_limit:
                self.job.change_settings(round_limit=base + rounds)
        if self._progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.round_limit,
                initial=len(self.job.state.aggregates),
                desc="rounds",
                unit="round",
                file=sys.stderr,
            )
        self.job.new_drive()  # approval is asked again when the last answer was not yes
        done = 0
        try:
            # run_once returns None at the round limit; the final validation (when due) is
            # part of the last round, not one of the ``rounds`` asked for.
            while rounds is None or done < rounds or self.job.state.final_validation_due:
                summary = self.run_once()
                if summary is None:
                    break
                if not summary.get("validation"):
                    done += 1
                    if self._bar is not None:
                        self._bar.update(1)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if self.job.state.status.stopped:
            raise JobFailedError(
                f"the job {self.job.state.status}: {self.job.stop_reason()} "
                f"(see: fedsm replay {self.job.log_path})"
            )
        return self.job.params_sha256

    def _report(self, summary: RoundSummary) -> None:
        line = summary.line(self.round_limit)
        log.info(line)
        if self._on_round is not None:
            self._on_round(summary)
        elif self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the job's log."""
        if self._job is not None:
            self._job.close()
