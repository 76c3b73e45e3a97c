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
    p.add_argument("--nodes", type=int, help="number of nodes (default 3)")
    p.add_argument("--rounds", type=int, help="number of rounds (default 10)")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="run directory (default: a new runs/demo-<time> directory)",
    )
    p.add_argument("--transport", choices=("memory", "mqtt"), help="default memory")
    p.add_argument(
        "--broker", help="MQTT broker URL for --transport mqtt (default mqtt://127.0.0.1:1883)"
    )
    p.add_argument("--seed", type=int, help="default 0")
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--iid",
        dest="iid",
        action="store_const",
        const=True,
        help="split the data IID across nodes (default)",
    )
    split.add_argument(
        "--label-skew",
        dest="iid",
        action="store_const",
        const=False,
        help="give each node a skewed share of the labels",
    )
    p.add_argument(
        "--reply-deadline",
        dest="reply_deadline_s",
        type=float,
        help="seconds a round waits for replies (default 60)",
    )
    p.add_argument(
        "--aggregator",
        help="aggregation strategy: fedavg (default), fedprox, scaffold, fedadam, fedyogi, "
        "fedadagrad, fedmedian or fedtrimmedmean, with its default settings",
    )
    p.epilog = (
        "On an existing run directory the flags given override its stored settings; "
        "--nodes, --rounds, --seed, --iid/--label-skew and --aggregator can change only "
        "before its job has started."
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    from dataclasses import asdict, fields

    from fedsm.cli.demo.run import DemoConfig, run_demo

    if getattr(args, "aggregator", None):  # --aggregator FedProx names fedprox too
        args.aggregator = args.aggregator.strip().lower()
    names = [f.name for f in fields(DemoConfig)]
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    # Checked before anything is created: a bad value is one line and exit code 2.
    config = DemoConfig(**{**asdict(DemoConfig()), **given})
    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        result = run_demo(
            run_dir, config, say=lambda line: print(line, flush=True), given=set(given)
        )
    except KeyboardInterrupt:
        print(
            "fedsm: interrupted; resume with: fedsm demo --run-dir "
            + shlex.quote(str(Path(run_dir).resolve())),
            file=sys.stderr,
            flush=True,
        )
        return 130
    for line in result.lines():
        print(line, flush=True)
    return 0
