"""FedAdagrad, FedAdam, FedYogi against Reddi et al. 2021, Algorithm 2, on hand-computed
numbers (two rounds chained through the state), with Flower's defaults."""

from __future__ import annotations

import pytest
import torch

from fedsm.strategies import FedAdagrad, FedAdam, FedYogi, StrategyError, resolve
from fedsm.strategies.base import AggregateContext, NodeUpdate

F64 = torch.float64

# Round 1: x = [1, 2]; a sends [2, 0] (1 sample), b sends [3, 4] (3 samples):
# delta = (1 * [1, -2] + 3 * [2, 2]) / 4 = [1.75, 1].
# Round 2 (global chosen clean again, x = [1, 2]): both send [1.25, 2]: delta = [0.25, 0].
X = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
ROUND_1 = (
    NodeUpdate.of("a", {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(6)}, 1),
    NodeUpdate.of("b", {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(10)}, 3),
)
ROUND_2 = (
    NodeUpdate.of("a", {"w": torch.tensor([1.25, 2.0]), "n": torch.tensor(4)}, 1),
    NodeUpdate.of("b", {"w": torch.tensor([1.25, 2.0]), "n": torch.tensor(4)}, 3),
)


def two_rounds(strategy):
    first = strategy.aggregate(AggregateContext(1, X, ROUND_1, ("a", "b"), None))
    second = strategy.aggregate(AggregateContext(2, X, ROUND_2, ("a", "b"), first.state))
    return first, second


def check(result, m, v, w, n):
    assert set(result.state) == {"m/w", "v/w"}  # float parameters only
    assert result.state["m/w"].dtype == F64
    assert torch.equal(result.state["m/w"], torch.tensor(m, dtype=F64))
    assert torch.equal(result.state["v/w"], torch.tensor(v, dtype=F64))
    assert result.params["w"].dtype == torch.float32
    torch.testing.assert_close(result.params["w"], torch.tensor(w), rtol=0, atol=2e-7)
    # integer buffer: plain FedAvg (1 * 6 + 3 * 10) / 4 = 9, then 4
    assert result.params["n"].dtype == torch.int64 and int(result.params["n"]) == n


def test_fedadagrad_accumulates_squares():
    # eta=1, beta_1=0.5, tau=0.5: v0 = tau^2 = 0.25
    first, second = two_rounds(FedAdagrad(eta=1.0, beta_1=0.5, tau=0.5))
    # m = 0.5 * delta; v = 0.25 + delta^2; x + m / (sqrt(v) + 0.5)
    check(first, [0.875, 0.5], [3.3125, 1.25], [1.37715070637718, 2.3090169943749475], 9)
    check(second, [0.5625, 0.25], [3.375, 1.25], [1.240681115275729, 2.1545084971874737], 4)


def test_fedadagrad_default_is_flowers_no_momentum():
    strategy = FedAdagrad()
    assert strategy.config() == {"eta": 0.1, "beta_1": 0.0, "tau": 1e-9}
    first, _ = two_rounds(strategy)
    assert torch.equal(first.state["m/w"], torch.tensor([1.75, 1.0], dtype=F64))  # m = delta
    # v = 1e-18 + delta^2 (1e-18 is below float64's resolution at 3.0625 and 1)
    assert torch.equal(first.state["v/w"], torch.tensor([3.0625, 1.0], dtype=F64))
    torch.testing.assert_close(first.params["w"], torch.tensor([1.1, 2.1]), rtol=0, atol=2e-7)


def test_fedadam_moving_averages_without_bias_correction():
    first, second = two_rounds(FedAdam(eta=1.0, beta_1=0.5, beta_2=0.75, tau=0.5))
    # v = 0.75 * v + 0.25 * delta^2, from v0 = 0.25
    check(first, [0.875, 0.5], [0.953125, 0.4375], [1.5927055051410353, 2.4305008740430605], 9)
    check(second, [0.5625, 0.25], [0.73046875, 0.328125], [1.415228853500781, 2.233030277982336], 4)


def test_fedyogi_sign_rule_both_ways():
    first, second = two_rounds(FedYogi(eta=1.0, beta_1=0.5, beta_2=0.75, tau=0.5))
    # round 1: v0 = 0.25 < delta^2, so v grows: 0.25 + 0.25 * delta^2
    check(first, [0.875, 0.5], [1.015625, 0.5], [1.5803225354712214, 2.414213562373095], 9)
    # round 2: v > delta^2 = [0.0625, 0]: v - 0.25 * delta^2
    check(second, [0.5625, 0.25], [1.0, 0.5], [1.375, 2.2071067811865475], 4)


def test_defaults_are_flowers():
    assert FedAdam().config() == {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9}
    assert FedYogi().config() == {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"eta": 0.0},
        {"eta": -0.1},
        {"eta": float("inf")},
        {"tau": 0.0},
        {"tau": float("nan")},
        {"beta_1": 1.0},
        {"beta_1": -0.1},
        {"eta": "0.1"},
        {"eta": True},
    ],
)
def test_bad_hyper_parameters_are_refused(cls, kwargs):
    with pytest.raises(StrategyError):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
@pytest.mark.parametrize("beta_2", [1.0, -0.5, 1.5])
def test_bad_beta_2_is_refused(cls, beta_2):
    with pytest.raises(StrategyError, match="beta_2"):
        cls(beta_2=beta_2)


def test_fedadagrad_has_no_beta_2():
    with pytest.raises(StrategyError):
        resolve("fedadagrad", {"beta_2": 0.9})


@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        ("fedadagrad", FedAdagrad(eta=0.5, beta_1=0.3, tau=1e-3)),
        ("fedadam", FedAdam(eta=0.5, beta_1=0.3, beta_2=0.5, tau=1e-3)),
        ("fedyogi", FedYogi(eta=0.5, beta_1=0.3, beta_2=0.5, tau=1e-3)),
    ],
)
def test_resolve_rebuilds_the_same_strategy(name, strategy):
    assert resolve(name, strategy.config()) == strategy
    assert resolve(name, strategy.config()) != resolve(name, {})


def test_a_state_that_does_not_fit_the_model_is_refused():
    first, _ = two_rounds(FedAdam())
    other = {"w": torch.zeros(3), "n": torch.tensor(4)}
    ctx = AggregateContext(2, other, ROUND_2, ("a", "b"), first.state)
    with pytest.raises(StrategyError, match="shape"):
        FedAdam().aggregate(ctx)
    with pytest.raises(StrategyError, match="missing"):
        FedAdam().aggregate(AggregateContext(2, X, ROUND_2, ("a", "b"), {"m/w": torch.zeros(2)}))
