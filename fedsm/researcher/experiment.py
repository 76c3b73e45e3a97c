"""Experiment: search the nodes, check the data and the plan's approval, run the rounds.

The seed's ``Experiment`` wrapped every method so that an error printed a message and called
``sys.exit``; here errors are typed exceptions (:mod:`fedsm.researcher.errors`) and the run can be
resumed from its log after any interruption with :meth:`Experiment.resume`, or by running the
same script again: ``Experiment(...)`` on a run directory whose log holds a job continues that
job when the settings given are the ones it recorded (and says which differ when not).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from fedsm.core import policy
from fedsm.core.events import JobCreated, TrainingPlanUploaded
from fedsm.digests import sha256_file, sha256_hex
from fedsm.log.read import scan
from fedsm.repository.base import Repository
from fedsm.researcher.datacheck import check_data_quality
from fedsm.researcher.errors import JobError, JobFailedError
from fedsm.researcher.job import LOG_NAME, Job
from fedsm.researcher.plansource import plan_source
from fedsm.researcher.requests import DISCOVERY_S, FederatedDataSet, Requests
from fedsm.researcher.setup import JobFiles
from fedsm.strategies.base import Strategy, as_strategy, strategy_name
from fedsm.training.args import TrainingArgs
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
    nodes:
        The nodes to train on (each needs a dataset with the tags); default: every node found.
    training_plan_class / training_plan_path:
        A ``TorchTrainingPlan`` subclass, or its class name together with the file holding it.
    min_nodes:
        Replies needed for a round to count; default: a majority of the round's nodes.
    reply_deadline_s:
        How long a round waits for replies before it carries on without the missing nodes.
    discovery_s:
        The search's discovery window: how long nodes have to come online and answer
        (default 5 s). It ends early once every one of ``nodes`` answered, or ``min_nodes``
        nodes have a matching dataset and every online node answered. A line says how many
        were found; none raises :class:`JobError` saying what the search saw.
    search_deadline_s:
        How long the search waits for a node online that has not answered.
    run_dir:
        Where the job's log and files live. When its ``job.log`` already holds a job (the
        same script run again), that job is continued as :meth:`Experiment.resume` does,
        without a search, once the settings given are checked against the ones it recorded
        (plan source, training and model args, round limit, nodes, tags, seed, ...); a
        difference raises :class:`JobError` naming each one.
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
        aggregator: Strategy | type[Strategy] | str | None = None,
        *,
        min_nodes: int | None = None,
        reply_deadline_s: float = 60.0,
        search_deadline_s: float = 10.0,
        discovery_s: float = DISCOVERY_S,
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
        self._setup(
            Requests(bus, default_deadline_s=search_deadline_s, clock=clock),
            require_approval,
            progress,
            on_round,
        )
        run_dir = Path(run_dir)
        tags = None if tags is None else list(tags)
        nodes = None if nodes is None else list(nodes)
        recorded = _recorded_job(run_dir)
        if recorded is not None:  # the same script again: continue its job, no search
            _check_same_settings(
                run_dir,
                *recorded,
                tags=tags,
                nodes=nodes,
                training_data=training_data,
                training_plan_class=training_plan_class,
                training_plan_path=training_plan_path,
                training_args=training_args,
                model_args=model_args,
                round_limit=round_limit,
                aggregator=aggregator,
                min_nodes=min_nodes,
                reply_deadline_s=reply_deadline_s,
                seed=seed,
                keep_files_dir=keep_files_dir,
            )
            self._restore(run_dir, repository, durability, clock, keep_files_dir)
            return
        if training_data is None:
            if tags is None:
                raise JobError("give tags to search for, or training_data")
            training_data = self._reqs.search(
                tags,
                nodes=nodes,
                discovery_s=discovery_s,
                min_nodes=min_nodes if _positive_int(min_nodes) else None,
            )
            summary = self._reqs.last_search
            assert summary is not None
            self._say(summary.line())
            if len(training_data) == 0:
                offline = self._reqs.offline_nodes(nodes or [])
                raise JobError(
                    f"no node has a dataset tagged {list(tags)}: {summary.line()}"
                    + (f"; offline: {offline}" if offline else "")
                    + ". Start the nodes (fedsm node start ...) and check their datasets' "
                    "tags, or give them longer to come online with discovery_s=..."
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

    def _setup(
        self,
        reqs: Requests,
        require_approval: bool,
        progress: bool | None,
        on_round: Callable[[RoundSummary], None] | None,
    ) -> None:
        self._reqs = reqs
        self._progress = sys.stderr.isatty() if progress is None else progress
        self._on_round = on_round
        self._bar: Any = None
        self.require_approval = require_approval
        self._job: Job | None = None

    def _restore(
        self,
        run_dir: Path,
        repository: Repository,
        durability: str,
        clock: Callable[[], float],
        keep_files_dir: str | Path | None,
    ) -> None:
        self._job = Job.restore(
            run_dir,
            reqs=self._reqs,
            repository=repository,
            durability=durability,
            clock=clock,
            keep_files_dir=keep_files_dir,
        )
        state = self._job.state
        self._say(
            f"resuming job {state.job_id} from {run_dir / LOG_NAME}: {state.status.value}, "
            f"round {state.round} of {state.round_limit}"
        )

    def _say(self, line: str) -> None:
        """A line for the researcher: logged, and printed to stderr like the rounds' lines
        unless an ``on_round`` callback takes the reporting."""
        log.info("%s", line)
        if self._on_round is None:
            print(line, file=sys.stderr, flush=True)

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
        """Rebuild an experiment from ``<run_dir>/job.log`` alone; :meth:`run` carries on.

        Nothing is searched: the job's nodes and datasets are the ones it recorded.
        """
        self = cls.__new__(cls)
        self._setup(Requests(bus, clock=clock), require_approval, progress, on_round)
        self._restore(Path(run_dir), repository, durability, clock, keep_files_dir)
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
                if state.status.in_round:  # settings change between rounds: finish this one
                    self.job.new_drive()
                    if self.run_once() is not None:
                        rounds -= 1
                    state = self.job.state
                if rounds > 0 and state.round + rounds > state.round_limit:
                    self.job.change_settings(round_limit=state.round + rounds)
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
        if self.job.state.terminal:
            self.job.step()  # the final head to the nodes, if this process has not sent it
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


# ---------------------------------------------------------------------- the same script again


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _recorded_job(run_dir: Path) -> tuple[JobCreated, str | None] | None:
    """The ``JobCreated`` of the job recorded in ``run_dir`` and its plan's digest (None for
    an opening cut before it), read-only; None when the log is missing or holds no job yet
    (a fresh start)."""
    path = run_dir / LOG_NAME
    if not path.is_file() or path.stat().st_size == 0:
        return None
    created: JobCreated | None = None
    for record in scan(path).records:
        if isinstance(record.event, JobCreated) and created is None:
            created = record.event
        elif isinstance(record.event, TrainingPlanUploaded) and created is not None:
            return created, record.event.sha256
    return None if created is None else (created, None)


def _plain(value: Any) -> Any:
    """``value`` as the log gives it back (tuples as lists), to compare given and recorded."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _map_diffs(name: str, recorded: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    recorded, given = _plain(recorded), _plain(given)
    return [
        f"{name}[{key!r}] (recorded {recorded.get(key, '<unset>')!r}, "
        f"given {given.get(key, '<unset>')!r})"
        for key in sorted(set(recorded) | set(given))
        if key not in recorded or key not in given or recorded[key] != given[key]
    ]


def _check_same_settings(
    run_dir: Path,
    created: JobCreated,
    recorded_sha: str | None,
    *,
    tags: Iterable[str] | None,
    nodes: Iterable[str] | None,
    training_data: FederatedDataSet | None,
    training_plan_class: type | str | None,
    training_plan_path: str | Path | None,
    training_args: Mapping[str, Any] | None,
    model_args: Mapping[str, Any] | None,
    round_limit: int,
    aggregator: Strategy | type[Strategy] | str | None,
    min_nodes: int | None,
    reply_deadline_s: float,
    seed: int,
    keep_files_dir: str | Path | None,
) -> None:
    """Raise :class:`JobError` naming every setting given that differs from the job recorded
    in ``run_dir`` (its ``JobCreated``), and the calls that would work.

    Settings a search decided (the nodes and datasets, when neither ``nodes`` nor
    ``training_data`` is given) are the recorded ones: a resume does not search.
    """
    diffs: list[str] = []

    def differ(name: str, recorded: Any, given: Any) -> None:
        if recorded != given:
            diffs.append(f"{name} (recorded {recorded!r}, given {given!r})")

    source, class_name = plan_source(training_plan_class, training_plan_path)
    differ("training_plan_class", created.training_plan_class, class_name)
    if recorded_sha is None:  # an opening cut before the plan: the plan file it wrote
        plan = JobFiles(Path(keep_files_dir) if keep_files_dir else run_dir / "files").plan
        recorded_sha = sha256_file(plan) if plan.is_file() else None
    if recorded_sha is not None:
        differ("training plan source sha256", recorded_sha, sha256_hex(source))
    targs = (
        training_args
        if isinstance(training_args, TrainingArgs)
        else TrainingArgs(dict(training_args or {}))
    )
    diffs += _map_diffs("training_args", created.training_args, targs.dict())
    diffs += _map_diffs("model_args", created.model_args, dict(model_args or {}))
    differ("round_limit", created.round_limit, round_limit)
    differ("seed", created.seed, seed)
    differ("tags", sorted(created.tags), sorted(tags or ()))
    round_nodes: list[str] | None = None
    if nodes is not None:
        round_nodes = sorted(set(nodes))
    elif training_data is not None:
        round_nodes = training_data.node_ids()
    if round_nodes is not None:
        differ("nodes", list(created.nodes), round_nodes)
    if training_data is not None:
        ids = training_data.dataset_ids()
        given_ids = {n: ids.get(n, "<none>") for n in round_nodes or created.nodes}
        differ("datasets", dict(sorted(created.datasets.items())), dict(sorted(given_ids.items())))
    given_min = min_nodes if min_nodes is not None else len(round_nodes or created.nodes) // 2 + 1
    differ("min_nodes", created.min_nodes, given_min)
    try:
        differ("reply_deadline_s", created.reply_deadline_s, float(reply_deadline_s))
    except (TypeError, ValueError):
        differ("reply_deadline_s", created.reply_deadline_s, reply_deadline_s)
    strategy = as_strategy(aggregator)
    differ("aggregator", created.aggregator, strategy_name(strategy))
    differ("aggregator settings", dict(created.aggregator_args), strategy.config())
    if diffs:
        raise JobError(
            f"{run_dir / LOG_NAME} holds job {created.job_id}, created with other settings "
            f"than these: {'; '.join(diffs)}. To continue that job as recorded, call "
            f"Experiment.resume({str(run_dir)!r}, bus=..., repository=...); to run these "
            "settings, give Experiment a new run_dir"
        )
