"""A node host process: a share of a simulation's nodes, bridged to the simulating process.

Started by :class:`fedsm.node.hosts.NodeHosts` as ``python -P -m fedsm.node.host_main``. Its
stdin and stdout are the protocol's pipes: frames of msgpack (a 4-byte length prefix, then
the body; :func:`~fedsm.node.worker_main.encode_frame`), never pickle.

* simulating process -> host: first ``{"kind": "start", ...}`` (where the nodes live, their
  ids and datasets, the repository's root, the plans to approve), then ``{"kind": "msg",
  "to": [role, id], "data": bytes}`` (an encoded protocol message, as off a wire) or
  ``{"kind": "stop"}``.
* host -> simulating process: ``{"kind": "ready", "pid": n, "nodes": [ids]}`` once its nodes
  are started (or ``{"kind": "error", "message": text}`` and exit 1), then ``{"kind": "msg",
  "to": [role, id], "data": bytes}`` for every message its nodes send.

Its nodes are the simulation's ordinary nodes (:func:`~fedsm.node.simulate.start_memory_nodes`:
registries of their own, in-memory training, the run's ``LocalRepository(durable=False)``) on
a :class:`~fedsm.transport.memory.MemoryBroker` of this process whose messages for anyone else
go over the pipe. The host leaves when told to stop or when the simulating process goes away
(end of its input): a killed simulation takes its hosts with it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from fedsm.node.worker_main import (
    FrameDecoder,
    _exit,
    _take_protocol_fds,
    _write_all,
    encode_frame,
    read_frame,
)

__all__ = ["MAX_FRAME_BYTES", "main"]

#: Largest frame either side accepts (a protocol message is at most 256 KiB).
MAX_FRAME_BYTES = 1 << 20


class _Pipe:
    """The host's two pipe ends: frames in (one reader) and out (from any thread)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._decoder = FrameDecoder(MAX_FRAME_BYTES)
        self._write_lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        frame = encode_frame(obj)
        with self._write_lock:
            _write_all(self._write_fd, frame)

    def receive(self) -> Any:
        """The next frame's content, or None at the end of the input."""
        return read_frame(self._read_fd, self._decoder)


def _start(config: dict[str, Any], pipe: _Pipe) -> tuple[Any, list[Any]]:
    """Start the share of nodes ``config`` describes; return (broker, nodes)."""
    from fedsm.node.simulate import start_memory_nodes
    from fedsm.repository import LocalRepository
    from fedsm.transport import MemoryBroker

    def forward(key: tuple[str, str], data: bytes) -> None:
        try:
            pipe.send({"kind": "msg", "to": list(key), "data": data})
        except OSError:  # the simulating process is gone: the main loop ends too
            pass

    broker = MemoryBroker(forward_unknown=forward)
    repository = LocalRepository(Path(config["repository"]), durable=False)
    nodes = start_memory_nodes(
        Path(config["base_dir"]),
        broker,
        repository,
        [Path(p) for p in config["datasets"]],
        node_ids=list(config["node_ids"]),
        tags=list(config["tags"]),
        target=str(config["target"]),
        approve=[Path(p) for p in config["approve"]],
    )
    return broker, nodes


def main(argv: list[str] | None = None) -> int:
    """Serve one share of a simulation until told to stop or the simulating process ends."""
    del argv
    read_fd, write_fd = _take_protocol_fds()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the simulating process's
    pipe = _Pipe(read_fd, write_fd)
    nodes: list[Any] = []
    try:
        config = pipe.receive()
        if not isinstance(config, dict) or config.get("kind") != "start":
            return 2
        try:
            broker, nodes = _start(config, pipe)
        except Exception as exc:  # noqa: BLE001 - reported to the simulating process
            tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            pipe.send({"kind": "error", "message": tail[-2000:]})
            return 1
        pipe.send({"kind": "ready", "pid": os.getpid(), "nodes": [n.node_id for n in nodes]})
        while True:
            frame = pipe.receive()
            if not isinstance(frame, dict) or frame.get("kind") != "msg":
                return 0  # "stop", the end of the input, or anything unexpected: leave
            role, participant = frame["to"]
            broker.deliver_raw(str(role), str(participant), bytes(frame["data"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"fedsm node host: bad input from the simulation: {exc}", file=sys.stderr)
        return 2
    finally:
        for node in nodes:
            node.stop()


if __name__ == "__main__":
    _exit(main())
