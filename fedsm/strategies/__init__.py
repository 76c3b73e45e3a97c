"""Aggregation strategies: what each node gets for a round and how replies become the next
global parameters. :mod:`fedsm.strategies.base` is the interface and the registry; each
other module is one strategy (importing this package registers them all)."""

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

__all__ = [
    "AggregationError",
    "FedAvg",
    "MissingReplyData",
    "Strategy",
    "StrategyError",
    "StrategyNotImportable",
    "UnknownStrategy",
    "register",
    "registered",
    "resolve",
]
