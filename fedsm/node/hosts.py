"""A simulation's nodes in host processes: every core serves nodes, not only trainings.

:func:`~fedsm.node.simulate.start_memory_nodes` runs K nodes in the simulating process, so
everything a node does (decode, check, read the parameters, train, store, reply) shares one
interpreter lock with the researcher. :class:`NodeHosts` splits the K nodes into ``hosts``
shares, each served by a process of its own (:mod:`fedsm.node.host_main`), and bridges them
to a :class:`~fedsm.transport.memory.MemoryBroker` of this process: the researcher's bus
sees K ordinary nodes (online while their host runs), and each message crosses a pipe as
the encoded bytes it would be on a wire.

Nothing changes but where the work runs. The nodes are the same nodes (their directories,
registries and reply caches under ``base_dir``; the run's repository, opened by each host
as ``LocalRepository(root, durable=False)``), a training is a pure function of its request,
and the researcher aggregates in sorted node order: the final parameters are bit-identical
to a one-process run (``tests/test_node_hosts.py``). A killed simulation takes its hosts
with it (each leaves at the end of its input) and a resumed one starts new hosts on the same
directories. :meth:`NodeHosts.stop` stops every host by its PID, within a deadline.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsm.errors import FedsmError
from fedsm.node.host_main import MAX_FRAME_BYTES
from fedsm.node.process_executor import _worker_env
from fedsm.node.worker_main import FrameDecoder, encode_frame, read_frame
from fedsm.transport import MemoryBroker
from fedsm.transport.topics import NODE

__all__ = ["NodeHostError", "NodeHosts"]

log = logging.getLogger(__name__)

#: How long a write to a host may wait for room in its pipe before the host is taken for
#: hung (a healthy host reads its pipe all the time).
WRITE_TIMEOUT_S = 60.0


class NodeHostError(FedsmError):
    """A node host process could not start, or stopped answering."""


class _Host:
    """One host process and this process's ends of its pipes."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc = subprocess.Popen(
            [_python(), "-P", "-m", "fedsm.node.host_main"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the host's logs and tracebacks go where ours go
            close_fds=True,
            bufsize=0,
            env=_worker_env(),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._out = self.proc.stdin.fileno()
        self._in = self.proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self._decoder = FrameDecoder(MAX_FRAME_BYTES)
        self._write_lock = threading.Lock()
        self.detach: list[Callable[[], None]] = []
        self.node_ids: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, obj: dict[str, Any]) -> None:
        """Write one frame, waiting at most :data:`WRITE_TIMEOUT_S` for room in the pipe."""
        view = memoryview(encode_frame(obj))
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        with self._write_lock:
            while view:
                try:
                    view = view[os.write(self._out, view) :]
                    continue
                except BlockingIOError:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeHostError(
                        f"node host {self.pid} has not read its input for {WRITE_TIMEOUT_S:g} s"
                    )
                select.select([], [self._out], [], min(left, 1.0))

    def receive(self) -> Any:
        """The next frame's content (blocking; the host writes or ends), None at its end."""
        return read_frame(self._in, self._decoder)

    def kill(self, wait_s: float) -> None:
        """Close its input (it leaves), wait up to ``wait_s``, then kill it by PID."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        try:
            self.proc.stdout.close()  # type: ignore[union-attr]
        except OSError:
            pass


def _python() -> str:
    import sys

    return sys.executable


class NodeHosts:
    """``hosts`` processes serving K simulated nodes (ids ``node-1`` .. ``node-K``, one per
    CSV in ``datasets``, dealt round-robin), bridged to ``broker``.

    Parameters
    ----------
    base_dir, datasets, tags, target, approve
        As for :func:`~fedsm.node.simulate.start_memory_nodes` (node ``k`` lives in
        ``base_dir/node-k``).
    broker
        This process's broker; the researcher's bus is on it.
    repository_root
        The root of the run's :class:`~fedsm.repository.LocalRepository` (each host opens
        it with ``durable=False``, as the simulation does).
    hosts
        Host processes (the machine's cores is the natural number).
    start_timeout_s
        How long a host may take to start its nodes (it imports torch).
    """

    def __init__(
        self,
        base_dir: Path,
        broker: MemoryBroker,
        repository_root: Path,
        datasets: Sequence[Path],
        *,
        hosts: int,
        tags: Sequence[str] = ("breast-cancer",),
        target: str = "target",
        approve: Sequence[Path] = (),
        start_timeout_s: float = 120.0,
    ) -> None:
        if hosts < 1:
            raise ValueError(f"hosts must be >= 1, got {hosts}")
        self._broker = broker
        self._hosts: list[_Host] = []
        self._readers: list[threading.Thread] = []
        self._stopped = False
        ids = [f"node-{k}" for k in range(1, len(datasets) + 1)]
        shares = [list(range(i, len(ids), hosts)) for i in range(min(hosts, len(ids)))]
        try:
            for index, share in enumerate(shares):
                host = _Host(index)
                self._hosts.append(host)
                host.send(
                    {
                        "kind": "start",
                        "base_dir": str(Path(base_dir).absolute()),
                        "repository": str(Path(repository_root).absolute()),
                        "datasets": [str(Path(datasets[i]).absolute()) for i in share],
                        "node_ids": [ids[i] for i in share],
                        "tags": list(tags),
                        "target": target,
                        "approve": [str(Path(p).absolute()) for p in approve],
                    }
                )
            for host in self._hosts:
                self._wait_ready(host, start_timeout_s)
        except BaseException:
            self.stop()
            raise

    @property
    def pids(self) -> list[int]:
        """The host processes' PIDs."""
        return [h.pid for h in self._hosts]

    @property
    def node_ids(self) -> list[str]:
        """Every node served, in host order."""
        return [n for h in self._hosts for n in h.node_ids]

    def _wait_ready(self, host: _Host, timeout_s: float) -> None:
        ready: list[Any] = []
        reader = threading.Thread(target=lambda: ready.append(host.receive()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if reader.is_alive():
            raise NodeHostError(f"node host {host.pid} did not start within {timeout_s:g} s")
        frame = ready[0] if ready else None
        if not isinstance(frame, dict) or frame.get("kind") != "ready":
            detail = frame.get("message") if isinstance(frame, dict) else "it exited"
            raise NodeHostError(f"node host {host.pid} could not start its nodes: {detail}")
        host.node_ids = [str(n) for n in frame["nodes"]]
        for node_id in host.node_ids:
            host.detach.append(self._broker.attach_remote(NODE, node_id, _forwarder(host, node_id)))
        thread = threading.Thread(
            target=self._read, args=(host,), name=f"fedsm-host-{host.index}", daemon=True
        )
        thread.start()
        self._readers.append(thread)

    def _read(self, host: _Host) -> None:
        """Hand every message of ``host`` to the broker; when it ends, its nodes go offline."""
        try:
            while (frame := host.receive()) is not None:
                if isinstance(frame, dict) and frame.get("kind") == "msg":
                    role, participant = frame["to"]
                    self._broker.deliver_raw(str(role), str(participant), bytes(frame["data"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not self._stopped:
                log.warning("node host %s sent garbage (%s); its nodes go offline", host.pid, exc)
        finally:
            if not self._stopped:
                log.warning("node host %s ended; its nodes go offline", host.pid)
            for detach in host.detach:
                detach()

    def stop(self, wait_s: float = 10.0) -> None:
        """Stop every host (its input closes, it leaves; killed by PID past ``wait_s``)."""
        self._stopped = True
        for host in self._hosts:
            try:
                host.send({"kind": "stop"})
            except (OSError, NodeHostError):
                pass
        for host in self._hosts:
            host.kill(wait_s)
        for thread in self._readers:
            thread.join(timeout=wait_s)

    def __enter__(self) -> NodeHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _forwarder(host: _Host, node_id: str) -> Callable[[bytes], None]:
    def forward(data: bytes) -> None:
        try:
            host.send({"kind": "msg", "to": [NODE, node_id], "data": data})
        except (OSError, NodeHostError) as exc:
            log.warning("could not hand a message to node %s (host %s): %s", node_id, host.pid, exc)

    return forward
