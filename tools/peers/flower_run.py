"""Flower's rows of ``tools/bench_compare.py``: the same workload in a Flower simulation.

Run by the driver with the peers' python (``.venv-peers/bin/python``, where ``flwr[simulation]``
and torch are installed; fedsm is not): ``flwr.simulation.run_simulation`` with a ``ClientApp``
whose ``train`` is ``bench_common.train_node`` on the node's shard, and Flower's own
``FedAvg`` (``flwr.serverapp.strategy``, weighted by ``num-examples``) on the server. Round
times are taken between the strategy's ``evaluate_fn`` calls (one after each aggregation; the
first, before round 1, ends the start-up). Prints one JSON line, like the fedsm scenarios.

    .venv-peers/bin/python tools/peers/flower_run.py --nodes 10 --rounds 5 --hidden 70
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flwr  # noqa: E402
import torch  # noqa: E402
from bench_common import (  # noqa: E402
    Model,
    RssSampler,
    derive_seed,
    initial_state,
    load_shard,
    train_node,
    write_shards,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

_SHARDS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_MODELS: dict[int, Model] = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=70)
    parser.add_argument("--rows", type=int, default=57)
    args = parser.parse_args()
    t0 = time.perf_counter()
    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
        shards = write_shards(Path(tmp) / "data", args.nodes, args.rows)
        os.environ["FEDSM_BENCH_SHARDS"] = str(Path(tmp) / "data")
        client = ClientApp()

        @client.train()
        def train(msg: Message, context: Context) -> Message:
            torch.set_num_threads(1)  # as fedsm and the plain loop train
            pid = int(context.node_config["partition-id"])
            path = str(shards[pid])
            if path not in _SHARDS:
                _SHARDS[path] = load_shard(Path(path))
            x, y = _SHARDS[path]
            model = _MODELS.setdefault(args.hidden, Model(args.hidden))
            state = msg.content["arrays"].to_torch_state_dict()
            server_round = int(msg.content["config"]["server-round"])
            seed = derive_seed(0, server_round, f"node-{pid + 1}")
            new, n, loss = train_node(model, state, x, y, seed)
            content = RecordDict(
                {
                    "arrays": ArrayRecord(new),
                    "metrics": MetricRecord({"train_loss": loss, "num-examples": n}),
                }
            )
            return Message(content=content, reply_to=msg)

        server = ServerApp()

        @server.main()
        def run(grid: Grid, context: Context) -> None:
            strategy = FedAvg(
                fraction_train=1.0,
                fraction_evaluate=0.0,
                min_train_nodes=args.nodes,
                min_available_nodes=args.nodes,
            )

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                marks.append(time.perf_counter())
                return None

            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(initial_state(args.hidden)),
                num_rounds=args.rounds,
                train_config=ConfigRecord({"lr": 0.1}),
                evaluate_fn=evaluate,
            )

        run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=args.nodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    rounds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    print(
        json.dumps(
            {
                "round_s": rounds,
                "startup_s": marks[0] - t0 if marks else None,
                "peak_mb": rss.peak_mb,
                "version": flwr.__version__,
            }
        ),
        flush=True,
    )
    return 0 if len(rounds) == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
