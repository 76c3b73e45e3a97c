"""Every built-in strategy keeps fedsm.testing.StrategyContract, is registered under its
name and is rebuilt from its configuration."""

from __future__ import annotations

import pytest

import fedsm.strategies as strategies
from fedsm.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedMean,
    FedYogi,
    Scaffold,
    registered,
    resolve,
)
from fedsm.strategies.base import strategy_name
from fedsm.testing import StrategyContract

BUILT_IN = {
    "fedavg": FedAvg(),
    "fedprox": FedProx(mu=0.1),
    "scaffold": Scaffold(server_lr=0.5),
    "fedadam": FedAdam(eta=0.5, tau=0.01),
    "fedyogi": FedYogi(),
    "fedadagrad": FedAdagrad(beta_1=0.5),
    "fedmedian": FedMedian(),
    "fedtrimmedmean": FedTrimmedMean(beta=0.25),
}


def test_every_built_in_is_registered_and_exported():
    assert set(registered()) == set(BUILT_IN)
    for name, strategy in BUILT_IN.items():
        assert strategy_name(strategy) == name
        assert getattr(strategies, type(strategy).__name__) is type(strategy)
        assert type(strategy).__name__ in strategies.__all__


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_resolve_rebuilds_each_from_its_config(name):
    strategy = BUILT_IN[name]
    assert resolve(name, strategy.config()) == strategy


class _BuiltIn(StrategyContract):
    name = ""
    max_examples = 10  # x 6 properties x 7 strategies; the deep profile runs them unbounded

    def make_strategy(self):
        return type(BUILT_IN[self.name]).from_config(BUILT_IN[self.name].config())


def _contract(name: str) -> type[StrategyContract]:
    cls = type(f"TestContract_{name}", (_BuiltIn,), {"__test__": True, "name": name})
    cls.__doc__ = f"{name} keeps the StrategyContract."
    return cls


TestContractFedProx = _contract("fedprox")
TestContractScaffold = _contract("scaffold")
TestContractFedAdam = _contract("fedadam")
TestContractFedYogi = _contract("fedyogi")
TestContractFedAdagrad = _contract("fedadagrad")
TestContractFedMedian = _contract("fedmedian")
TestContractFedTrimmedMean = _contract("fedtrimmedmean")
# FedAvg's run is TestFedAvgContract in test_aggregation.py.
