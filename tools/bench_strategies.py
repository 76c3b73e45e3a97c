"""Accuracy of each strategy after the same number of rounds on non-IID (label-skewed) nodes.

Usage: python tools/bench_strategies.py [--nodes 3 5] [--rounds 3 10] [--strategies ...]

Runs the demo job (``fedsm demo``'s memory world: the bundled breast-cancer data, its
held-out test split, the demo plan) once per strategy, node count and round count, with
``--label-skew`` (each node a skewed share of the labels), and prints the federated model's
accuracy on the held-out test set, the centralised baseline's, and the wall time. Every run
has the same seed, data split and initial model: only the strategy differs. The last line is
JSON, for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.strategies import registered

DEFAULT = ("fedavg", "fedprox", "scaffold")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--rounds", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT), choices=registered())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsm-bench-strategies-") as tmp:
        for nodes in args.nodes:
            for rounds in args.rounds:
                for name in args.strategies:
                    config = DemoConfig(
                        nodes=nodes, rounds=rounds, seed=args.seed, iid=False, aggregator=name
                    )
                    start = time.perf_counter()
                    result = run_demo(
                        Path(tmp) / f"{name}-{nodes}-{rounds}", config, say=lambda _line: None
                    )
                    rows.append(
                        {
                            "strategy": name,
                            "nodes": nodes,
                            "rounds": rounds,
                            "accuracy": round(result.federated_accuracy, 4),
                            "centralised": round(result.local_accuracy, 4),
                            "seconds": round(time.perf_counter() - start, 1),
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{name:15} K={nodes:<3} rounds={rounds:<3} accuracy={r['accuracy']:.4f} "
                        f"(centralised {r['centralised']:.4f}) {r['seconds']:.1f} s",
                        flush=True,
                    )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
