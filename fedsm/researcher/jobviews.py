"""What a Job shows of itself, read from its state: the seed's properties and breakpoints.

Kept apart from :mod:`fedsm.researcher.job`, which decides and acts, because none of this
changes anything: every value here is derived from the fold of the log (plus the local
files and the repository's location, for paths and URLs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsm.core.events import JobCreated, NodeFailed, ReplyReceived, RoundSent
from fedsm.core.jobstate import JobState
from fedsm.log.read import scan
from fedsm.repository.base import Repository
from fedsm.researcher import breakpoints
from fedsm.researcher.datacheck import check_data_quality, validate_minimal_arguments
from fedsm.researcher.requests import FederatedDataSet, Requests

if TYPE_CHECKING:
    import torch

    from fedsm.log.writer import EventLog
    from fedsm.researcher.driver import RoundDriver
    from fedsm.researcher.setup import JobFiles
    from fedsm.training.plan import TorchTrainingPlan

__all__ = ["JobViews", "TrainingReply"]

#: The keys of a :class:`TrainingReply`: the seed's, then fedsm's extras.
REPLY_KEYS = (
    "success",
    "msg",
    "node_id",
    "dataset_id",
    "params_path",
    "params",
    "timing",
    "sample_size",
    "metrics",
    "params_url",
    "params_sha256",
)
_UNSET: Any = object()


class TrainingReply(Mapping[str, Any]):
    """One node's answer to one round, in the shape of the seed's training replies.

    A read-only mapping with the seed's keys (``success``, ``msg``, ``node_id``,
    ``dataset_id``, ``params_path``, ``params``, ``timing``, ``sample_size``, ``metrics``)
    and fedsm's ``params_url`` and ``params_sha256``. ``params`` (the tensors) are loaded
    from ``params_path`` on first access, and ``timing`` (the node's timing plus
    ``rtime_total``) read from the log's record times on first access; both are then kept
    by this entry only (:attr:`JobViews.training_replies` builds new entries each time).
    A failed node has ``success`` False, its error in ``msg``, and None for ``params_path``,
    ``params`` and ``sample_size``; a validation-only round's entries have no params.
    """

    __slots__ = ("_values", "_load_params", "_timing", "_params", "_timing_value")

    def __init__(
        self,
        values: dict[str, Any],
        load_params: Callable[[], dict[str, torch.Tensor]] | None,
        timing: Callable[[], dict[str, float]],
    ) -> None:
        self._values = values
        self._load_params = load_params
        self._timing = timing
        self._params: Any = _UNSET
        self._timing_value: Any = _UNSET

    def __getitem__(self, key: str) -> Any:
        if key == "params":
            if self._params is _UNSET:
                self._params = None if self._load_params is None else self._load_params()
            return self._params
        if key == "timing":
            if self._timing_value is _UNSET:
                self._timing_value = self._timing()
            return self._timing_value
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(REPLY_KEYS)

    def __len__(self) -> int:
        return len(REPLY_KEYS)

    def __contains__(self, key: object) -> bool:
        return key in REPLY_KEYS

    def __repr__(self) -> str:  # never loads the params
        v = self._values
        state = "ok" if v["success"] else f"failed: {v['msg']!r}"
        return f"TrainingReply(node_id={v['node_id']!r}, {state})"


@dataclass
class _RecordTimes:
    """Record times read from the log so far: when each round was sent, when each node's
    reply or failure was recorded. Filled incrementally (only new records are decoded)."""

    seq: int = 0
    sent: dict[int, float] = field(default_factory=dict)
    answered: dict[tuple[int, str], float] = field(default_factory=dict)


class JobViews:
    """The read-only half of :class:`~fedsm.researcher.job.Job`."""

    validate_minimal_arguments = staticmethod(validate_minimal_arguments)

    _state: JobState
    _reqs: Requests
    _repo: Repository
    _files: JobFiles
    _log: EventLog
    _plan_source: str
    _data: FederatedDataSet
    _driver: RoundDriver

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
    def repo(self) -> Repository:
        """The seed's name for :attr:`repository`."""
        return self._repo

    @property
    def last_msg(self) -> Any:
        """The seed's ``last_msg``: the last node message this process took in (a reply,
        counted or not), or None. What counts is in the log (``fedsm replay``)."""
        return self._driver.last_message

    @property
    def training_plan_name(self) -> str:
        """The training plan's class name."""
        return self._config.training_plan_class

    @property
    def training_plan_file(self) -> Path:
        """The local copy of the plan source that was uploaded (and approved by sha256)."""
        return self._files.plan

    @functools.cached_property
    def training_plan(self) -> TorchTrainingPlan:
        """The training plan instance, as the seed's: built on first access from the exact
        source that was uploaded, ``post_init`` done with the job's model args and training
        args, its model seeded as the job's initial parameters were. Load the current global
        parameters into it with ``job.training_plan.load(job.params_path(job.params_sha256))``.
        """
        from fedsm.training.loader import load_plan_class
        from fedsm.training.runner import deterministic, make_plan

        cls = load_plan_class(self._plan_source, self.training_plan_name)
        with deterministic(self._config.seed):
            return make_plan(cls, self._config.model_args, self._state.training_args)

    @property
    def model_args(self) -> dict[str, Any]:
        """The model arguments every node receives."""
        return dict(self._config.model_args)

    @property
    def aggregator_args(self) -> dict[str, Any]:
        """The aggregator's arguments recorded at creation (empty for FedAvg)."""
        return dict(self._config.aggregator_args)

    @property
    def training_replies(self) -> dict[int, dict[str, TrainingReply]]:
        """Per round sent (validation-only rounds too), per node that replied or failed: a
        :class:`TrainingReply` with the seed's keys, from the log. Nodes that failed are
        present with ``success`` False and their error; nodes that never answered (the
        round timed out) are absent. Built anew at each access; nothing is loaded until an
        entry's ``params`` or ``timing`` is read."""
        state = self._state
        datasets = self._config.datasets
        url_for = self._repo.url_for
        validation = set(state.validation_rounds)
        failures = state.failures
        out: dict[int, dict[str, TrainingReply]] = {}
        for rnd, replies in state.replies.items():
            entries: dict[str, TrainingReply] = {}
            for node, r in replies.items():
                trained = rnd not in validation
                sha = r.params_sha256
                entries[node] = TrainingReply(
                    {
                        "success": True,
                        "msg": "",
                        "node_id": node,
                        "dataset_id": datasets.get(node, ""),
                        "params_path": self.params_path(sha) if trained else None,
                        "sample_size": r.sample_size,
                        "metrics": dict(r.metrics),
                        "params_url": url_for(sha),
                        "params_sha256": sha,
                    },
                    functools.partial(self._load_params, sha) if trained else None,
                    functools.partial(self._reply_timing, rnd, node, r.timing),
                )
            for node, f in failures.get(rnd, {}).items():
                entries[node] = TrainingReply(
                    {
                        "success": False,
                        "msg": f.message,
                        "node_id": node,
                        "dataset_id": datasets.get(node, ""),
                        "params_path": None,
                        "sample_size": None,
                        "metrics": {},
                        "params_url": None,
                        "params_sha256": None,
                    },
                    None,
                    functools.partial(self._reply_timing, rnd, node, {}),
                )
            out[rnd] = dict(sorted(entries.items()))
        return out

    def _load_params(self, sha256: str) -> dict[str, torch.Tensor]:
        """The tensors of the parameters with this digest (fetched by digest when this
        machine does not hold them)."""
        from fedsm.training.params import load_params

        path = self.params_path(sha256)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._repo.download_file(self._repo.url_for(sha256), path)
        return load_params(path)

    def _reply_timing(self, rnd: int, node: str, timing: Mapping[str, float]) -> dict[str, float]:
        """The node's timing plus ``rtime_total``: seconds from the round's ``RoundSent``
        record to the node's ``ReplyReceived`` (or ``NodeFailed``) record."""
        times = self._record_times()
        out = dict(timing)
        sent, answered = times.sent.get(rnd), times.answered.get((rnd, node))
        if sent is not None and answered is not None:
            out["rtime_total"] = answered - sent
        return out

    def _record_times(self) -> _RecordTimes:
        """Record times from the log, read on demand: only the records appended since the
        last call are decoded, and nothing is read at restore or while recording."""
        times: _RecordTimes | None = self.__dict__.get("_times")
        if times is None:
            times = self.__dict__["_times"] = _RecordTimes()
        if times.seq >= self._log.last_seq:
            return times
        if self._log.closed:
            records: Iterator[Any] = iter(scan(self._log.path).records[times.seq :])
        else:
            records = self._log.records(from_seq=times.seq + 1)
        for record in records:
            event = record.event
            if isinstance(event, RoundSent):
                times.sent.setdefault(event.round, record.ts)
            elif isinstance(event, (ReplyReceived, NodeFailed)):
                times.answered.setdefault((event.round, event.node_id), record.ts)
            times.seq = record.seq
        return times

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
