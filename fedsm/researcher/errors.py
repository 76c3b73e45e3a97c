"""Errors of the researcher's Job, apart so that the Job and its round driver share them."""

from __future__ import annotations

from fedsm.errors import FedsmError

__all__ = ["JobError", "JobFailedError", "DataQualityCheckError", "TrainingPlanNotApproved"]


class JobError(FedsmError):
    """The Job can not do what was asked; the message says why and what to do."""


class JobFailedError(JobError):
    """The job failed and a ``JobFailed`` event was recorded (e.g. too few nodes replied)."""


class DataQualityCheckError(JobError, ValueError):
    """The nodes' datasets differ (type, column count, dtypes or shapes)."""


class TrainingPlanNotApproved(JobError):
    """Nodes that require approval have not approved this plan's exact sha256."""
