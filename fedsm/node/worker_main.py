"""The training worker's entry point, ``python -m fedsm.node.worker_main``, and its wire format.

Theory of operation
-------------------
The node (:class:`~fedsm.node.process_executor.ProcessTrainingExecutor`) starts this module
as a plain subprocess (no ``multiprocessing``: its spawn bootstrap is a pickle, and a node
must work with pickle forbidden). The worker's stdin and stdout are the protocol pipes; its
stderr is the node's, for logs and tracebacks.

Frames, both ways: a 4-byte big-endian length, then that many bytes of msgpack (a map; no
ext types, so nothing but plain data can be decoded). A reader refuses a length above its
limit at once, before reading the body.

* worker -> node: ``{"kind": "ready", "pid": int}`` once started (after ``--preload``), then
  one reply per task: ``{"kind": "ok", "params_sha256", "sample_size", "metrics", "extras"}`` or
  ``{"kind": "error", "code": int, "message": str}``.
* node -> worker: ``{"kind": "train", "task": TrainingTask fields}`` or ``{"kind": "stop"}``.

Before anything else the worker moves the protocol pipes to private file descriptors (not
inherited by a plan's subprocesses), points fd 0 at ``/dev/null`` and fd 1 at stderr: a plan
that prints, writes to fd 1 or reads stdin cannot corrupt or steal the node's frames.

A thread reads the node's frames; when the node goes away (its end of stdin closes, e.g. it
was killed) the worker exits at once, even in the middle of a training.
"""

from __future__ import annotations

import os
import queue
import signal
import struct
import sys
import threading
import traceback
from typing import Any

import msgpack

__all__ = [
    "HEADER",
    "MAX_PARAMS_IN_FRAME",
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "FrameDecoder",
    "FrameTooLarge",
    "encode_frame",
    "read_frame",
    "pack",
    "unpack",
    "main",
]

#: The length prefix of every frame: unsigned 32-bit, big-endian.
HEADER = struct.Struct(">I")
#: Largest parameters a task and its reply carry as bytes (a simulation's pool of workers
#: passes small models through the pipes; larger ones go through scratch files).
MAX_PARAMS_IN_FRAME = 16 << 20
#: Largest frame the node accepts from a worker (a digest, a few metrics, and parameters of
#: at most :data:`MAX_PARAMS_IN_FRAME` when the task asked for them as bytes).
MAX_REPLY_BYTES = (1 << 20) + MAX_PARAMS_IN_FRAME
#: Largest frame a worker accepts from the node (a task carries the plan's source).
MAX_REQUEST_BYTES = 256 << 20


class FrameTooLarge(ValueError):
    """A frame's length prefix is above the reader's limit (garbage, or a hostile peer)."""


def pack(obj: Any) -> bytes:
    """msgpack bytes of a plain-data ``obj``."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode msgpack ``data``; raises ``ValueError`` (or a subclass) on anything malformed.
    Binary values (parameters) are taken up to :data:`MAX_PARAMS_IN_FRAME` bytes."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_PARAMS_IN_FRAME,
            max_ext_len=0,
        )
    except ValueError:
        raise
    except Exception as exc:  # msgpack's own errors are not all ValueErrors
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def encode_frame(obj: Any) -> bytes:
    """One frame: the length prefix and the msgpack body of ``obj``."""
    body = pack(obj)
    return HEADER.pack(len(body)) + body


def read_frame(fd: int, decoder: FrameDecoder) -> Any:
    """The next frame's content read from the blocking ``fd`` through ``decoder``, or None
    at the end of the stream (a reader thread's loop: it ends when the writer does)."""
    while (body := decoder.next_frame()) is None:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        decoder.feed(chunk)
    return unpack(body)


class FrameDecoder:
    """Splits a byte stream into frame bodies (sans I/O: :meth:`feed` bytes, then call
    :meth:`next_frame` until it returns None).

    Parameters
    ----------
    max_bytes
        Largest body accepted; a longer length prefix raises :class:`FrameTooLarge`.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append bytes read from the stream."""
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return len(self._buffer)

    def next_frame(self) -> bytes | None:
        """The next complete body, or None until more bytes are fed."""
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > self._max:
            head = bytes(self._buffer[: HEADER.size + 16])
            raise FrameTooLarge(
                f"a frame of {length} bytes exceeds the limit of {self._max} bytes "
                f"(stream starts {head!r})"
            )
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return body


# --------------------------------------------------------------------------- the worker


def _take_protocol_fds() -> tuple[int, int]:
    """Move stdin/stdout (the protocol pipes) to private fds; fd 0 reads ``/dev/null`` and
    fd 1 writes to stderr from now on. Returns ``(read_fd, write_fd)``."""
    read_fd, write_fd = os.dup(0), os.dup(1)  # dup'd fds are not inheritable
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    try:
        os.dup2(2, 1)
    except OSError:  # no stderr: plan prints go nowhere
        os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = sys.stderr  # print() unbuffered to the log, not a buffer of the old fd 1
    return read_fd, write_fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_requests(fd: int, requests: queue.Queue[Any]) -> None:
    """Reader thread: queue the node's requests; exit the process when the node is gone."""
    decoder = FrameDecoder(MAX_REQUEST_BYTES)
    try:
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            decoder.feed(chunk)
            while (body := decoder.next_frame()) is not None:
                requests.put(unpack(body))
    except (OSError, ValueError) as exc:
        print(f"fedsm training worker: bad input from the node: {exc}", file=sys.stderr)
        _exit(2)
    _exit(0)  # the node closed its end (stopped or died): nothing to train for


def _exit(code: int) -> None:
    """Leave now, without the interpreter's (torch's) slow teardown; outputs are closed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _preload() -> None:
    """Pay torch's import once, before round 1; a failure resurfaces on the first task."""
    try:
        from fedsm.training.runner import warm_up

        warm_up()
    except Exception:  # noqa: BLE001 - resurfaces, with its message, on the first task
        pass


def _serve(request: dict[str, Any]) -> dict[str, Any]:
    """Run one train request and build its reply (the plan's errors become error replies)."""
    from fedsm.node.executor import TrainingTask, error_code_for, run_task

    try:
        outcome = run_task(TrainingTask(**request["task"]))
        reply = {
            "kind": "ok",
            "params_sha256": outcome.params_sha256,
            "sample_size": outcome.sample_size,
            "metrics": outcome.metrics,
            "extras": outcome.extras,
        }
        if outcome.params_bytes is not None:
            if len(outcome.params_bytes) > MAX_PARAMS_IN_FRAME:
                raise ValueError(
                    f"the trained parameters ({len(outcome.params_bytes)} bytes) are larger "
                    f"than a worker may send back ({MAX_PARAMS_IN_FRAME} bytes)"
                )
            reply["params_bytes"] = outcome.params_bytes
        return reply
    except BaseException as exc:  # noqa: B036 - a plan's sys.exit() is a failure too
        if isinstance(exc, KeyboardInterrupt):
            raise
        tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return {"kind": "error", "code": int(error_code_for(exc)), "message": tail[-2000:]}


def main(argv: list[str] | None = None) -> int:
    """Serve train requests on stdin/stdout until told to stop or the node goes away."""
    args = sys.argv[1:] if argv is None else argv
    read_fd, write_fd = _take_protocol_fds()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's to handle
    if "--preload" in args:
        _preload()
    requests: queue.Queue[Any] = queue.Queue()
    threading.Thread(
        target=_read_requests, args=(read_fd, requests), name="fedsm-worker-input", daemon=True
    ).start()
    try:
        _write_all(write_fd, encode_frame({"kind": "ready", "pid": os.getpid()}))
        while True:
            request = requests.get()
            if not isinstance(request, dict) or request.get("kind") != "train":
                return 0  # "stop" (or anything unexpected): leave
            _write_all(write_fd, encode_frame(_serve(request)))
    except BrokenPipeError:  # the node stopped reading
        return 0


if __name__ == "__main__":
    _exit(main())
