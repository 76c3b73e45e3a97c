"""What a Job shows of itself, read from its state: the seed's properties and breakpoints.

Kept apart from :mod:`fedsm.researcher.job`, which decides and acts, because none of this
changes anything: every value here is derived from the fold of the log (plus the local
files and the repository's location, for paths and URLs).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsm.core.events import JobCreated
from fedsm.core.jobstate import JobState
from fedsm.repository.base import Repository
from fedsm.researcher import breakpoints
from fedsm.researcher.datacheck import check_data_quality
from fedsm.researcher.requests import FederatedDataSet, Requests

if TYPE_CHECKING:
    from fedsm.log.writer import EventLog
    from fedsm.researcher.setup import JobFiles

__all__ = ["JobViews"]


class JobViews:
    """The read-only half of :class:`~fedsm.researcher.job.Job`."""

    _state: JobState
    _reqs: Requests
    _repo: Repository
    _files: JobFiles
    _log: EventLog
    _plan_source: str
    _data: FederatedDataSet

    @property
    def id(self) -> str:
        """The job id (``job-<hex>``), from ``JobCreated``."""
        assert self._state.job_id is not None
        return self._state.job_id

    @property
    def requests(self) -> Requests:
        """The researcher's requests (its bus)."""
        return self._reqs

    @property
    def state(self) -> JobState:
        """The lifecycle state: the fold of the log so far."""
        return self._state

    @property
    def log_head(self) -> dict[str, Any]:
        """The log's head, ``{"seq": n, "hash": hex}``: what every request carries for the
        nodes to witness (``fedsm replay --verify --witness`` checks the log against them)."""
        seq, digest = self._log.head
        return {"seq": seq, "hash": digest.hex()}

    @property
    def last_seq(self) -> int:
        """Seq of the last event recorded in the job's log (a breakpoint is (log, seq))."""
        return self._log.last_seq

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
        return self._config.training_plan_class

    @property
    def training_plan_file(self) -> Path:
        """The local copy of the plan source that was uploaded (and approved by sha256)."""
        return self._files.plan

    @functools.cached_property
    def training_plan(self) -> type:
        """The plan class, imported from the exact source that was uploaded."""
        from fedsm.training.loader import load_plan_class

        return load_plan_class(self._plan_source, self.training_plan_name)

    @property
    def model_args(self) -> dict[str, Any]:
        """The model arguments every node receives."""
        return dict(self._config.model_args)

    @property
    def aggregator_args(self) -> dict[str, Any]:
        """The aggregator's arguments recorded at creation (empty for FedAvg)."""
        return dict(self._config.aggregator_args)

    @property
    def training_replies(self) -> dict[int, dict[str, dict[str, Any]]]:
        """Per round, per node: what the node sent (from the log), with the local params path."""
        out: dict[int, dict[str, dict[str, Any]]] = {}
        datasets = self._config.datasets
        for rnd, replies in self._state.replies.items():
            out[rnd] = {
                node: {
                    "node_id": node,
                    "dataset_id": datasets.get(node, ""),
                    "params_url": self._repo.url_for(r.params_sha256),
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
        assert self._state.params_sha256 is not None
        return self._state.params_sha256

    def params_path(self, sha256: str) -> Path:
        """Where parameters with this digest are (or will be) kept locally."""
        return self._files.params(sha256)

    def waiting_for_nodes(self, responses: Mapping[str, Any] | None = None) -> bool:
        """Whether nodes of the current round have neither replied nor failed yet."""
        if not self._state.status.in_round:
            return False
        if responses is None:
            return bool(self._state.pending_nodes())
        return bool(set(self._state.round_nodes) - set(responses))

    def check_data_quality(self) -> None:
        """Compare the nodes' datasets; raise :class:`DataQualityCheckError` on a mismatch."""
        check_data_quality(self._data)

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
        if not self._state.status.stopped:
            return None
        last = None
        for record in self._log.records(from_seq=self._log.last_seq):
            last = record.event
        return getattr(last, "reason", None)

    @property
    def _config(self) -> JobCreated:
        config = self._state.config
        assert config is not None
        return config
