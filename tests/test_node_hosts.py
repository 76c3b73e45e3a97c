"""Nodes served from host processes change where the nodes run, never what they produce.

* The same small job (5 nodes, unequal shards) run with its nodes in this process and in two
  host processes (:class:`fedsm.node.hosts.NodeHosts`) ends on the same final digest; its
  nodes are seen online while their host runs, offline once it is gone.
* A run interrupted after its first round and resumed with new hosts on the same
  directories ends on the uninterrupted digest.
* A simulating process killed with SIGKILL takes its hosts with it (each leaves at the end
  of its input); :meth:`NodeHosts.stop` stops every host by its PID.
* A host that cannot start its nodes (a missing CSV) is a :class:`NodeHostError` saying why,
  and leaves no process behind; a host fed garbage leaves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_perf_pool import NODES, ROUNDS, _shards, experiment

from fedsm.node.hosts import NodeHostError, NodeHosts
from fedsm.node.simulate import start_memory_nodes
from fedsm.node.worker_main import encode_frame
from fedsm.repository import LocalRepository
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.transport import MemoryBroker, MemoryBus


def _gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` has exited (or is a zombie nobody reaped) within ``within_s``."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _world(root: Path) -> tuple[list[Path], Path, MemoryBroker, LocalRepository]:
    existing = sorted((root / "data").glob("shard-*.csv"))
    shards = existing or _shards(root / "data")  # a resumed run finds its own
    plan = root / "plan.py"
    BreastCancerPlan().save_code(plan)
    return shards, plan, MemoryBroker(), LocalRepository(root / "repository", durable=False)


def _digest(root: Path, *, hosts: int, stop_after: int | None = None) -> str | None:
    shards, plan, broker, repo = _world(root)
    if hosts:
        started = NodeHosts(root / "nodes", broker, repo.root, shards, hosts=hosts, approve=[plan])
        stop = [started.stop]
    else:
        nodes = start_memory_nodes(root / "nodes", broker, repo, shards, approve=[plan])
        stop = [n.stop for n in nodes]
    bus = MemoryBus(broker, "researcher-hosts", role="researcher")
    try:
        if hosts:
            assert sorted(bus.online_nodes()) == sorted(f"node-{k}" for k in range(1, NODES + 1))
        exp = experiment(root, plan, bus, repo, ROUNDS)
        if stop_after is None:
            exp.run()
        else:
            for _ in range(stop_after):
                exp.run_once()
        digest = exp.job.state.params_sha256
        exp.close()
    finally:
        bus.close()
        for s in stop:
            s()
        broker.close()
    return digest


@pytest.fixture(scope="module")
def one_process_digest(tmp_path_factory: pytest.TempPathFactory) -> str:
    digest = _digest(tmp_path_factory.mktemp("one"), hosts=0)
    assert digest is not None
    return digest


def test_nodes_in_two_hosts_end_on_the_one_process_digest(
    tmp_path: Path, one_process_digest: str
) -> None:
    assert _digest(tmp_path, hosts=2) == one_process_digest


def test_a_run_resumed_with_new_hosts_ends_on_the_uninterrupted_digest(
    tmp_path: Path, one_process_digest: str
) -> None:
    first = _digest(tmp_path, hosts=2, stop_after=1)
    assert first is not None and first != one_process_digest  # one round of two
    assert _digest(tmp_path, hosts=2) == one_process_digest  # the same directories


def test_stop_ends_every_host_and_its_nodes_go_offline(tmp_path: Path) -> None:
    shards, plan, broker, repo = _world(tmp_path)
    hosts = NodeHosts(tmp_path / "nodes", broker, repo.root, shards, hosts=2, approve=[plan])
    bus = MemoryBus(broker, "researcher-hosts", role="researcher")
    try:
        pids = hosts.pids
        assert len(pids) == 2 and len(hosts.node_ids) == NODES
        assert len(bus.online_nodes()) == NODES
    finally:
        hosts.stop()
    assert all(_gone(pid, 10) for pid in pids)
    assert not bus.online_nodes() and len(bus.offline_nodes()) == NODES
    bus.close()


def test_a_host_that_cannot_start_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    shards, plan, broker, repo = _world(tmp_path)
    shards[3].unlink()
    with pytest.raises(NodeHostError, match="could not start its nodes.*shard-3"):
        NodeHosts(tmp_path / "nodes", broker, repo.root, shards, hosts=2, approve=[plan])
    mine = subprocess.run(
        ["pgrep", "-f", "-P", str(os.getpid()), "fedsm.node.host_main"],
        capture_output=True,
        text=True,
    )
    assert mine.stdout.strip() == ""


def test_a_host_fed_garbage_leaves() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "fedsm.node.host_main"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(encode_frame(["not", "a", "start"]) + b"\xff" * 9, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, (proc.returncode, err)


def test_a_killed_simulation_takes_its_hosts_with_it(tmp_path: Path) -> None:
    _world(tmp_path)  # the shards and plan, written here
    script = tmp_path / "simulate.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from pathlib import Path
            from fedsm.node.hosts import NodeHosts
            from fedsm.transport import MemoryBroker
            root = Path({str(tmp_path)!r})
            shards = sorted((root / "data").glob("shard-*.csv"))
            hosts = NodeHosts(root / "nodes", MemoryBroker(), root / "repository", shards,
                              hosts=2, approve=[root / "plan.py"])
            print(" ".join(map(str, hosts.pids)), flush=True)
            time.sleep(120)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        survivors = [pid for pid in pids if not _gone(pid, 20)]
        for pid in survivors:  # stopped by the test either way
            os.kill(pid, signal.SIGKILL)
        assert survivors == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
