"""Training in a reused worker process with a wall-clock limit: what ``fedsm node start`` uses.

Validation-only rounds (a task with ``do_training`` False) run in the worker too, under the
same limit: they import and run the researcher's plan just the same.

The worker is a plain subprocess, ``python -m fedsm.node.worker_main`` (see that module for
the wire format): no ``multiprocessing``, whose spawn bootstrap is unpickled, so a node
trains with pickle forbidden. It is started once and trains round after round. Past the time
limit the node kills it (SIGKILL, by PID), reaps it and starts a fresh one; a worker that dies
during a training (a plan calling ``os._exit`` or killing its own process) is noticed by its
pipe closing or its exit. Either way the request gets an error reply and the node keeps
serving.

Worker and node talk length-prefixed msgpack frames over the worker's stdin and stdout,
never pickle: the worker runs the researcher's plan, so what comes back from it is untrusted
data. A reply that is not a well-formed frame, or announces more than
:data:`~fedsm.node.worker_main.MAX_REPLY_BYTES`, is a :class:`~fedsm.node.errors.WorkerCrashed`
at once, not a hang; every wait on the worker has a deadline.
"""

from __future__ import annotations

import logging
import os
import select
import site
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedsm.core.protocol_errors import ErrorNumber
from fedsm.digests import sha256_hex
from fedsm.node.errors import TrainingFailed, TrainingTimedOut, WorkerCrashed
from fedsm.node.executor import TrainingExecutor, TrainingOutcome, TrainingTask
from fedsm.node.worker_main import (
    MAX_PARAMS_IN_FRAME,
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    FrameDecoder,
    encode_frame,
    unpack,
)

__all__ = ["ProcessTrainingExecutor"]

log = logging.getLogger(__name__)

_POLL_S = 0.25  # how often a wait on the worker's pipe also checks that it is alive
_REAP_S = 10.0  # how long a SIGKILLed worker may take to be reaped


class _Timeout(Exception):
    """The worker did not answer before the deadline."""


class _Gone(Exception):
    """The worker's pipe closed or the worker exited; ``args[0]`` is its exit code."""


class _Garbage(Exception):
    """The worker wrote something that is not a frame of the protocol."""


def _worker_command(preload: bool) -> list[str]:
    """The worker's command line: this interpreter, safe path (``-P``, Python 3.11+: the
    node's working directory is not on ``sys.path``), the worker module."""
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [
        sys.executable,
        *safe_path,
        "-m",
        "fedsm.node.worker_main",
        *(["--preload"] if preload else []),
    ]


def _worker_env() -> dict[str, str]:
    """The node's environment, with the directory holding this ``fedsm`` on ``PYTHONPATH``
    (appended) when it is not a site directory, so that the worker runs the same code."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    try:
        site_dirs = [*site.getsitepackages(), site.getusersitepackages()]
    except AttributeError:  # an old virtualenv's site module
        site_dirs = []
    sites = {str(Path(p).resolve()) for p in site_dirs}
    if root not in sites:
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([*parts, root])
    return env


class _Worker:
    """One worker process and the node's ends of its pipes.

    :meth:`send` and :meth:`receive` are called by one thread at a time (the executor's
    worker lock); :meth:`kill` may come from any thread and only signals and reaps, so the
    pipes are closed (:meth:`release`) by the thread that uses them.
    """

    def __init__(self, *, preload: bool) -> None:
        self.proc = subprocess.Popen(
            _worker_command(preload),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the node's stderr: the worker's logs and tracebacks
            close_fds=True,  # nothing of the node's but the two pipes
            bufsize=0,
            env=_worker_env(),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._to_worker = self.proc.stdin
        self._from_worker = self.proc.stdout
        os.set_blocking(self._to_worker.fileno(), False)
        os.set_blocking(self._from_worker.fileno(), False)
        self._decoder = FrameDecoder(MAX_REPLY_BYTES)
        self._kill_lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, frame: bytes, deadline: float) -> None:
        """Write one frame (:func:`~fedsm.node.worker_main.encode_frame`); raise
        :class:`_Gone` or :class:`_Timeout`."""
        data = memoryview(frame)
        fd = self._to_worker.fileno()
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout()
            if not _wait_for(fd, select.POLLOUT, min(left, _POLL_S)):
                if not self.alive():
                    raise self._gone(drain=True)
                continue
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                continue
            except OSError:  # EPIPE: the worker is gone
                raise self._gone(drain=True) from None

    def receive(self, deadline: float) -> Any:
        """Read one frame and decode it; raise :class:`_Gone`, :class:`_Timeout` or
        :class:`_Garbage`."""
        fd = self._from_worker.fileno()
        exited = False
        while True:
            try:
                body = self._decoder.next_frame()
            except ValueError as exc:  # FrameTooLarge
                raise _Garbage(str(exc)) from None
            if body is not None:
                try:
                    return unpack(body)
                except ValueError as exc:
                    raise _Garbage(f"a frame that is not msgpack ({exc})") from None
            if not exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Timeout()
                if not _wait_for(fd, select.POLLIN, min(left, _POLL_S)):
                    if self.alive():
                        continue
                    # The pipe may outlive the worker (a plan's forked child holding it
                    # open): it has exited, so take what it wrote and stop waiting. This
                    # ends: every chunk completes a frame or grows one towards the limit.
                    exited = True
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                if exited:
                    raise self._gone() from None
                continue
            except OSError:
                raise self._gone() from None
            if not chunk:  # EOF: every writer is gone (a complete frame was returned above)
                raise self._gone()
            self._decoder.feed(chunk)

    def _gone(self, *, drain: bool = False) -> _Gone:
        """Why the worker is gone; with ``drain``, what it wrote before dying is read first
        (it died while the node was still sending: its last words say how far it got)."""
        code = self._exit_code()
        if drain:
            fd = self._from_worker.fileno()
            left = MAX_REPLY_BYTES  # bounded: a child of the plan may still be writing
            while left > 0:
                try:
                    chunk = os.read(fd, min(left, 1 << 16))
                except OSError:  # BlockingIOError: nothing more now
                    break
                if not chunk:
                    break
                left -= len(chunk)
                self._decoder.feed(chunk)
        if self._decoder.pending:
            return _Gone(code, f"{self._decoder.pending} bytes of an unfinished frame")
        return _Gone(code)

    def _exit_code(self) -> int | None:
        """The exit code of a worker whose pipe closed (it is dying: give it a moment)."""
        try:
            return self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        """SIGKILL the worker (by PID, if it runs), reap it and return its exit code."""
        with self._kill_lock:
            if self.proc.poll() is None:
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
            try:
                return self.proc.wait(timeout=_REAP_S)
            except subprocess.TimeoutExpired:
                log.error(
                    "training worker %s did not die within %g s of SIGKILL", self.pid, _REAP_S
                )
                return None

    def release(self) -> None:
        """Kill and reap the worker and close the node's ends of its pipes. Idempotent."""
        self.kill()
        for pipe in (self._to_worker, self._from_worker):
            try:
                pipe.close()
            except OSError:
                pass

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for the worker's ``ready`` frame; on failure release it, raise WorkerCrashed."""
        try:
            hello = self.receive(time.monotonic() + timeout_s)
        except _Timeout:
            self.release()
            raise WorkerCrashed(
                f"the training worker did not start within {timeout_s:g} s"
            ) from None
        except _Gone as gone:
            self.release()
            raise WorkerCrashed(
                f"the training worker died while starting ({_describe(gone)})"
            ) from None
        except _Garbage as exc:
            self.release()
            raise WorkerCrashed(f"the training worker sent garbage while starting: {exc}") from None
        if not isinstance(hello, dict) or hello.get("kind") != "ready":
            self.release()
            raise WorkerCrashed(f"the training worker sent {hello!r:.200} instead of 'ready'")

    def stop(self, timeout_s: float) -> None:
        """Ask the worker to exit; kill it if it does not within ``timeout_s``; release it."""
        deadline = time.monotonic() + timeout_s
        try:
            self.send(encode_frame({"kind": "stop"}), deadline)
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (_Gone, _Timeout, subprocess.TimeoutExpired):
            pass
        self.release()


def _wait_for(fd: int, events: int, timeout_s: float) -> bool:
    """Whether ``fd`` became ready for ``events`` (or hung up, or failed) within ``timeout_s``."""
    poller = select.poll()  # not select.select: a node's fds may number above FD_SETSIZE
    poller.register(fd, events)
    return bool(poller.poll(max(0, int(timeout_s * 1000) + 1)))


def _describe(gone: _Gone) -> str:
    code = gone.args[0] if gone.args else None
    text = f"exit code {code}"
    return text if len(gone.args) < 2 else f"{text}, after {gone.args[1]}"


class ProcessTrainingExecutor(TrainingExecutor):
    """Trains in one reused worker process, killed and restarted past ``time_limit_s``.

    Parameters
    ----------
    time_limit_s
        Default wall-clock limit of one training (a node passes its own setting).
    start_method
        Kept for compatibility and ignored: the worker is always a fresh interpreter
        started with ``subprocess`` (no ``multiprocessing``, hence no pickle).
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

    # Parameters of up to MAX_PARAMS_IN_FRAME go to the worker and back through its pipes:
    # no scratch file, no fsync, no second read on the node's side (larger ones: files).
    in_memory = True
    max_bytes_in_memory = MAX_PARAMS_IN_FRAME

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
        if start_method not in ("spawn", "forkserver", "subprocess"):
            raise ValueError(f"unknown start_method {start_method!r}")
        self._max_trainings = max_trainings_per_worker
        self._trainings = 0  # by the current worker
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
        return None if worker is None else worker.pid

    def _ensure_worker(self) -> _Worker:
        if self._worker is not None and 0 < self._max_trainings <= self._trainings:
            log.info(
                "recycling training worker %s after %d trainings",
                self._worker.pid,
                self._trainings,
            )
            self._worker.stop(5.0)
        if self._worker is None or not self._worker.alive():
            if self._worker is not None:
                self._worker.release()
                self.restarts += 1
            # Current while it starts, so that close(wait=False) can kill it too.
            worker = self._worker = _Worker(preload=self._preload)
            try:
                worker.wait_ready(self._start_timeout_s)
            except BaseException:
                if self._worker is worker:
                    self._worker = None
                raise
            self._trainings = 0
            log.info("training worker %s ready", worker.pid)
        return self._worker

    def _discard(self, worker: _Worker) -> int | None:
        """Kill and release ``worker`` (the current one); return its exit code."""
        if self._worker is worker:
            self._worker = None
        self.restarts += 1
        code = worker.kill()
        worker.release()
        return code

    def train(self, task: TrainingTask, *, time_limit_s: float | None = None) -> TrainingOutcome:
        limit = self._time_limit_s if time_limit_s is None else time_limit_s
        if task.params_bytes is not None and len(task.params_bytes) > MAX_PARAMS_IN_FRAME:
            raise TrainingFailed(
                f"the task carries {len(task.params_bytes)} bytes of parameters, more than a "
                f"worker takes through its pipe ({MAX_PARAMS_IN_FRAME}); pass them as a file"
            )
        frame = encode_frame({"kind": "train", "task": task.to_dict()})
        if len(frame) > MAX_REQUEST_BYTES:
            raise TrainingFailed(
                f"the task ({len(frame)} bytes) is larger than a worker accepts "
                f"({MAX_REQUEST_BYTES} bytes)"
            )
        with self._worker_lock:
            worker = self._ensure_worker()
            self._trainings += 1
            deadline = time.monotonic() + limit
            try:
                worker.send(frame, deadline)
                return _outcome_from(worker.receive(deadline))
            except _Timeout:
                self._discard(worker)
                raise TrainingTimedOut(
                    f"training did not finish within the node's limit of {limit:g} s; the "
                    "worker was killed and restarted (raise training_time_limit_s if the "
                    "plan is expected to take longer)"
                ) from None
            except _Gone as gone:
                self._discard(worker)
                raise WorkerCrashed(
                    f"the training worker died during training ({_describe(gone)}); a new "
                    "worker will be started"
                ) from None
            except _Garbage as exc:
                self._discard(worker)
                raise WorkerCrashed(
                    f"the training worker sent an unreadable reply: {exc}; it was killed"
                ) from None

    def close(self, *, wait: bool = True) -> None:
        """Stop the worker. With ``wait``, queued trainings finish first; without, a running
        training is killed with its worker (its request gets no reply)."""
        killed = None
        if not wait:
            killed, self._worker = self._worker, None
            if killed is not None:
                killed.kill()  # the training thread sees the pipe close and gives up
        super().close(wait=wait)
        # A training thread holding the lock gives up by its own deadlines (or at once when
        # its worker was killed above).
        with self._worker_lock:
            worker, self._worker = self._worker, None
            if killed is not None:
                killed.release()
            if worker is not None:
                worker.stop(5.0)


def _outcome_from(reply: Any) -> TrainingOutcome:
    """Validate the worker's reply (it comes from a process running foreign code): an error
    reply raises TrainingFailed, anything malformed :class:`_Garbage`."""
    if not isinstance(reply, dict):
        raise _Garbage(f"{type(reply).__name__}, not a map")
    if reply.get("kind") == "error":
        try:
            code = ErrorNumber(reply.get("code"))
        except ValueError:
            code = ErrorNumber.TRAINING_FAILED
        raise TrainingFailed(str(reply.get("message", ""))[:2000], code=code)
    try:
        metrics = {str(k): float(v) for k, v in dict(reply["metrics"]).items()}
        extras = {str(k): float(v) for k, v in dict(reply.get("extras") or {}).items()}
        params_bytes = reply.get("params_bytes")
        if params_bytes is not None and not isinstance(params_bytes, bytes):
            raise TypeError(f"params_bytes is a {type(params_bytes).__name__}")
        digest = str(reply["params_sha256"])
        if params_bytes is not None and sha256_hex(params_bytes) != digest:
            raise ValueError("the parameters sent back do not hash to the digest reported")
        return TrainingOutcome(
            params_sha256=digest,
            sample_size=int(reply["sample_size"]),
            metrics=metrics,
            extras=extras,
            params_bytes=params_bytes,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _Garbage(f"a malformed result ({type(exc).__name__}: {exc})") from None
