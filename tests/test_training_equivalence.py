"""FedAvg of one full-batch step per node == one full-batch step on the pooled data.

For a linear model with a mean-reduced loss, node i's step is ``w0 - lr * g_i`` with ``g_i``
the mean gradient over its ``n_i`` samples; the ``n_i``-weighted mean of those is
``w0 - lr * sum(n_i g_i) / N``, i.e. the centralised step. Run through the real node code
(``train_round`` on safetensors datasets) and the real aggregator (``FedAvg.aggregate_files``).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from fedsm.strategies.fedavg import FedAvg
from fedsm.training.datasets import describe_tensors
from fedsm.training.params import load_params
from fedsm.training.runner import initial_params, train_round

LINEAR_PLAN = """
from fedsm.training.plan import TorchTrainingPlan
import torch
from torch import nn


class LinearPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["d"], model_args["out"]).double()

    def training_step(self, data, target):
        return torch.mean((self.model()(data) - target) ** 2)
"""


@st.composite
def partitions(draw):
    d = draw(st.integers(min_value=1, max_value=4))
    out = draw(st.integers(min_value=1, max_value=2))
    sizes = draw(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=5))
    seed = draw(st.integers(min_value=0, max_value=2**31 - 1))
    lr = draw(st.sampled_from([0.01, 0.1, 0.3]))
    return d, out, sizes, seed, lr


@given(partitions())
def test_fedavg_of_full_batch_steps_equals_centralised_step(tmp_path_factory, case):
    d, out, sizes, seed, lr = case
    tmp = tmp_path_factory.mktemp("equiv")
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = torch.from_numpy(rng.normal(size=(n, d)))
    y = torch.from_numpy(rng.normal(size=(n, out)))
    model_args = {"d": d, "out": out}
    # full batch: one step over all of a node's samples, whatever its size
    args = {"lr": lr, "num_updates": 1, "batch_size": 1000}
    init = tmp / "init.safetensors"
    initial_params(
        plan_source=LINEAR_PLAN,
        plan_class="LinearPlan",
        model_args=model_args,
        training_args=args,
        seed=seed,
        out_path=init,
    )

    def run(name, rows):
        data_path = tmp / f"{name}.data.safetensors"
        save_file({"data": x[rows].contiguous(), "target": y[rows].contiguous()}, str(data_path))
        result = train_round(
            plan_source=LINEAR_PLAN,
            plan_class="LinearPlan",
            model_args=model_args,
            training_args=args,
            params_path=init,
            dataset=describe_tensors(data_path),
            seed=seed + 1,
            out_path=tmp / f"{name}.params.safetensors",
        )
        assert result.sample_size == len(rows) and len(result.losses) == 1
        return tmp / f"{name}.params.safetensors", result.sample_size

    items = []
    start = 0
    for i, size in enumerate(sizes):
        path, count = run(f"node{i}", list(range(start, start + size)))
        items.append((f"node{i}", path, count))
        start += size
    FedAvg().aggregate_files(items, tmp / "fedavg.safetensors")
    central_path, _ = run("central", list(range(n)))

    federated = load_params(tmp / "fedavg.safetensors")
    central = load_params(central_path)
    start_params = load_params(init)
    moved = False
    for name in central:
        torch.testing.assert_close(federated[name], central[name], rtol=0, atol=1e-6)
        moved = moved or not torch.equal(central[name], start_params[name])
    assert moved, "the step did not change the parameters: the test would prove nothing"
