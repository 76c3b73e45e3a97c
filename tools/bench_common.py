"""The workload every row of ``tools/bench_compare.py`` runs: data, model, training, FedAvg.

Standalone on purpose (torch and the standard library only): the plain loop runs it in
fedsm's virtualenv, the Flower rows in their own (``.venv-peers``), and neither may depend on
the other's packages. The model is the demo plan's (``fedsm/training/demo_plan.py``): fixed
log/range scaling of the 30 breast-cancer features, then an MLP with ``hidden`` units; its
scaling constants are read from that file's source, so the two can not drift apart.

One node-round here is what a fedsm node's training does for the same request: load the
global parameters into the model, ``epochs`` passes of shuffled mini-batches (plain SGD,
mean binary cross-entropy on the logits), return the new parameters and the sample count.
FedAvg is the sample-weighted mean in sorted node order.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import os
import resource
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DATA_CSV = ROOT / "fedsm" / "data" / "breast_cancer.csv"
PLAN_FILE = ROOT / "fedsm" / "training" / "demo_plan.py"

#: Training arguments of every row (fedsm's names; the plain loop and Flower use the same).
TRAINING_ARGS = {"lr": 0.1, "epochs": 1, "batch_size": 32}


def feature_range() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``FEATURE_MIN`` and ``FEATURE_MAX`` of the demo plan, read from its source."""
    tree = ast.parse(PLAN_FILE.read_text())
    found: dict[str, tuple[float, ...]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in ("FEATURE_MIN", "FEATURE_MAX"):
                found[target.id] = tuple(ast.literal_eval(node.value))
    return found["FEATURE_MIN"], found["FEATURE_MAX"]


class Model(nn.Module):
    """The demo plan's model (``BreastCancerPlan.Model``), built the same way."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        low, high = feature_range()
        low_t = torch.log1p(torch.tensor(low, dtype=torch.float32))
        high_t = torch.log1p(torch.tensor(high, dtype=torch.float32))
        self.register_buffer("offset", low_t, persistent=False)
        self.register_buffer("span", high_t - low_t, persistent=False)
        n = len(low)
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Linear(n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 2.0 * (torch.log1p(torch.clamp(x, min=0.0)) - self.offset) / self.span - 1.0
        return self.net(z).squeeze(-1)


def param_count(hidden: int) -> int:
    """Parameters of the model with ``hidden`` units (30 features)."""
    return 32 * hidden + 1 if hidden > 0 else 31


def hidden_for(params: int) -> int:
    """The hidden width whose model has about ``params`` parameters."""
    return max(1, round((params - 1) / 32))


def read_rows() -> tuple[list[str], list[list[str]]]:
    with DATA_CSV.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


def write_shards(root: Path, k: int, rows: int) -> list[Path]:
    """``k`` CSV shards of ``rows`` rows each (the bundled rows reused round-robin), as
    ``tools/bench_scale.py`` writes them."""
    header, data = read_rows()
    root.mkdir(parents=True, exist_ok=True)
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


def load_shard(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data, target)`` tensors of one shard (float32 features, last column the target)."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        t = header.index("target")
        rows = [[float(v) for v in row] for row in reader]
    x = torch.tensor([[v for i, v in enumerate(r) if i != t] for r in rows], dtype=torch.float32)
    y = torch.tensor([r[t] for r in rows], dtype=torch.float32)
    return x, y


def derive_seed(job_seed: int, round_number: int, node_id: str, purpose: str = "train") -> int:
    """fedsm's seed derivation (``fedsm.core.seeds``), copied so Flower's venv needs no fedsm."""
    material = f"fedsm-seed\x00{int(job_seed)}\x00{int(round_number)}\x00{node_id}\x00{purpose}"
    digest = hashlib.sha256(material.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def initial_state(hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in Model(hidden).state_dict().items()}


def train_node(
    model: Model,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    args: dict = TRAINING_ARGS,
) -> tuple[dict[str, torch.Tensor], int, float]:
    """One node-round: load ``state``, train, return ``(new state, samples, last loss)``."""
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=args["lr"])
    gen = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    n, bs = len(x), args["batch_size"]
    for _ in range(args["epochs"]):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            chunk = order[start : start + bs]
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x[chunk]), y[chunk])
            loss.backward()
            opt.step()
            loss_value = loss.item()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, n, loss_value


def fedavg(results: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of the states, in the order given (sorted node ids)."""
    total = sum(n for _, n in results)
    out = {k: torch.zeros_like(v) for k, v in results[0][0].items()}
    for state, n in results:
        w = n / total
        for k, v in state.items():
            out[k].add_(v, alpha=w)
    return out


class RssSampler:
    """Peak of the summed RSS of this process and its descendants, sampled every ``every_s``
    (psutil if present, else /proc; reading /proc costs CPU, so not too often), plus this
    process's own ``ru_maxrss``."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.peak_mb = 0.0
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        try:
            import psutil

            me = psutil.Process()
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
        except ImportError:
            with open(f"/proc/{os.getpid()}/statm") as fh:
                total = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        mb = total / 2**20
        self.peak_mb = max(self.peak_mb, mb)
        return mb

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak_mb = max(self.peak_mb, own)


def steady(round_times: list[float]) -> float:
    """Median of the rounds after the first (the first pays warm-ups); the only round if one."""
    rest = sorted(round_times[1:] or round_times)
    mid = len(rest) // 2
    return rest[mid] if len(rest) % 2 else (rest[mid - 1] + rest[mid]) / 2


def run_plain(shards: list[Path], rounds: int, hidden: int, seed: int = 0) -> dict:
    """The single-thread plain torch loop: every node trains in turn, then FedAvg by hand."""
    torch.set_num_threads(1)  # fedsm trains with one intra-op thread (determinism)
    data = [load_shard(p) for p in shards]
    node_ids = sorted(f"node-{k}" for k in range(1, len(shards) + 1))
    by_id = {f"node-{k}": data[k - 1] for k in range(1, len(shards) + 1)}
    t0 = time.perf_counter()
    state = initial_state(hidden, seed)
    model = Model(hidden)
    startup = time.perf_counter() - t0
    round_times, train_times, losses = [], [], []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        results = []
        last = []
        for node in node_ids:
            x, y = by_id[node]
            new, n, loss = train_node(model, state, x, y, derive_seed(seed, r, node))
            results.append((new, n))
            last.append(loss)
        trained = time.perf_counter()
        state = fedavg(results)
        round_times.append(time.perf_counter() - start)
        train_times.append(trained - start)
        losses.append(sum(last) / len(last))
    return {
        "round_s": round_times,
        "train_s": train_times,
        "startup_s": startup,
        "final_loss": losses[-1],
    }
