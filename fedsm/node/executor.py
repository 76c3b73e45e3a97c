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
import errno
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
    "NODE_IO_ERRNOS",
    "describe_io_fault",
    "error_code_for",
    "io_fault",
    "run_task",
]

log = logging.getLogger(__name__)

# Exception class names of the training layer -> the code an error reply carries. Matched by
# name along the MRO so that the node does not need to import torch to classify an error.
_CODES_BY_CLASS = {
    "PlanImportError": ErrorNumber.PLAN_IMPORT_FAILED,
    "ParamsFileError": ErrorNumber.PARAMS_INVALID,
    "DatasetError": ErrorNumber.DATASET_INVALID,
    # The node's registry: locked by another process past its busy timeout (try again), a
    # plan source over the node's max_plan_bytes (the request's fault).
    "RegistryBusy": ErrorNumber.NODE_BUSY,
    "PlanTooLarge": ErrorNumber.BAD_REQUEST,
}

#: errno values that say the node's machine could not keep its own files: a fault of the
#: node (its operator makes room, remounts, raises a limit), never of the request.
NODE_IO_ERRNOS: frozenset[int] = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EMFILE", "ENFILE", "EFBIG")
    if hasattr(errno, name)
)
#: The node's own typed I/O errors (settings, registry), by class name along the MRO.
_IO_CLASSES = ("NodeDirIOError", "RegistryIOError", "NodeIOError")
#: sqlite's messages for a full or failing disk (``sqlite3.OperationalError``).
_SQLITE_IO_TEXT = ("database or disk is full", "disk i/o error")
_IO_HINTS = {
    errno.ENOSPC: "disk full",
    errno.EROFS: "read-only file system",
    errno.EIO: "disk I/O error",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.EFBIG: "file too large",
}
if hasattr(errno, "EDQUOT"):
    _IO_HINTS[errno.EDQUOT] = "disk quota exceeded"


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes and contexts, each once, nearest first (bounded)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 64:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return seen


def io_fault(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain (itself, ``__cause__``, ``__context__``) that says
    the node's machine could not read or write its own files, or None.

    That is an :class:`OSError` whose errno is in :data:`NODE_IO_ERRNOS` (no space, quota,
    read-only file system, I/O error, too many open files), sqlite's "database or disk is
    full" / "disk I/O error", or one of the node's typed I/O errors (``NodeIOError``, the
    registry's ``RegistryIOError``, ``NodeDirIOError``).
    """
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in NODE_IO_ERRNOS:
            return link
        names = {cls.__name__ for cls in type(link).__mro__}
        if names.intersection(_IO_CLASSES):
            return link
        if "Error" in names and type(link).__module__ == "sqlite3":
            if str(link).lower().startswith(_SQLITE_IO_TEXT):
                return link
    return None


def describe_io_fault(fault: BaseException, what: str = "") -> str:
    """One line for an operator: ``what`` failed, the file, and why (``disk full``...)."""
    if isinstance(fault, OSError) and fault.errno is not None:
        hint = _IO_HINTS.get(fault.errno, "")
        reason = fault.strerror or str(fault)
        if hint and hint.lower() not in reason.lower():
            reason = f"{reason} ({hint})"
        text = f"{reason}: {fault.filename}" if fault.filename else reason
    else:
        text = str(fault).splitlines()[0] if str(fault) else type(fault).__name__
        if "full" in text.lower() and "disk full" not in text.lower():
            text += " (disk full)"
    return f"{what}: {text}" if what else text


def error_code_for(exc: BaseException) -> ErrorNumber:
    """The :class:`ErrorNumber` for an exception raised while training (or serving).

    A node-local I/O failure anywhere in the exception's chain (a ``ParamsFileError`` raised
    because the params file could not be written on a full disk, say) is ``NODE_IO_ERROR``,
    not a fault of the request: see :func:`io_fault`.
    """
    if io_fault(exc) is not None:
        return ErrorNumber.NODE_IO_ERROR
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

    For an executor that takes parameters in memory (:attr:`TrainingExecutor.in_memory`)
    the parameters may travel as bytes instead of files: ``params_bytes`` replaces the file
    at ``params_path``, and an empty ``out_path`` asks for the new parameters back in
    :attr:`TrainingOutcome.params_bytes`.
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
    params_bytes: bytes | None = field(default=None, repr=False)

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
    #: The new parameters (safetensors bytes) when the task had no ``out_path``.
    params_bytes: bytes | None = field(default=None, repr=False)


def run_task(task: TrainingTask) -> TrainingOutcome:
    """Run ``task`` through the training runner in this thread; exceptions propagate."""
    # torch is imported here, not at load
    from fedsm.training.runner import train_round, validate_round

    common = dict(
        plan_source=task.plan_source,
        plan_class=task.plan_class,
        model_args=task.model_args,
        training_args=task.training_args,
        params_path=task.params_bytes if task.params_bytes is not None else Path(task.params_path),
        dataset=task.dataset,
        seed=task.seed,
    )
    if task.do_training:
        # The output is a scratch file (or bytes) that the node's upload stores durably:
        # no fsync of its own.
        result = train_round(
            **common,
            out_path=Path(task.out_path) if task.out_path else None,
            aggregator_args=task.aggregator_args,
            aggregator_files=task.aggregator_files,
            durable=False,
        )
    else:
        result = validate_round(**common)
    metrics = {str(k): float(v) for k, v in dict(result.metrics).items()}
    return TrainingOutcome(
        params_sha256=str(result.params_sha256),
        sample_size=int(result.sample_size),
        metrics=metrics,
        extras={str(k): float(v) for k, v in dict(result.extras).items()},
        params_bytes=result.params_bytes,
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

    #: Whether a task's parameters may travel as bytes (:attr:`TrainingTask.params_bytes`,
    #: an empty ``out_path``) instead of scratch files: in the node's own process, or
    #: through a worker's pipe for parameters of at most :attr:`max_bytes_in_memory`.
    in_memory: bool = False
    #: Largest parameters passed as bytes (None: any size); larger ones go through files.
    max_bytes_in_memory: int | None = None

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

    ``in_memory`` (default): the parameters travel between the node and the training as
    bytes, never through a file (see :attr:`TrainingExecutor.in_memory`); False: through
    scratch files, as with a worker process.
    """

    def __init__(
        self,
        *,
        lane_threads: int = 4,
        control_threads: int = 2,
        max_concurrent_trainings: int = 1,
        in_memory: bool = True,
    ) -> None:
        super().__init__(lane_threads=lane_threads, control_threads=control_threads)
        self._slots = threading.BoundedSemaphore(max_concurrent_trainings)
        self.in_memory = in_memory

    def train(self, task: TrainingTask, *, time_limit_s: float | None = None) -> TrainingOutcome:
        with self._slots:
            try:
                return run_task(task)
            except (Exception, SystemExit) as exc:  # a plan calling sys.exit() failed too
                raise TrainingFailed(
                    f"{type(exc).__name__}: {exc}", code=error_code_for(exc)
                ) from exc
