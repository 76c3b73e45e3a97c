"""The checks and facts that start or resume a Job, apart from the Job's I/O.

``job_created`` validates a new job's settings and returns the ``JobCreated`` event that
records them; ``check_restorable`` says why a log can not be resumed, if it can not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsm.core.events import JobCreated
from fedsm.core.jobstate import JobState
from fedsm.repository.base import Uploaded
from fedsm.researcher.errors import JobError
from fedsm.researcher.requests import FederatedDataSet, new_id

if TYPE_CHECKING:
    from fedsm.researcher.job import Job

__all__ = ["job_created", "check_restorable", "upload_plan_and_initial_params"]


def job_created(
    *,
    researcher_id: str,
    data: FederatedDataSet,
    nodes: Iterable[str] | None,
    plan_class: str,
    training_args: Mapping[str, Any],
    model_args: Mapping[str, Any],
    seed: int,
    round_limit: int,
    min_nodes: int | None,
    reply_deadline_s: float,
    aggregator: str,
    tags: Iterable[str],
) -> JobCreated:
    """The first event of a new job; raise :class:`JobError` on settings that can not work.

    ``min_nodes`` None means a majority of the round's nodes.
    """
    round_nodes = sorted(nodes if nodes is not None else data.node_ids())
    unknown = sorted(set(round_nodes) - set(data.node_ids()))
    if unknown:
        raise JobError(f"nodes {unknown} have no dataset in the FederatedDataSet")
    if min_nodes is None:
        min_nodes = len(round_nodes) // 2 + 1
    if not 1 <= min_nodes <= len(round_nodes):
        raise JobError(f"min_nodes must be between 1 and {len(round_nodes)}, got {min_nodes}")
    if round_limit < 1:
        raise JobError(f"round_limit must be at least 1, got {round_limit}")
    dataset_ids = data.dataset_ids()
    return JobCreated(
        job_id=new_id("job"),
        researcher_id=researcher_id,
        training_plan_class=plan_class,
        training_args=dict(training_args),
        model_args=dict(model_args),
        seed=int(seed),
        nodes=tuple(round_nodes),
        datasets={n: dataset_ids[n] for n in round_nodes},
        round_limit=int(round_limit),
        min_nodes=int(min_nodes),
        reply_deadline_s=float(reply_deadline_s),
        aggregator=aggregator,
        aggregator_args={},
        tags=tuple(tags),
    )


def upload_plan_and_initial_params(
    job: Job,
    source: str,
    class_name: str,
    training_args: dict[str, Any],
    model_args: dict[str, Any],
    seed: int,
) -> tuple[Uploaded, Uploaded]:
    """Keep the plan source and the seeded initial parameters in the job's files and upload
    both; return the two uploads (URL and digest for the events that record them)."""
    from fedsm.training import runner  # torch: only when a job is really created

    plan_file = job.training_plan_file
    plan_file.write_text(source, encoding="utf-8")
    plan_up = job.repository.upload_file(plan_file)
    tmp = plan_file.with_name("initial_params.tmp")
    sha = runner.initial_params(
        plan_source=source,
        plan_class=class_name,
        model_args=model_args,
        training_args=training_args,
        seed=seed,
        out_path=tmp,
    )
    params_up = job.repository.upload_file(job._store_params(tmp, sha))
    return plan_up, params_up


def check_restorable(state: JobState, log_path: Path, researcher_id: str, aggregator: str) -> None:
    """Raise :class:`JobError` saying why the job folded from ``log_path`` can not go on."""
    if state.status in ("new", "created"):
        raise JobError(
            f"{log_path} stops before the training plan upload was recorded: nothing to "
            "resume; start the job again"
        )
    if state.config.aggregator != aggregator:
        raise JobError(
            f"{log_path} was aggregated with {state.config.aggregator!r}, which this version "
            "can not resume"
        )
    if researcher_id != state.researcher_id:
        # Nodes answer a re-sent request from their reply cache only if it is the same
        # request, from the same researcher (and, over MQTT, to the same reply topic).
        raise JobError(
            f"job {state.job_id} belongs to researcher {state.researcher_id!r}; resume it "
            f"with a bus whose participant id is that researcher, not {researcher_id!r}"
        )
