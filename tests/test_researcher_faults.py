"""The researcher under faults and attackers (issue 15): request ids nobody can predict, a
transient error that asks the node again instead of failing it, and a node restarted
mid-round that gets its request again (same id)."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
import sys
import time
from pathlib import Path

from test_job_bad_replies import Scripted

from fedsm.core.collect import train_request_id
from fedsm.core.messages import ErrorReply
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.digests import sha256_hex
from fedsm.researcher.job import Job
from fedsm.researcher.requests import Requests
from fedsm.testing.machine import ScriptedNode
from fedsm.training.params import load_params
from fedsm.transport import MemoryBus


def _names(events) -> list[str]:
    return [type(e).__name__ for e in events]


def _reply_good(world: Scripted, node_id: str, samples: int = 10) -> None:
    good = load_params(world.job.params_path(world.job.params_sha256))
    up = world.upload({k: v + 1 for k, v in good.items()})
    world.reply(node_id, url=up["file"], sha256=up["sha256"], samples=samples)


def test_request_ids_are_keyed_by_a_secret_beside_the_log_not_in_it(tmp_path: Path) -> None:
    world = Scripted(tmp_path)
    key_file = tmp_path / "run" / "job.key"
    key = key_file.read_bytes()
    assert len(key) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    sent = {n: node.requests[1].request_id for n, node in world.nodes.items()}
    job_id = world.job.state.job_id
    for node_id, request_id in sent.items():
        # the old, guessable formula (a hash of job, round and node) no longer names it
        guess = "train-" + sha256_hex(f"{job_id}\x00{1}\x00{node_id}")[:32]
        assert request_id != guess
        assert request_id == train_request_id(job_id, 1, node_id, key)
        assert train_request_id(job_id, 1, node_id, b"x" * 32) != request_id
    world.job.close()
    log_bytes = (tmp_path / "run" / "job.log").read_bytes()
    assert key not in log_bytes and key.hex() not in log_bytes.decode("latin-1")
    # A restore reads the same key: the requests it re-sends and decides have the same ids.
    for node in world.nodes.values():
        node.requests.clear()
    job = Job.restore(tmp_path / "run", reqs=Requests(world.researcher), repository=world.repo)
    job.step(max_wait_s=0.0)
    assert {n: node.requests[1].request_id for n, node in world.nodes.items()} == sent
    job.close()
    world.close()


def test_a_transient_error_asks_the_node_again_with_the_same_request(tmp_path: Path) -> None:
    world = Scripted(tmp_path)
    job = world.job
    first = world.nodes["node-a"].requests[1]
    world.nodes["node-a"].send(
        ErrorReply(
            request_id=first.request_id,
            researcher_id=first.researcher_id,
            node_id="node-a",
            code=int(ErrorNumber.NODE_IO_ERROR),
            message="disk full: no space left writing params_out.safetensors",
            job_id=first.job_id,
            round=1,
        )
    )
    job.step(max_wait_s=1.0)
    assert "node-a" in job.state.pending_nodes()  # not failed: it is asked again
    retry_at = job.state.round_retries["node-a"]
    assert retry_at > time.time() - 1.0
    world.nodes["node-a"].requests.clear()
    deadline = time.monotonic() + 10.0
    while 1 not in world.nodes["node-a"].requests and time.monotonic() < deadline:
        job.step(max_wait_s=0.2)
    again = world.nodes["node-a"].requests[1]
    assert again.request_id == first.request_id
    # the same request; only the log head it carries moved on
    assert dataclasses.replace(again, log_head=None) == dataclasses.replace(first, log_head=None)
    assert job.state.round_retries == {}
    for node_id in ("node-a", "node-b", "node-c"):
        _reply_good(world, node_id)
    job.step(max_wait_s=2.0)
    job.step()  # aggregate
    events = world.events()
    names = _names(events)
    assert "NodeFailed" not in names
    retrying = [e for e in events if type(e).__name__ == "NodeRetrying"]
    assert [(e.node_id, e.code) for e in retrying] == [("node-a", 901)]
    resent = [e for e in events if type(e).__name__ == "RoundResent"]
    assert [e.nodes for e in resent] == [("node-a",)]
    assert resent[0].deadline == next(e for e in events if type(e).__name__ == "RoundSent").deadline
    assert "Aggregated" in names, " ".join(names)
    assert next(e for e in events if type(e).__name__ == "Aggregated").nodes == (
        "node-a",
        "node-b",
        "node-c",
    )
    shown = subprocess.run(
        [sys.executable, "-m", "fedsm", "replay", str(tmp_path / "run"), "--round", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "node-a busy at" in shown.stdout and "[901]" in shown.stdout
    assert "re-sent at" in shown.stdout
    world.close()


def test_a_node_back_online_mid_round_gets_its_request_again(tmp_path: Path) -> None:
    world = Scripted(tmp_path)
    job = world.job
    first = world.nodes["node-b"].requests[1]
    # node-b's process dies with its request (QoS 1 acknowledged, lost with the process)...
    world.nodes["node-b"].bus.close()
    job.step(max_wait_s=0.3)
    # ... and comes back before the deadline, knowing nothing of the round.
    reborn = ScriptedNode(MemoryBus(world.broker, "node-b", role="node"), "node-b")
    world.nodes["node-b"] = reborn
    deadline = time.monotonic() + 10.0
    while 1 not in reborn.requests and time.monotonic() < deadline:
        job.step(max_wait_s=0.3)
    assert reborn.requests[1].request_id == first.request_id
    # Nodes that stayed online were not asked twice.
    for node_id in ("node-a", "node-b", "node-c"):
        _reply_good(world, node_id)
    job.step(max_wait_s=2.0)
    job.step()
    events = world.events()
    names = _names(events)
    resent = [e for e in events if type(e).__name__ == "RoundResent"]
    assert [e.nodes for e in resent] == [("node-b",)]
    assert "Aggregated" in names, " ".join(names)
    assert next(e for e in events if type(e).__name__ == "Aggregated").nodes == (
        "node-a",
        "node-b",
        "node-c",
    )
    world.close()


def test_a_flapping_node_is_sent_its_request_again_a_bounded_number_of_times() -> None:
    """A node whose status flaps (or is spoofed) online again and again gets its pending
    request again at most MAX_ONLINE_RESENDS times a round: the log does not grow without
    end."""
    from fedsm.core import lifecycle, policy
    from fedsm.core.events import RoundResent
    from fedsm.testing.strategies import job_run

    events = job_run(1, 3)
    sent_at = next(i for i, e in enumerate(events) if type(e).__name__ == "RoundSent")
    state = lifecycle.replay(events[: sent_at + 1])
    progress = policy.Progress(published_round=1, came_online=frozenset({"node-1"}))
    now = state.round_deadline - 10.0
    for _ in range(policy.MAX_ONLINE_RESENDS):
        decision = policy.decide(state, now, progress)
        resent = [e for e in decision.events if isinstance(e, RoundResent)]
        assert [e.nodes for e in resent] == [("node-1",)]
        assert resent[0].deadline == state.round_deadline  # the round's window is unchanged
        state = lifecycle.apply(state, resent[0])
    assert state.round_resends == {"node-1": policy.MAX_ONLINE_RESENDS}
    decision = policy.decide(state, now, progress)
    assert not decision.events
    assert [type(c).__name__ for c in decision.commands] == ["Collect"]
