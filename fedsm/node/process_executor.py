"""Training in a reused worker process with a wall-clock limit: what ``fedsm node start`` uses.

Validation-only rounds (a task with ``do_training`` False) run in the worker too, under the
same limit: they import and run the researcher's plan just the same.

The worker is started once (``spawn`` by default, so it shares no threads or locks with the
node) and trains round after round. Past the time limit the node kills it (SIGKILL) and
starts a fresh one; a worker that dies during a training (a plan calling ``os._exit`` or
killing its own process) is noticed by the pipe closing. Either way the request gets an
error reply and the node keeps serving.

Worker and node talk msgpack over a pipe, never pickle: the worker runs the researcher's
plan, so what comes back from it is treated as untrusted data.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from fedsm.core.protocol_errors import ErrorNumber
from fedsm.node.errors import TrainingFailed, TrainingTimedOut, WorkerCrashed
from fedsm.node.executor import (
    TrainingExecutor,
    TrainingOutcome,
    TrainingTask,
    error_code_for,
    run_task,
)

__all__ = ["ProcessTrainingExecutor"]

log = logging.getLogger(__name__)

_MAX_REPLY_BYTES = 1 << 20


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)


def _worker_main(conn: Connection, preload: bool) -> None:
    """Body of the worker process: train each task received until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's to handle
    if preload:  # pay torch's import once, before round 1; a failure resurfaces per task
        try:
            from fedsm.training.runner import warm_up

            warm_up()
        except Exception:  # noqa: BLE001 - resurfaces, with its message, on the first task
            pass
    conn.send_bytes(_pack({"kind": "ready", "pid": os.getpid()}))
    while True:
        try:
            request = _unpack(conn.recv_bytes())
        except EOFError:  # the node went away
            return
        if request.get("kind") != "train":
            return
        try:
            outcome = run_task(TrainingTask(**request["task"]))
            reply = {
                "kind": "ok",
                "params_sha256": outcome.params_sha256,
                "sample_size": outcome.sample_size,
                "metrics": outcome.metrics,
            }
        except BaseException as exc:  # noqa: B036 - a plan's sys.exit() is a failure too
            if isinstance(exc, KeyboardInterrupt):
                raise
            tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            reply = {
                "kind": "error",
                "code": int(error_code_for(exc)),
                "message": tail[-2000:],
            }
        conn.send_bytes(_pack(reply))


class _Worker:
    """One worker process and the node's end of its pipe."""

    def __init__(self, ctx: Any, *, preload: bool) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child, preload), name="fedsm-training-worker", daemon=True
        )
        self.process.start()
        child.close()

    def wait_ready(self, timeout_s: float) -> None:
        if not self.conn.poll(timeout_s):
            self.kill()
            raise WorkerCrashed(f"the training worker did not start within {timeout_s:g} s")
        try:
            hello = _unpack(self.conn.recv_bytes(_MAX_REPLY_BYTES))
        except (EOFError, OSError, ValueError):
            code = self.kill()
            raise WorkerCrashed(
                f"the training worker died while starting (exit code {code})"
            ) from None
        if hello.get("kind") != "ready":
            self.kill()
            raise WorkerCrashed(f"the training worker sent {hello!r} instead of 'ready'")

    def kill(self) -> int | None:
        """Kill the process (if alive), reap it and return its exit code."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
        return self.process.exitcode

    def stop(self, timeout_s: float) -> None:
        """Ask the worker to exit; kill it if it does not within ``timeout_s``."""
        try:
            self.conn.send_bytes(_pack({"kind": "stop"}))
        except OSError:
            pass
        self.process.join(timeout_s)
        self.kill()


class ProcessTrainingExecutor(TrainingExecutor):
    """Trains in one reused worker process, killed and restarted past ``time_limit_s``.

    Parameters
    ----------
    time_limit_s
        Default wall-clock limit of one training (a node passes its own setting).
    start_method
        ``"spawn"`` (default: a clean interpreter) or ``"forkserver"``.
    start_timeout_s
        How long a new worker may take to start (importing torch takes seconds).
    preload
        Import the training runner (and torch) in the worker when it starts, so the first
        round does not pay for it.
    max_trainings_per_worker
        Replace the worker after this many trainings (0: never). Every round imports its
        plan into a fresh module that stays in the worker's memory, so a worker serving a
        long-lived node is recycled now and then.
    """

    def __init__(
        self,
        *,
        time_limit_s: float = 3600.0,
        start_method: str = "spawn",
        start_timeout_s: float = 120.0,
        preload: bool = True,
        max_trainings_per_worker: int = 200,
    ) -> None:
        super().__init__(lane_threads=1, control_threads=2)
        self._max_trainings = max_trainings_per_worker
        self._trainings = 0  # by the current worker
        self._ctx = multiprocessing.get_context(start_method)
        self._time_limit_s = time_limit_s
        self._start_timeout_s = start_timeout_s
        self._preload = preload
        self._worker: _Worker | None = None
        self._worker_lock = threading.Lock()  # one training at a time in the worker
        self.restarts = 0  # workers started after the first (for logs and tests)

    def start(self) -> None:
        """Start the worker now (instead of at the first training) and wait until ready."""
        with self._worker_lock:
            self._ensure_worker()

    @property
    def worker_pid(self) -> int | None:
        """Process id of the current worker, or None when none is running."""
        worker = self._worker
        return None if worker is None else worker.process.pid

    def _ensure_worker(self) -> _Worker:
        if self._worker is not None and 0 < self._max_trainings <= self._trainings:
            log.info(
                "recycling training worker %s after %d trainings",
                self._worker.process.pid,
                self._trainings,
            )
            self._worker.stop(5.0)
        if self._worker is None or not self._worker.process.is_alive():
            if self._worker is not None:
                self._worker.kill()
                self.restarts += 1
            worker = _Worker(self._ctx, preload=self._preload)
            worker.wait_ready(self._start_timeout_s)
            self._worker = worker
            self._trainings = 0
            log.info("training worker %s ready", worker.process.pid)
        return self._worker

    def _discard_worker(self) -> int | None:
        worker, self._worker = self._worker, None
        self.restarts += 1
        return None if worker is None else worker.kill()

    def train(self, task: TrainingTask, *, time_limit_s: float | None = None) -> TrainingOutcome:
        limit = self._time_limit_s if time_limit_s is None else time_limit_s
        with self._worker_lock:
            worker = self._ensure_worker()
            self._trainings += 1
            try:
                worker.conn.send_bytes(_pack({"kind": "train", "task": task.to_dict()}))
            except OSError:
                code = self._discard_worker()
                raise WorkerCrashed(
                    f"the training worker died before the task was sent (exit code {code})"
                ) from None
            if not worker.conn.poll(limit):
                self._discard_worker()
                raise TrainingTimedOut(
                    f"training did not finish within the node's limit of {limit:g} s; the "
                    "worker was killed and restarted (raise training_time_limit_s if the "
                    "plan is expected to take longer)"
                )
            try:
                reply = _unpack(worker.conn.recv_bytes(_MAX_REPLY_BYTES))
            except (EOFError, OSError):
                code = self._discard_worker()
                raise WorkerCrashed(
                    f"the training worker died during training (exit code {code}); a new "
                    "worker was started"
                ) from None
            except ValueError as exc:  # unpack error or reply too large
                self._discard_worker()
                raise WorkerCrashed(
                    f"the training worker sent an unreadable reply: {exc}"
                ) from None
        return _outcome_from(reply)

    def close(self, *, wait: bool = True) -> None:
        """Stop the worker. With ``wait``, queued trainings finish first; without, a running
        training is killed with its worker (its request gets no reply)."""
        if not wait:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.kill()
        super().close(wait=wait)
        with self._worker_lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.stop(5.0)


def _outcome_from(reply: Any) -> TrainingOutcome:
    """Validate the worker's reply (it comes from a process running foreign code)."""
    if not isinstance(reply, dict):
        raise WorkerCrashed(f"the training worker sent {type(reply).__name__}, not a map")
    if reply.get("kind") == "error":
        try:
            code = ErrorNumber(reply.get("code"))
        except ValueError:
            code = ErrorNumber.TRAINING_FAILED
        raise TrainingFailed(str(reply.get("message", ""))[:2000], code=code)
    try:
        metrics = {str(k): float(v) for k, v in dict(reply["metrics"]).items()}
        return TrainingOutcome(
            params_sha256=str(reply["params_sha256"]),
            sample_size=int(reply["sample_size"]),
            metrics=metrics,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WorkerCrashed(f"the training worker sent a malformed result: {exc}") from None
