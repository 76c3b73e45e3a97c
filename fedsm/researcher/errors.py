"""Errors of the researcher's Job, apart so that the Job and its round driver share them."""

from __future__ import annotations

from fedsm.core.lifecycle import IllegalTransition
from fedsm.errors import FedsmError

__all__ = [
    "DataQualityCheckError",
    "JobError",
    "JobIOError",
    "JobFailedError",
    "RefusedByLifecycle",
    "TrainingPlanNotApproved",
]


class JobError(FedsmError):
    """The Job can not do what was asked; the message says why and what to do."""


class JobIOError(JobError, OSError):
    """The researcher's machine could not read or write the job's files (disk full, read-only
    file system). Whatever was recorded stays recorded; free space and resume the job
    (``Experiment.resume``): it carries on from its log. ``errno`` is the cause's."""


class JobFailedError(JobError):
    """The job failed and a ``JobFailed`` event was recorded (e.g. too few nodes replied)."""


class DataQualityCheckError(JobError, ValueError):
    """The nodes' datasets differ (type, column count, dtypes or shapes)."""


class TrainingPlanNotApproved(JobError):
    """Nodes that require approval have not approved this plan's exact sha256."""


class RefusedByLifecycle(JobError, IllegalTransition):
    """A Job call the lifecycle does not allow now (a round out of turn, approval asked after
    the first round...). Raised before anything is sent or recorded: nothing changed. It is
    both a :class:`JobError` and the core's :class:`~fedsm.core.lifecycle.IllegalTransition`."""
