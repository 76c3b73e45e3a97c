"""The opening of a Job: its settings checked before anything is written, its artifacts made
locally, its opening events recorded as one append, and a cut opening completed on restore.

Order (decide, record, then act): every setting is checked and ``JobCreated`` built and
checked against the lifecycle before a file is written; the plan source and the seeded
initial parameters are then written under the job's files (nobody else sees them there);
the three opening events are appended in one write; uploads happen only afterwards, when a
request first names the artifacts. A log cut inside the opening (a torn append keeps a
prefix) is completed by :func:`complete_opening` from the same local files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedsm.core import lifecycle
from fedsm.core.events import Event, JobCreated, ParamsUploaded, TrainingPlanUploaded
from fedsm.core.jobstate import JobState, JobStatus, initial_state
from fedsm.digests import sha256_file, sha256_hex
from fedsm.researcher.errors import JobError
from fedsm.researcher.requests import FederatedDataSet, new_id

__all__ = [
    "LOG_NAME",
    "PLAN_FILE",
    "JobFiles",
    "KEY_NAME",
    "job_key",
    "check_restorable",
    "complete_opening",
    "job_created",
    "opening_events",
]

#: The job's log, in its run directory.
LOG_NAME = "job.log"
#: The plan source the job uploads, in its files directory.
PLAN_FILE = "training_plan.py"
#: The job's secret, beside its log (never in it): the key of its request ids.
KEY_NAME = "job.key"


class JobFiles:
    """Where a job keeps its artifacts locally, by digest, under ``root`` (run-relative)::

    root/training_plan.py            the plan source nodes approve
    root/params/<sha256>.safetensors global and node parameters
    root/aggregator/<sha256>         aggregator args sent as files
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def plan(self) -> Path:
        return self.root / PLAN_FILE

    def params(self, sha256: str) -> Path:
        return self.root / "params" / f"{sha256}.safetensors"

    def aggregator(self, sha256: str) -> Path:
        return self.root / "aggregator" / f"{sha256}"

    def find(self, sha256: str) -> Path | None:
        """The local file of an artifact with this digest, if this job keeps one."""
        for path in (self.params(sha256), self.aggregator(sha256)):
            if path.is_file():
                return path
        if self.plan.is_file() and sha256_file(self.plan) == sha256:
            return self.plan
        return None

    def store(self, tmp: Path, sha256: str, kind: str = "params") -> Path:
        """Move ``tmp`` (already written and hashed) to its place by digest."""
        final = self.params(sha256) if kind == "params" else self.aggregator(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        return final


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
    aggregator_args: Mapping[str, Any] | None = None,
) -> JobCreated:
    """The first event of a new job; raise :class:`JobError` on settings that can not work.

    Nothing is written before this returns: a typo in a setting leaves no half-made job.
    ``min_nodes`` None means a majority of the round's nodes.
    """
    round_nodes = sorted(nodes if nodes is not None else data.node_ids())
    unknown = sorted(set(round_nodes) - set(data.node_ids()))
    if unknown:
        raise JobError(f"nodes {unknown} have no dataset in the FederatedDataSet")
    if not round_nodes:
        raise JobError("a job needs at least one node")
    if min_nodes is None:
        min_nodes = len(round_nodes) // 2 + 1
    if isinstance(min_nodes, bool) or not isinstance(min_nodes, int):
        raise JobError(f"min_nodes must be an int, got {min_nodes!r}")
    if not 1 <= min_nodes <= len(round_nodes):
        raise JobError(f"min_nodes must be between 1 and {len(round_nodes)}, got {min_nodes}")
    if isinstance(round_limit, bool) or not isinstance(round_limit, int) or round_limit < 1:
        raise JobError(f"round_limit must be an int of at least 1, got {round_limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise JobError(f"seed must be an int, got {seed!r}")
    try:
        deadline = float(reply_deadline_s)
    except (TypeError, ValueError):
        raise JobError(f"reply_deadline_s must be a number, got {reply_deadline_s!r}") from None
    if not deadline > 0 or deadline == float("inf"):
        raise JobError(f"reply_deadline_s must be a positive number, got {reply_deadline_s!r}")
    dataset_ids = data.dataset_ids()
    try:
        event = JobCreated(
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
            reply_deadline_s=deadline,
            aggregator=aggregator,
            aggregator_args=dict(aggregator_args or {}),
            tags=tuple(tags),
        )
    except ValueError as exc:  # a field the log could not record (EventDecodeError)
        raise JobError(f"the job's settings can not be recorded: {exc}") from None
    try:
        lifecycle.apply(initial_state(), event)
    except lifecycle.IllegalTransition as exc:
        raise JobError(f"the job's settings are refused: {exc.reason}") from None
    return event


def write_initial_params(files: JobFiles, source: str, created: JobCreated) -> str:
    """Write the seeded initial parameters under ``files``; return their digest.

    Deterministic in (plan source, model args, training args, seed): completing a cut opening
    makes the same file again.
    """
    from fedsm.training import runner  # torch: only when a job is really created

    tmp = files.root / "initial_params.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    sha = runner.initial_params(
        plan_source=source,
        plan_class=created.training_plan_class,
        model_args=dict(created.model_args),
        training_args=dict(created.training_args),
        seed=created.seed,
        out_path=tmp,
    )
    files.store(tmp, sha)
    return sha


def opening_events(files: JobFiles, source: str, created: JobCreated) -> list[Event]:
    """Write the plan source and the initial parameters locally; return the three opening
    events (recorded by the caller in one append, uploaded after)."""
    files.root.mkdir(parents=True, exist_ok=True)
    tmp = files.root / (PLAN_FILE + ".tmp")
    tmp.write_bytes(source.encode("utf-8"))  # the bytes nodes hash: no newline translation
    os.replace(tmp, files.plan)
    params_sha = write_initial_params(files, source, created)
    return [
        created,
        TrainingPlanUploaded(sha256=sha256_hex(source), class_name=created.training_plan_class),
        ParamsUploaded(round=0, sha256=params_sha),
    ]


def complete_opening(state: JobState, files: JobFiles, log_path: Path) -> list[Event]:
    """The opening events a log cut inside its opening is missing, from the job's files.

    A log holding ``JobCreated`` (and perhaps the plan) but not the initial parameters is the
    same job started but not finished: the plan source was written before the opening was
    appended, and the initial parameters are a function of the recorded settings.
    """
    created = state.config
    if state.status is JobStatus.NEW or created is None:
        raise JobError(
            f"{log_path} holds no job yet: start it with Job(...) or Experiment(...) on this "
            "run directory"
        )
    if state.plan_sha256 is not None and state.params_sha256 is not None:
        return []  # the opening is whole
    if not files.plan.is_file():
        raise JobError(
            f"{log_path} stops inside the job's opening and the plan source {files.plan} is "
            "missing: start the job again in a new run directory"
        )
    source = files.plan.read_bytes().decode("utf-8")
    sha = sha256_hex(source)
    missing: list[Event] = []
    if state.plan_sha256 is None:
        missing.append(TrainingPlanUploaded(sha256=sha, class_name=created.training_plan_class))
    elif state.plan_sha256 != sha:
        raise JobError(
            f"{files.plan} is not the plan {log_path} names ({state.plan_sha256}): restore "
            "it from the repository or start the job again"
        )
    if state.params_sha256 is None:
        missing.append(ParamsUploaded(round=0, sha256=write_initial_params(files, source, created)))
    return missing


def check_restorable(state: JobState, log_path: Path, researcher_id: str) -> None:
    """Raise :class:`JobError` saying why the job folded from ``log_path`` can not go on."""
    if state.researcher_id is not None and researcher_id != state.researcher_id:
        # Nodes answer a re-sent request from their reply cache only if it is the same
        # request, from the same researcher (and, over MQTT, to the same reply topic).
        raise JobError(
            f"job {state.job_id} belongs to researcher {state.researcher_id!r}; resume it "
            f"with a bus whose participant id is that researcher, not {researcher_id!r}"
        )


def job_key(run_dir: Path) -> bytes:
    """The job's secret (32 random bytes in ``run_dir/job.key``, mode 0600), made on first use.

    It keys the train request ids so that nobody can predict them (a participant who may
    publish to a node's request topic could otherwise pre-claim an id). Losing it loses
    nothing: ids already sent are recorded in the log, and every id is recorded before its
    request goes out, so a new key only names the requests of later rounds differently.
    """
    path = Path(run_dir) / KEY_NAME
    try:
        data = path.read_bytes()
        if len(data) == 32:
            return data
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise JobError(f"can not read the job's key {path}: {exc}") from exc
    key = os.urandom(32)
    tmp = path.with_name(f".{KEY_NAME}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise JobError(f"can not write the job's key {path}: {exc}") from exc
    return key
