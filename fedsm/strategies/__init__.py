"""Aggregation strategies: what each node gets for a round and how replies become the next
global parameters. :mod:`fedsm.strategies.base` is the interface and the registry; each
other module is one strategy (importing this package registers them all)."""

from fedsm.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from fedsm.strategies.base import (
    AggregationError,
    MissingReplyData,
    Strategy,
    StrategyError,
    StrategyNotImportable,
    UnknownStrategy,
    register,
    registered,
    resolve,
)
from fedsm.strategies.fedavg import FedAvg
from fedsm.strategies.fedprox import FedProx
from fedsm.strategies.robust import FedMedian, FedTrimmedMean
from fedsm.strategies.scaffold import Scaffold

__all__ = [
    "AggregationError",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedMedian",
    "FedProx",
    "FedTrimmedMean",
    "FedYogi",
    "MissingReplyData",
    "Scaffold",
    "Strategy",
    "StrategyError",
    "StrategyNotImportable",
    "UnknownStrategy",
    "register",
    "registered",
    "resolve",
]
