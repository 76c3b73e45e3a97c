"""Training in a pool of worker processes changes where nodes train, never what they produce.

The same small job (5 nodes, 2 rounds, unequal shards) run with the one-core in-process
executor and with two worker processes (:func:`fedsm.node.simulate.start_memory_nodes`
``workers=2``) ends on the same final parameters digest, bit for bit; and the non-durable
local repository a simulation uses stores and serves the same bytes as the durable one.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedsm.data import breast_cancer_csv
from fedsm.node.simulate import close_shared_executors, start_memory_nodes
from fedsm.repository import LocalRepository
from fedsm.researcher.experiment import Experiment
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.transport import MemoryBroker, MemoryBus

NODES, ROUNDS = 5, 2


def _shards(root: Path) -> list[Path]:
    with breast_cancer_csv().open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        data = list(reader)
    root.mkdir(parents=True)
    paths = []
    for i in range(NODES):
        path = root / f"shard-{i}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(data[i * 40 : i * 40 + 20 + 7 * i])  # unequal FedAvg weights
        paths.append(path)
    return paths


def experiment(
    root: Path, plan: Path, bus: MemoryBus, repo: LocalRepository, rounds: int
) -> Experiment:
    """The small job these tests (and ``tests/test_node_hosts.py``) run."""
    return Experiment(
        tags=["breast-cancer"],
        training_plan_class="BreastCancerPlan",
        training_plan_path=plan,
        training_args={"lr": 0.3, "epochs": 2, "batch_size": 8},
        model_args={"hidden": 8},
        round_limit=rounds,
        run_dir=root / "run",
        bus=bus,
        repository=repo,
        progress=False,
        discovery_s=0.0,
        reply_deadline_s=600,
    )


def _final_digest(root: Path, workers: int) -> str:
    shards = _shards(root / "data")
    plan = root / "plan.py"
    BreastCancerPlan().save_code(plan)
    broker = MemoryBroker()
    repo = LocalRepository(root / "repository", durable=False)
    nodes = start_memory_nodes(
        root / "nodes", broker, repo, shards, approve=[plan], workers=workers
    )
    bus = MemoryBus(broker, "researcher-pool", role="researcher")
    try:
        exp = experiment(root, plan, bus, repo, ROUNDS)
        exp.run()
        state = exp.job.state
        assert state.round == ROUNDS and len(state.aggregates[ROUNDS].nodes) == NODES
        digest = state.params_sha256
        exp.close()
    finally:
        bus.close()
        for node in nodes:
            node.stop()
        broker.close()
    return digest


@pytest.mark.timeout(600)
def test_two_worker_processes_end_on_the_one_core_digest(tmp_path: Path) -> None:
    try:
        one_core = _final_digest(tmp_path / "one", workers=0)
        pooled = _final_digest(tmp_path / "pool", workers=2)
    finally:
        close_shared_executors()
    assert pooled == one_core


def test_a_non_durable_repository_keeps_the_same_bytes(tmp_path: Path) -> None:
    source = tmp_path / "file.bin"
    source.write_bytes(b"fedsm" * 1000)
    durable = LocalRepository(tmp_path / "durable")
    fast = LocalRepository(tmp_path / "fast", durable=False)
    a, b = durable.upload_file(source), fast.upload_file(source)
    assert a["sha256"] == b["sha256"] and a["size"] == b["size"]
    assert "durable=False" in repr(fast)
    _, got = fast.download_file(b["file"], tmp_path / "out.bin")
    assert got.read_bytes() == source.read_bytes()
    # A URL naming the root by another spelling is still this repository's.
    other = tmp_path / "link"
    other.symlink_to(tmp_path / "fast")
    assert fast.digest_of_url(f"{other.as_uri()}/{b['sha256']}") == b["sha256"]
