"""fedsm: federated learning for medicine on an event-sourced, replayable Job lifecycle.

The public names are imported lazily so that ``import fedsm`` (and the light parts of the
CLI, such as ``fedsm replay``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Job": "fedsm.researcher.job",
    "Experiment": "fedsm.researcher.experiment",
    "LocalJob": "fedsm.training.localjob",
    "localJob": "fedsm.training.localjob",
    "TorchTrainingPlan": "fedsm.training.plan",
    "TrainingArgs": "fedsm.training.args",
    "FedAvg": "fedsm.strategies",
    "FedProx": "fedsm.strategies",
    "Scaffold": "fedsm.strategies",
    "FedAdam": "fedsm.strategies",
    "FedYogi": "fedsm.strategies",
    "FedAdagrad": "fedsm.strategies",
    "FedMedian": "fedsm.strategies",
    "FedTrimmedMean": "fedsm.strategies",
    "Strategy": "fedsm.strategies",
    "FederatedDataSet": "fedsm.researcher.requests",
    "Requests": "fedsm.researcher.requests",
    "FedsmError": "fedsm.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
