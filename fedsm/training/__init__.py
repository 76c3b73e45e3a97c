"""Training side of fedsm: plans, training args, params files, datasets and the node runner.

Names are exported lazily so that importing a light submodule (``fedsm.training.args``) does
not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TorchTrainingPlan": "fedsm.training.plan",
    "PlanError": "fedsm.training.plan",
    "TrainingError": "fedsm.training.plan",
    "TrainingArgs": "fedsm.training.args",
    "TrainingArgsError": "fedsm.training.args",
    "save_params": "fedsm.training.params",
    "load_params": "fedsm.training.params",
    "ParamsFileError": "fedsm.training.params",
    "DataManager": "fedsm.training.loaders",
    "BatchLoader": "fedsm.training.loaders",
    "CsvDataset": "fedsm.training.datasets",
    "TensorDataset": "fedsm.training.datasets",
    "DatasetError": "fedsm.training.datasets",
    "describe_csv": "fedsm.training.datasets",
    "describe_tensors": "fedsm.training.datasets",
    "load_dataset": "fedsm.training.datasets",
    "PlanImportError": "fedsm.training.loader",
    "load_plan_class": "fedsm.training.loader",
    "RoundResult": "fedsm.training.runner",
    "train_round": "fedsm.training.runner",
    "initial_params": "fedsm.training.runner",
    "evaluate": "fedsm.training.runner",
    "validate_round": "fedsm.training.runner",
    "MetricError": "fedsm.training.metrics",
    "compute_metric": "fedsm.training.metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsm.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
