"""Training simulated nodes on every core: a pool of worker processes shared by many nodes.

:class:`~fedsm.node.executor.InProcessTrainingExecutor` trains one node at a time (torch's
RNG, thread count and deterministic switch are process-wide), so a simulation of K nodes in
one process uses one core for training. :class:`PoolTrainingExecutor` keeps ``workers``
:class:`~fedsm.node.process_executor.ProcessTrainingExecutor` s (one worker process each,
msgpack over pipes, never pickle) and hands each training to whichever is free: every worker
holds a share of the nodes' trainings, and up to ``workers`` run at once while the node
threads of the simulating process download, check and upload around them.

Results do not depend on which worker trains what, or in which order: a training is a pure
function of its task (plan source, params file, dataset, seed; see
:mod:`fedsm.training.runner`, which trains with one intra-op thread and deterministic
algorithms), and the researcher aggregates in sorted node order. So the final parameters are
bit-identical to a one-core run (``tests/test_perf_pool.py`` checks it).

Parameters of up to :data:`~fedsm.node.worker_main.MAX_PARAMS_IN_FRAME` travel to a worker
and back through its pipes (:attr:`TrainingExecutor.in_memory`), so a simulated node writes
no scratch file; larger ones go through files.
"""

from __future__ import annotations

import logging
import queue
import threading

from fedsm.node.executor import TrainingExecutor, TrainingOutcome, TrainingTask
from fedsm.node.process_executor import ProcessTrainingExecutor
from fedsm.node.worker_main import MAX_PARAMS_IN_FRAME

__all__ = ["PoolTrainingExecutor"]

log = logging.getLogger(__name__)


class PoolTrainingExecutor(TrainingExecutor):
    """``workers`` training processes shared by the nodes that use this executor.

    Parameters
    ----------
    workers
        Worker processes (at most this many trainings run at once); the number of cores
        is the natural choice.
    time_limit_s, start_timeout_s, preload
        As for :class:`~fedsm.node.process_executor.ProcessTrainingExecutor` (each worker).
    max_trainings_per_worker
        Replace a worker after this many trainings (0: never). A simulation trains K nodes a
        round, so the single-node default of 200 would restart workers every few rounds.
    lane_threads
        Threads serving train requests (download, check, train, upload); default twice
        ``workers``, so a node's transfers overlap other nodes' trainings.
    """

    in_memory = True
    max_bytes_in_memory = MAX_PARAMS_IN_FRAME  # as each of its ProcessTrainingExecutors

    def __init__(
        self,
        workers: int,
        *,
        time_limit_s: float = 3600.0,
        start_timeout_s: float = 120.0,
        preload: bool = True,
        max_trainings_per_worker: int = 0,
        lane_threads: int | None = None,
        control_threads: int = 2,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        super().__init__(
            lane_threads=lane_threads if lane_threads is not None else 2 * workers,
            control_threads=control_threads,
        )
        self._executors = [
            ProcessTrainingExecutor(
                time_limit_s=time_limit_s,
                start_timeout_s=start_timeout_s,
                preload=preload,
                max_trainings_per_worker=max_trainings_per_worker,
            )
            for _ in range(workers)
        ]
        self._free: queue.SimpleQueue[ProcessTrainingExecutor] = queue.SimpleQueue()
        for executor in self._executors:
            self._free.put(executor)

    @property
    def workers(self) -> int:
        """Number of worker processes."""
        return len(self._executors)

    def start(self) -> None:
        """Start every worker now, side by side (each imports torch), and wait until ready."""
        errors: list[BaseException] = []

        def start_one(executor: ProcessTrainingExecutor) -> None:
            try:
                executor.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in this thread
                errors.append(exc)

        threads = [threading.Thread(target=start_one, args=(e,)) for e in self._executors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def train(self, task: TrainingTask, *, time_limit_s: float | None = None) -> TrainingOutcome:
        executor = self._free.get()  # blocks until a worker is free
        try:
            return executor.train(task, time_limit_s=time_limit_s)
        finally:
            self._free.put(executor)

    def close(self, *, wait: bool = True) -> None:
        """Stop taking work, then stop every worker (see ``ProcessTrainingExecutor.close``)."""
        super().close(wait=wait)
        for executor in self._executors:
            executor.close(wait=wait)
