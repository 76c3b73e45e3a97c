"""Where a node's trainings run: the :class:`TrainingExecutor` interface and the in-process one.

An executor does two jobs for the nodes that use it:

* scheduling: :meth:`TrainingExecutor.submit` runs a node's train requests one after the
  other (a *lane* per node) on a small thread pool, off the transport's delivery thread, and
  :meth:`TrainingExecutor.submit_control` runs short requests (plan status) on another pool so
  they are answered while a training runs;
* running one training (:meth:`TrainingExecutor.train`): in a worker process
  (:class:`~fedsm.node.process_executor.ProcessTrainingExecutor`, what ``fedsm node start``
  uses) or in the calling thread (:class:`InProcessTrainingExecutor`, for thousands of
  simulated nodes in one process: they share its pools, so a simulated node costs only its
  registry and reply cache).
"""

from __future__ import annotations

import abc
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsm.core.protocol_errors import ErrorNumber
from fedsm.node.errors import TrainingFailed

__all__ = [
    "TrainingTask",
    "TrainingOutcome",
    "TrainingExecutor",
    "InProcessTrainingExecutor",
    "error_code_for",
    "run_task",
]

log = logging.getLogger(__name__)

# Exception class names of the training layer -> the code an error reply carries. Matched by
# name along the MRO so that the node does not need to import torch to classify an error.
_CODES_BY_CLASS = {
    "PlanImportError": ErrorNumber.PLAN_IMPORT_FAILED,
    "ParamsFileError": ErrorNumber.PARAMS_INVALID,
    "DatasetError": ErrorNumber.DATASET_INVALID,
}


def error_code_for(exc: BaseException) -> ErrorNumber:
    """The :class:`ErrorNumber` for an exception raised while training."""
    for cls in type(exc).__mro__:
        code = _CODES_BY_CLASS.get(cls.__name__)
        if code is not None:
            return code
    return ErrorNumber.TRAINING_FAILED


@dataclass(frozen=True)
class TrainingTask:
    """One round, as plain data (it crosses a process boundary as msgpack).

    ``do_training`` False: a validation-only round (the request's ``do_training``): the
    params at ``params_path`` are evaluated on the validation split and nothing is written
    to ``out_path``.
    """

    plan_source: str
    plan_class: str
    model_args: dict[str, Any]
    training_args: dict[str, Any]
    params_path: str
    dataset: dict[str, Any]
    seed: int
    out_path: str
    do_training: bool = True
    #: The strategy's values for this node (``fedprox_mu``...), and its files (name -> local
    #: path of a safetensors file already checked against its digest).
    aggregator_args: dict[str, Any] = field(default_factory=dict)
    aggregator_files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain map of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class TrainingOutcome:
    """What a training produced: the new parameters file's digest, sample count, metrics.

    For a validation-only task: the digest of the (unchanged) input parameters, the number
    of samples validated on, and the ``global_val_*`` metrics.
    """

    params_sha256: str
    sample_size: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: Numbers for the strategy sent beside the parameters (``num_updates``, ``lr``).
    extras: dict[str, float] = field(default_factory=dict)


def run_task(task: TrainingTask) -> TrainingOutcome:
    """Run ``task`` through the training runner in this thread; exceptions propagate."""
    # torch is imported here, not at load
    from fedsm.training.runner import train_round, validate_round

    common = dict(
        plan_source=task.plan_source,
        plan_class=task.plan_class,
        model_args=task.model_args,
        training_args=task.training_args,
        params_path=Path(task.params_path),
        dataset=task.dataset,
        seed=task.seed,
    )
    if task.do_training:
        result = train_round(
            **common,
            out_path=Path(task.out_path),
            aggregator_args=task.aggregator_args,
            aggregator_files=task.aggregator_files,
        )
    else:
        result = validate_round(**common)
    metrics = {str(k): float(v) for k, v in dict(result.metrics).items()}
    return TrainingOutcome(
        params_sha256=str(result.params_sha256),
        sample_size=int(result.sample_size),
        metrics=metrics,
        extras={str(k): float(v) for k, v in dict(result.extras).items()},
    )


class TrainingExecutor(abc.ABC):
    """Schedules nodes' work and runs trainings. Share one between many nodes if you like.

    A node never closes an executor it was given; close it after the nodes that use it.

    Parameters
    ----------
    lane_threads
        Threads that run train requests (one lane = one node's queue, run in order).
    control_threads
        Threads for short requests (plan status), so they never wait behind a training.
    """

    def __init__(self, *, lane_threads: int = 1, control_threads: int = 1) -> None:
        self._lane_pool = ThreadPoolExecutor(lane_threads, thread_name_prefix="fedsm-train")
        self._control_pool = ThreadPoolExecutor(control_threads, thread_name_prefix="fedsm-control")
        self._lanes: dict[Hashable, deque[Callable[[], None]]] = {}
        self._lanes_lock = threading.Lock()
        self._closed = False

    def submit(self, lane: Hashable, work: Callable[[], None]) -> None:
        """Run ``work`` after everything submitted earlier on the same ``lane``."""
        with self._lanes_lock:
            self._check_open()
            queue = self._lanes.get(lane)
            if queue is not None:  # the lane is being drained: join its queue
                queue.append(work)
                return
            self._lanes[lane] = deque([work])
        self._lane_pool.submit(self._drain, lane)

    def _drain(self, lane: Hashable) -> None:
        while True:
            with self._lanes_lock:
                queue = self._lanes[lane]
                if not queue:
                    del self._lanes[lane]
                    return
                work = queue.popleft()
            _run_logged(work)

    def submit_control(self, work: Callable[[], None]) -> None:
        """Run a short piece of work (e.g. a plan-status request) soon, on the control pool."""
        with self._lanes_lock:
            self._check_open()
        self._control_pool.submit(_run_logged, work)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def start(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Get ready to train (e.g. start a worker process). Idempotent; optional."""

    @abc.abstractmethod
    def train(self, task: TrainingTask, *, time_limit_s: float | None = None) -> TrainingOutcome:
        """Run one task (a training, or a validation-only round when ``task.do_training`` is
        False) and return its outcome; blocks the calling (lane) thread.

        Raises :class:`~fedsm.node.errors.TrainingFailed` (the plan raised or could not be
        imported), :class:`~fedsm.node.errors.TrainingTimedOut` or
        :class:`~fedsm.node.errors.WorkerCrashed`.
        """

    def close(self, *, wait: bool = True) -> None:
        """Stop taking work; with ``wait``, let queued work finish first. Idempotent."""
        with self._lanes_lock:
            self._closed = True
        self._control_pool.shutdown(wait=wait, cancel_futures=not wait)
        self._lane_pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> TrainingExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_logged(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:  # a node's work reports its own errors; this is the last resort
        log.exception("unhandled error in node work %r", work)


class InProcessTrainingExecutor(TrainingExecutor):
    """Trains in the calling thread: for many simulated nodes sharing one process.

    ``max_concurrent_trainings`` (default 1) bounds trainings running at once: torch's RNG,
    thread count and deterministic-algorithm switch are process-wide, so two trainings at the
    same time in one process could not each be deterministic. Downloads and uploads of other
    nodes still overlap with a training. There is no wall-clock limit here (a thread cannot
    be killed); use :class:`~fedsm.node.process_executor.ProcessTrainingExecutor` for plans
    you do not trust to finish.
    """

    def __init__(
        self,
        *,
        lane_threads: int = 4,
        control_threads: int = 2,
        max_concurrent_trainings: int = 1,
    ) -> None:
        super().__init__(lane_threads=lane_threads, control_threads=control_threads)
        self._slots = threading.BoundedSemaphore(max_concurrent_trainings)

    def train(self, task: TrainingTask, *, time_limit_s: float | None = None) -> TrainingOutcome:
        with self._slots:
            try:
                return run_task(task)
            except (Exception, SystemExit) as exc:  # a plan calling sys.exit() failed too
                raise TrainingFailed(
                    f"{type(exc).__name__}: {exc}", code=error_code_for(exc)
                ) from exc
