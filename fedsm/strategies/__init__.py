"""Aggregation strategies: what each node gets for a round and how replies become the next
global parameters. :mod:`fedsm.strategies.base` is the interface and the registry; each
other module is one strategy.

Importing this package imports every module in it, so a new strategy is one new file (a
``@register``-ed :class:`Strategy` subclass) plus its test: it is then known by name to
jobs, restores, audits and ``fedsm demo --aggregator``, and importable from here by its
class name.
"""

import importlib as _importlib
import pkgutil as _pkgutil
from typing import Any as _Any

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

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str) -> _Any:
    """A strategy added as a file in this package, by its class name."""
    for cls in registered().values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
