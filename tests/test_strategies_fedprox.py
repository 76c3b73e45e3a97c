"""FedProx: nodes get mu; aggregation is FedAvg's, and FedProx(mu=0) is FedAvg bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsm.strategies import FedAvg, FedProx, StrategyError, resolve
from fedsm.strategies.base import AggregateContext, NodeArgsContext, NodeUpdate, aggregate_files
from fedsm.training.params import save_params

X = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(0)}


def test_every_node_of_the_round_gets_mu():
    ctx = NodeArgsContext(3, ("a", "c"), ("a", "b", "c"), X, None)
    assert FedProx(mu=0.1).node_args(ctx) == {"a": {"fedprox_mu": 0.1}, "c": {"fedprox_mu": 0.1}}
    assert FedProx().node_args(ctx)["a"] == {"fedprox_mu": 0.01}  # Flower-like default


def test_aggregation_is_the_weighted_mean():
    updates = (
        NodeUpdate.of("a", {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(2)}, 1),
        NodeUpdate.of("b", {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(6)}, 3),
    )
    result = FedProx(mu=0.5).aggregate(AggregateContext(1, X, updates, ("a", "b"), None))
    # (1 * [1, 2] + 3 * [4, 8]) / 4; (2 + 18) / 4
    assert torch.equal(result.params["w"], torch.tensor([3.25, 6.5]))
    assert int(result.params["n"]) == 5
    assert result.state is None


@pytest.mark.parametrize("mu", [-0.01, -1, float("nan"), float("inf"), "0.1", None, True])
def test_bad_mu_is_refused(mu):
    with pytest.raises(StrategyError, match="mu"):
        FedProx(mu=mu)


def test_resolve_rebuilds_the_same_strategy():
    assert resolve("fedprox", FedProx(0.1).config()) == FedProx(0.1)
    assert FedProx(0.1).config() == {"mu": 0.1}
    assert FedProx(0.1) != FedProx(0.2) and FedProx(0.0) != FedAvg()


def test_mu_zero_takes_fedavgs_code_path():
    assert FedProx.aggregate is FedAvg.aggregate


@settings(max_examples=min(settings.default.max_examples, 30), deadline=None)
@given(
    st.lists(st.integers(0, 1000), min_size=1, max_size=5),
    st.integers(0, 2**31 - 1),
    st.randoms(use_true_random=False),
)
def test_mu_zero_is_fedavg_bit_for_bit(tmp_path_factory, weights, seed, rnd):
    """Random float32 values (not exact sums), replies in a random order."""
    if sum(weights) == 0:
        weights[0] = 1
    tmp = tmp_path_factory.mktemp("prox")
    gen = torch.Generator().manual_seed(seed)
    save_params(tmp / "x", {"w": torch.randn(5, 3, generator=gen), "s": torch.tensor(1)})
    replies = []
    for i, weight in enumerate(weights):
        path = tmp / f"n{i}"
        save_params(path, {"w": torch.randn(5, 3, generator=gen) * 10, "s": torch.tensor(i)})
        replies.append((f"node-{i}", path, float(weight), {}))
    rnd.shuffle(replies)

    def run(strategy, tag):
        return aggregate_files(
            strategy,
            round=1,
            global_params_path=tmp / "x",
            replies=replies,
            all_nodes=[r[0] for r in replies],
            state_path=None,
            out_path=tmp / tag,
            state_out_path=tmp / f"{tag}.state",
        )

    assert run(FedProx(mu=0), "prox") == run(FedAvg(), "avg")
    assert (tmp / "prox").read_bytes() == (tmp / "avg").read_bytes()
