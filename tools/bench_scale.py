"""How a round scales with the number of in-memory nodes: wall time per phase, RSS per round.

Usage: python tools/bench_scale.py [--nodes 1000] [--rows 4] [--rounds 3] [--tracemalloc]

Every node holds a few rows of the bundled breast-cancer data (rows are reused across nodes),
trains the demo plan on them, and the researcher aggregates by streaming the K parameter
files in sorted order, so memory should grow with the replies' metadata, not with K models.

After each round it prints the current RSS, the peak RSS, the Python heap (tracemalloc, only
with ``--tracemalloc``: it slows the run down a lot), ``len(sys.modules)`` and the number of
live objects the garbage collector tracks: flat numbers across rounds mean no per-round leak;
a one-off jump in the first round is a plateau (allocator arenas, thread stacks, torch).
The last line is ``key=value`` pairs, for scripts.
"""

from __future__ import annotations

import argparse
import csv
import gc
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import psutil

from fedsm.data import breast_cancer_csv
from fedsm.node.simulate import start_memory_nodes
from fedsm.repository import LocalRepository
from fedsm.researcher.experiment import Experiment
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.transport import MemoryBroker, MemoryBus


def write_shards(root: Path, k: int, rows: int) -> list[Path]:
    """Write ``k`` CSV shards of ``rows`` rows each (bundled rows reused round-robin)."""
    with breast_cancer_csv().open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        data = list(reader)
    paths = []
    for i in range(k):
        path = root / f"shard-{i:05d}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for j in range(rows):
                writer.writerow(data[(i * rows + j) % len(data)])
        paths.append(path)
    return paths


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size of this process."""
    return psutil.Process().memory_info().rss / 2**20


def heap_mb() -> float:
    """Python heap traced by tracemalloc (nan when not tracing)."""
    return tracemalloc.get_traced_memory()[0] / 2**20 if tracemalloc.is_tracing() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the Python heap too (slow) and print the top growth sites",
    )
    parser.add_argument("--top", type=int, default=8, help="growth sites shown with --tracemalloc")
    args = parser.parse_args()
    if args.tracemalloc:
        tracemalloc.start(8)
    rows: list[tuple[str, float, float, float, float, int, int]] = []

    def sample(label: str, seconds: float) -> None:
        gc.collect()
        rows.append(
            (
                label,
                seconds,
                rss_mb(),
                peak_rss_mb(),
                heap_mb(),
                len(sys.modules),
                len(gc.get_objects()),
            )
        )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        (root / "data").mkdir()
        shards = write_shards(root / "data", args.nodes, args.rows)
        plan = root / "plan.py"
        BreastCancerPlan().save_code(plan)
        broker = MemoryBroker()
        repo = LocalRepository(root / "repository")
        t1 = time.perf_counter()
        sample("before nodes", t1 - t0)
        nodes = start_memory_nodes(root / "nodes", broker, repo, shards, approve=[plan])
        t2 = time.perf_counter()
        sample("nodes started", t2 - t1)
        bus = MemoryBus(broker, "researcher-bench", role="researcher")
        exp = Experiment(
            tags=["breast-cancer"],
            training_plan_class="BreastCancerPlan",
            training_plan_path=plan,
            training_args={"lr": 0.5, "epochs": 1, "batch_size": 32},
            round_limit=args.rounds,
            run_dir=root / "run",
            bus=bus,
            repository=repo,
            progress=False,
            on_round=lambda s: None,
            search_deadline_s=60,
            discovery_s=0.0,  # the nodes are in this process, online already
            reply_deadline_s=600,
            durability="batch",
        )
        t3 = time.perf_counter()
        sample("search + check + job", t3 - t2)
        snapshots = [tracemalloc.take_snapshot()] if args.tracemalloc else []
        round_times = []
        for r in range(1, args.rounds + 1):
            start = time.perf_counter()
            exp.run_once()
            round_times.append(time.perf_counter() - start)
            sample(f"after round {r}", round_times[-1])
            if args.tracemalloc:
                snapshots.append(tracemalloc.take_snapshot())
        aggregated = exp.job.state.aggregates[args.rounds]
        exp.close()
        bus.close()
        for node in nodes:
            node.stop()
        broker.close()

    print(
        f"{'phase':24}{'seconds':>9}{'rss_mb':>9}{'peak_mb':>9}{'heap_mb':>9}"
        f"{'modules':>9}{'gc_objects':>12}"
    )
    for label, sec, rss, peak, heap, mods, objs in rows:
        print(f"{label:24}{sec:9.2f}{rss:9.0f}{peak:9.0f}{heap:9.1f}{mods:9d}{objs:12d}")
    if len(snapshots) > 2:
        print(f"top Python heap growth from round 1 to round {args.rounds}:")
        for stat in snapshots[-1].compare_to(snapshots[1], "traceback")[: args.top]:
            print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks")
            for line in stat.traceback.format()[-4:]:
                print(f"      {line}")
    first, last = rows[3], rows[-1]
    per_round = (last[2] - first[2]) / max(1, args.rounds - 1)
    print(
        f"nodes={args.nodes} rounds={args.rounds} aggregated_from={len(aggregated.nodes)} "
        f"node_start_ms={(t2 - t1) / args.nodes * 1e3:.2f} "
        f"round_s={sum(round_times) / len(round_times):.2f} "
        f"rss_after_round1_mb={first[2]:.0f} rss_after_last_mb={last[2]:.0f} "
        f"rss_growth_per_round_mb={per_round:.1f} modules_growth={last[5] - first[5]} "
        f"peak_rss_mb={peak_rss_mb():.0f}"
    )


if __name__ == "__main__":
    main()
