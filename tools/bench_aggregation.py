"""Benchmark FedAvg: streaming from files vs one-shot in memory, time and peak extra memory.

Prints one line per (K nodes, model size). Numbers only; never fails for being slow.
Usage: python tools/bench_aggregation.py [--params 1000000] [--nodes 2 8 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fedsm.strategies.fedavg import FedAvg, fedavg
from fedsm.training.params import load_params, save_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=1_000_000, help="float32 values per model")
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 8, 32])
    ns = parser.parse_args()
    torch.set_num_threads(1)
    model_mb = ns.params * 4 / 2**20
    print(f"model: {ns.params} float32 values ({model_mb:.1f} MiB)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k in ns.nodes:
            items = []
            for i in range(k):
                gen = torch.Generator().manual_seed(i)
                path = root / f"n{i}.safetensors"
                save_params(path, {"w": torch.randn(ns.params, generator=gen)})
                items.append((f"node{i:03d}", path, float(100 + i)))
            t0 = time.perf_counter()
            FedAvg().aggregate_files(items, root / "agg.safetensors")
            t_stream = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = [(n, load_params(p), w) for n, p, w in items]
            fedavg(loaded)
            t_oneshot = time.perf_counter() - t0
            # arithmetic estimate, not a measurement: streaming holds the float64 sum
            # plus one update, one-shot holds all K updates
            stream_mb = model_mb * 2 + model_mb
            oneshot_mb = model_mb * 2 + model_mb * k
            print(
                f"K={k:3d}  streaming {t_stream:7.3f}s (~{stream_mb:7.1f} MiB live tensors, est.)  "
                f"one-shot {t_oneshot:7.3f}s (~{oneshot_mb:7.1f} MiB est.)  "
                f"ratio {t_oneshot / t_stream:5.2f}"
            )
            del loaded


if __name__ == "__main__":
    main()
