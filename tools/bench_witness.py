"""What witnessing costs: a node keeping the log heads it receives, against a round's time.

Usage: python tools/bench_witness.py [--nodes 10] [--rounds 5] [--heads 3000]

Witnessing adds no message to a round (the head rides on the train request) and one row per
request to each node's registry. This measures (1) the time a node spends recording a head,
on a durable registry (the node process default, fsync per write) and as the train path does
it (no fsync of its own: the reply cache write that follows syncs it), and (2) the steady
round time of an embedded run with K nodes, then prints the share of a node-round that the
recording takes. The last line is ``key=value`` pairs, for scripts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fedsm.data import breast_cancer_csv, partition_csv, split_holdout
from fedsm.node.database import NodeDatabase
from fedsm.node.simulate import start_memory_nodes
from fedsm.node.witness import WitnessStore
from fedsm.repository import LocalRepository
from fedsm.researcher.experiment import Experiment
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.transport import MemoryBroker, MemoryBus


def head_cost(root: Path, n: int, *, sync: bool) -> float:
    """Seconds per recorded head (distinct heads, as a run sends them)."""
    db = NodeDatabase(root / f"bench-{sync}.sqlite", durable=True)
    store = WitnessStore(db)
    store.record("job-warm", "r", {"seq": 0, "hash": "0" * 64}, "train", sync=sync)
    start = time.perf_counter()
    for seq in range(1, n + 1):
        store.record("job-1", "r", {"seq": seq, "hash": f"{seq:064x}"}, "train", sync=sync)
    return (time.perf_counter() - start) / n


def round_times(root: Path, k: int, rounds: int) -> list[float]:
    """Wall seconds of each round of an embedded run with ``k`` nodes."""
    train, _test = split_holdout(breast_cancer_csv(), root / "data", fraction=0.2, seed=0)
    csvs = partition_csv(train, k, root / "data", seed=0)
    plan = root / "plan.py"
    BreastCancerPlan().save_code(plan)
    broker = MemoryBroker()
    repository = LocalRepository(root / "repository")
    nodes = start_memory_nodes(root / "nodes", broker, repository, csvs, approve=[plan])
    bus = MemoryBus(broker, "researcher-bench", role="researcher")
    marks = [time.perf_counter()]
    try:
        exp = Experiment(
            tags=["breast-cancer"],
            training_plan_class="BreastCancerPlan",
            training_plan_path=plan,
            training_args={"lr": 0.5, "epochs": 1, "batch_size": 32},
            round_limit=rounds,
            run_dir=root / "run",
            bus=bus,
            repository=repository,
            progress=False,
            discovery_s=0.0,  # the nodes are in this process, online already
            on_round=lambda summary: marks.append(time.perf_counter()),
        )
        marks[0] = time.perf_counter()
        exp.run()
        exp.close()
    finally:
        bus.close()
        for node in nodes:
            node.stop()
        broker.close()
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        unsynced = head_cost(root, args.heads, sync=False)
        synced = head_cost(root, max(1, args.heads // 10), sync=True)
        times = round_times(root / "run", args.nodes, args.rounds)
    steady = statistics.median(times[1:] if len(times) > 1 else times)
    per_node_round = steady / args.nodes  # a round's time per node it trains
    share = unsynced / per_node_round
    print(f"head recorded, train path (no fsync of its own): {unsynced * 1e6:8.1f} us")
    print(f"head recorded, synced (job-end):                 {synced * 1e6:8.1f} us")
    print(f"steady round, {args.nodes} nodes:                     {steady * 1e3:8.1f} ms")
    print(f"round time per node-round:                       {per_node_round * 1e3:8.2f} ms")
    print(f"witnessing share of a node-round:                {share * 100:8.3f} %")
    print(
        f"head_us={unsynced * 1e6:.1f} head_synced_us={synced * 1e6:.1f} "
        f"round_ms={steady * 1e3:.1f} node_round_ms={per_node_round * 1e3:.2f} "
        f"witness_share_pct={share * 100:.3f}"
    )


if __name__ == "__main__":
    main()
