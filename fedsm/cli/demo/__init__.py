"""``fedsm demo``: the main job on the bundled breast-cancer data (:mod:`fedsm.cli.demo.run`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="federated training on the bundled breast-cancer data across K nodes",
        description="Runs a federated experiment on the Wisconsin breast-cancer data split "
        "across K nodes, compares it with the centralised baseline, and prints the results. "
        "On a directory holding an unfinished run it resumes it; on a finished one it prints "
        "its results again.",
    )
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    p.add_argument("--rounds", type=int, default=10, help="number of rounds (default 10)")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run directory (default: a new runs/demo-<time> directory)",
    )
    p.add_argument("--transport", choices=("memory", "mqtt"), default="memory")
    p.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", help="MQTT broker URL for --transport mqtt"
    )
    p.add_argument("--seed", type=int, default=0)
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--iid",
        dest="iid",
        action="store_true",
        default=True,
        help="split the data IID across nodes (default)",
    )
    split.add_argument(
        "--label-skew",
        dest="iid",
        action="store_false",
        help="give each node a skewed share of the labels",
    )
    p.add_argument(
        "--reply-deadline", type=float, default=60.0, help="seconds a round waits for replies"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedsm.cli.demo.run import DemoConfig, run_demo

    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    config = DemoConfig(
        nodes=args.nodes,
        rounds=args.rounds,
        seed=args.seed,
        iid=args.iid,
        transport=args.transport,
        broker=args.broker,
        reply_deadline_s=args.reply_deadline,
    )
    result = run_demo(run_dir, config, say=lambda line: print(line, flush=True))
    for line in result.lines():
        print(line, flush=True)
    return 0
