"""fedsm beside a plain single-thread torch loop (and Flower, when installed): one table.

Every row trains the same workload (``tools/bench_common.py``: the demo plan's model, the
bundled breast-cancer rows cut into K shards of ``rows`` rows, the same training arguments and
FedAvg) and reports, each scenario run in a fresh process:

* ``round_ms``: the steady round (median of the rounds after the first; for the 10M model,
  whose every round is alike, the wall time of all rounds divided by their number);
* ``x_plain``: that time over the plain loop's, measured in the same run;
* ``orch_ms/node``: (round time - the plain loop's round time, which is pure training and
  FedAvg) / K: what the framework adds per node-round (negative when it trains in parallel);
* ``startup_s``: from nothing running to the first round's start (nodes started, search,
  plan and parameters uploaded, approval asked); ``round1_s``: the first round, which pays
  the warm-ups (torch's first training, worker processes, Flower's Ray actors);
* ``peak_mb``: peak RSS of the scenario's process tree (sampled every 250 ms);
* ``kb/node``: memory the nodes add, per node (RSS after the nodes started minus before,
  for in-process nodes; the node processes' RSS for the MQTT path).

Usage::

    python tools/bench_compare.py            # the full set (make bench)
    python tools/bench_compare.py --quick    # smaller sizes (make bench-quick)
    python tools/bench_compare.py --peers .venv-peers/bin/python   # + Flower's rows
    python tools/bench_compare.py --json out.json --only k10,k100

The memory rows run as the memory demo does: the researcher's log written to the OS at every
record but not fsynced (``durability="process"``), the repository and the nodes' registries
likewise (what dies with the process loses nothing; a crash of the machine may). The MQTT
row keeps every fsync, as the MQTT demo (``durability="always"``).

Nothing here asserts a speed; timings move by 10-20% between runs on a shared 2-core VM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: name -> (nodes, rounds, hidden units, rows per node, fedsm variants, with MQTT)
FULL = {
    "k10": (10, 5, 70, 57),
    "k100": (100, 3, 70, 57),
    "k1000": (1000, 3, 70, 57),
    "10m": (10, 2, 312_500, 57),
    "mqtt": (10, 5, 70, 57),
}
QUICK = {
    "k10": (10, 3, 70, 57),
    "k100": (100, 3, 70, 57),
    "10m": (10, 2, 31_250, 57),  # 1M parameters
    "mqtt": (2, 3, 70, 57),
}

# --------------------------------------------------------------------------- scenarios


def scenario_plain(args: argparse.Namespace) -> dict:
    from bench_common import RssSampler, run_plain, write_shards

    with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
        shards = write_shards(Path(tmp) / "data", args.nodes, args.rows)
        out = run_plain(shards, args.rounds, args.hidden)
    out["peak_mb"] = rss.peak_mb
    return out


def _experiment(root: Path, plan: Path, bus, repo, rounds: int, hidden: int, durability: str):
    from bench_common import TRAINING_ARGS

    from fedsm.researcher.experiment import Experiment

    return Experiment(
        tags=["breast-cancer"],
        training_plan_class="BreastCancerPlan",
        training_plan_path=plan,
        training_args=TRAINING_ARGS,
        model_args={"hidden": hidden},
        round_limit=rounds,
        run_dir=root / "run",
        bus=bus,
        repository=repo,
        progress=False,
        on_round=lambda s: None,
        search_deadline_s=60,
        discovery_s=0.0,  # the nodes are online already
        reply_deadline_s=1800,
        durability=durability,
    )


def _rounds(exp, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        exp.run_once()
        times.append(time.perf_counter() - start)
    return times


def scenario_fedsm(args: argparse.Namespace) -> dict:
    """Simulated nodes in this process on the memory bus (``workers``: training processes;
    ``hosts``: the nodes in that many host processes, :class:`fedsm.node.hosts.NodeHosts`)."""
    import torch  # noqa: F401 - imported before the baseline RSS: not the nodes' memory
    from bench_common import RssSampler, write_shards

    from fedsm.node.simulate import start_memory_nodes
    from fedsm.repository import LocalRepository
    from fedsm.training.demo_plan import BreastCancerPlan
    from fedsm.transport import MemoryBroker, MemoryBus

    with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
        root = Path(tmp)
        shards = write_shards(root / "data", args.nodes, args.rows)
        plan = root / "plan.py"
        BreastCancerPlan().save_code(plan)
        broker = MemoryBroker()
        repo = LocalRepository(root / "repository", durable=False)  # as the memory demo
        before = rss.sample()
        t0 = time.perf_counter()
        extra = {"workers": args.workers} if args.workers else {}
        if args.hosts:
            from fedsm.node.hosts import NodeHosts

            hosts = NodeHosts(
                root / "nodes", broker, repo.root, shards, hosts=args.hosts, approve=[plan]
            )
            nodes = [hosts]  # stopped below as the nodes are
        else:
            nodes = start_memory_nodes(
                root / "nodes", broker, repo, shards, approve=[plan], **extra
            )
        t1 = time.perf_counter()
        after = rss.sample()
        bus = MemoryBus(broker, "researcher-bench", role="researcher")
        exp = _experiment(root, plan, bus, repo, args.rounds, args.hidden, "process")
        t2 = time.perf_counter()
        times = _rounds(exp, args.rounds)
        digest = exp.job.state.params_sha256
        exp.close()
        bus.close()
        for node in nodes:
            node.stop()
        broker.close()
        _close_simulation()
    return {
        "round_s": times,
        "startup_s": t2 - t0,
        "node_start_s": t1 - t0,
        "node_kb": (after - before) * 1024 / args.nodes,
        "peak_mb": rss.peak_mb,
        "digest": digest,
    }


def _close_simulation() -> None:
    """Stop the process-wide training pools the simulation may have started."""
    try:
        from fedsm.node.simulate import close_shared_executors
    except ImportError:
        return
    close_shared_executors()


def scenario_mqtt(args: argparse.Namespace) -> dict:
    """A private mosquitto, the HTTP repository server and K node processes (fedsm's demo
    world, ``fedsm.cli.demo.mqtt.mqtt_world``); the researcher in this process."""
    import psutil
    from bench_common import RssSampler, write_shards

    from fedsm.cli.demo.mqtt import mqtt_world
    from fedsm.cli.demo.run import DemoConfig
    from fedsm.training.demo_plan import BreastCancerPlan
    from fedsm.transport.mosquitto import dev_config, free_port, start_mosquitto

    with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
        root = Path(tmp)
        shards = write_shards(root / "data", args.nodes, args.rows)
        plan = root / "plan.py"
        BreastCancerPlan().save_code(plan)
        port = free_port()
        (root / "broker").mkdir()
        broker = start_mosquitto(
            root / "broker", port=port, config=dev_config(port, root / "broker")
        )
        try:
            config = DemoConfig(
                nodes=args.nodes,
                rounds=args.rounds,
                transport="mqtt",
                broker=f"mqtt://127.0.0.1:{port}",
                reply_deadline_s=600.0,
            )
            files = {"nodes": shards, "plan": plan}
            t0 = time.perf_counter()
            with mqtt_world(root, config, files, say=lambda s: None) as (bus, repo):
                exp = _experiment(root, plan, bus, repo, args.rounds, args.hidden, "always")
                t1 = time.perf_counter()
                times = _rounds(exp, args.rounds)
                digest = exp.job.state.params_sha256
                me = psutil.Process()
                node_rss = 0
                for child in me.children(recursive=True):
                    try:
                        if "node" in " ".join(child.cmdline()[:6]) or child.parent().pid != me.pid:
                            node_rss += child.memory_info().rss
                    except psutil.Error:
                        pass
                exp.close()
        finally:
            broker.stop()
    return {
        "round_s": times,
        "startup_s": t1 - t0,
        "node_kb": node_rss / 1024 / args.nodes,
        "peak_mb": rss.peak_mb,
        "digest": digest,
    }


SCENARIOS = {"plain": scenario_plain, "fedsm": scenario_fedsm, "mqtt": scenario_mqtt}


# --------------------------------------------------------------------------- the driver


def run_child(python: str, script: Path, argv: list[str], timeout_s: float) -> dict | str:
    """Run one scenario in a fresh process; its last stdout line is its JSON."""
    try:
        proc = subprocess.run(
            [python, str(script), *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=HERE.parent,
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"failed (exit {proc.returncode}): {' | '.join(tail)}"
    return json.loads(lines[-1])


def row(label: str, work: str, k: int, out: dict, plain: dict | None, wall: bool) -> dict:
    times = out["round_s"]
    round_s = (sum(times) / len(times)) if wall else _steady(times)
    rec = {"work": work, "system": label, "nodes": k, "round_ms": round_s * 1e3}
    if plain is not None:
        p = (sum(plain["round_s"]) / len(plain["round_s"])) if wall else _steady(plain["round_s"])
        rec["x_plain"] = round_s / p
        rec["orch_ms_per_node_round"] = (round_s - p) * 1e3 / k
        rec["plain_round_ms"] = p * 1e3
    rec["first_round_ms"] = times[0] * 1e3
    for key in ("startup_s", "peak_mb", "node_kb", "digest", "final_loss", "note"):
        if key in out:
            rec[key] = out[key]
    return rec


def _steady(times: list[float]) -> float:
    from bench_common import steady

    return steady(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes)")
    parser.add_argument("--only", default="", help="comma-separated: k10,k100,k1000,10m,mqtt")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--peers", default="", help="python of a virtualenv with flwr")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--run", choices=sorted(SCENARIOS), help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=70, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=57, help=argparse.SUPPRESS)
    parser.add_argument(
        "--worker-count", dest="workers_", type=int, default=0, help=argparse.SUPPRESS
    )
    parser.add_argument("--host-count", dest="hosts", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        args.workers = args.workers_
        print(json.dumps(SCENARIOS[args.run](args)), flush=True)
        return 0

    sizes = QUICK if args.quick else FULL
    only = [s for s in args.only.split(",") if s and s in sizes] or list(sizes)
    started = time.perf_counter()
    rows: list[dict] = []
    from bench_common import param_count

    for name in only:
        k, rounds, hidden, nrows = sizes[name]
        wall = name == "10m"
        work = f"K={k}, {rounds} rounds, {param_count(hidden):,} params"
        if name == "mqtt":
            work = f"MQTT+HTTP repo+{k} node procs, {rounds} rounds"
        base = ["--nodes", str(k), "--rounds", str(rounds), "--hidden", str(hidden)]
        base += ["--rows", str(nrows)]
        me = Path(__file__).resolve()
        limit = 900.0
        plain = run_child(sys.executable, me, ["--run", "plain", *base], limit)
        if isinstance(plain, str):
            print(f"{name}: plain loop {plain}", file=sys.stderr)
            plain = None
        else:
            rows.append(row("plain loop", work, k, plain, plain, wall))
        variants: list[tuple[str, list[str]]] = []
        if name == "mqtt":
            variants.append(("fedsm mqtt", ["--run", "mqtt"]))
        else:
            variants.append(("fedsm 1 core", ["--run", "fedsm"]))
            if args.workers > 1 and name != "k10":
                variants.append(
                    (
                        f"fedsm {args.workers} workers",
                        ["--run", "fedsm", "--worker-count", str(args.workers)],
                    )
                )
                variants.append(
                    (
                        f"fedsm {args.workers} node hosts",
                        ["--run", "fedsm", "--host-count", str(args.workers)],
                    )
                )
        for label, extra in variants:
            out = run_child(sys.executable, me, [*extra, *base], limit)
            if isinstance(out, str):
                rows.append({"work": work, "system": label, "nodes": k, "note": out})
            else:
                rows.append(row(label, work, k, out, plain, wall))
        if args.peers and name not in ("mqtt", "k1000"):
            flower = HERE / "peers" / "flower_run.py"
            out = run_child(args.peers, flower, base, limit)
            if isinstance(out, str):
                rows.append({"work": work, "system": "Flower", "nodes": k, "note": out})
            else:
                rows.append(
                    row(f"Flower {out.get('version', '')}".strip(), work, k, out, plain, wall)
                )
        print(
            f"... {name} done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True
        )

    print_table(rows)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    doc = {"meta": meta, "rows": rows}
    print(json.dumps(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def print_table(rows: list[dict]) -> None:
    def fmt(value: object, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    head = (
        f"{'work':<44} {'system':<18} {'round_ms':>9} {'x_plain':>8} {'orch_ms/node':>12} "
        f"{'startup_s':>9} {'round1_s':>8} {'peak_mb':>8} {'kb/node':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "round_ms" not in r:
            print(f"{r['work']:<44} {r['system']:<18} {r.get('note', '')}")
            continue
        orch = r.get("orch_ms_per_node_round") if r["system"] != "plain loop" else None
        print(
            f"{r['work']:<44} {r['system']:<18} {fmt(r['round_ms'], '9.1f')} "
            f"{fmt(r.get('x_plain'), '8.2f')} {fmt(orch, '12.2f')} "
            f"{fmt(r.get('startup_s'), '9.2f')} {fmt(r['first_round_ms'] / 1e3, '8.2f')} "
            f"{fmt(r.get('peak_mb'), '8.0f')} "
            f"{fmt(r.get('node_kb'), '8.0f')}"
        )
    digests = {r["work"]: set() for r in rows}
    for r in rows:
        if r.get("digest"):
            digests[r["work"]].add(r["digest"])
    for work, found in digests.items():
        if len(found) > 1:
            print(f"WARNING: {work}: fedsm runs ended on different params digests {sorted(found)}")


if __name__ == "__main__":
    sys.exit(main())
