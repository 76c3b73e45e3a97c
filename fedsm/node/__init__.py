"""The node: the hospital side, holding data that never leaves and deciding what may touch it.

* :class:`Node` answers a researcher's requests over a bus (:mod:`fedsm.node.node`);
* registries in sqlite: datasets and training-plan approvals (:mod:`fedsm.node.registry`),
  the reply cache (:mod:`fedsm.node.database`), the log heads researchers sent
  (:mod:`fedsm.node.witness`);
* settings from ``node.toml`` and ``FEDSM_*`` variables (:mod:`fedsm.node.settings`);
* executors that run trainings in a worker process or in-process
  (:mod:`fedsm.node.executor`, :mod:`fedsm.node.process_executor`);
* :func:`start_memory_nodes` for simulated nodes on a memory bus (:mod:`fedsm.node.simulate`),
  and :class:`NodeHosts` to serve them from several processes, one share each
  (:mod:`fedsm.node.hosts`);
* what ``fedsm node start`` adds to run as a service: the node-directory lock, the repository
  check and the bus watch (:mod:`fedsm.node.service`).

Names are imported lazily, so ``fedsm node plan list`` does not import torch or paho.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Node": "fedsm.node.node",
    "NodeSettings": "fedsm.node.settings",
    "load_settings": "fedsm.node.settings",
    "init_node_dir": "fedsm.node.settings",
    "NodeDatabase": "fedsm.node.database",
    "DatasetRegistry": "fedsm.node.registry",
    "ApprovalRegistry": "fedsm.node.registry",
    "ReplyCache": "fedsm.node.database",
    "PlanRecord": "fedsm.node.registry",
    "TrainingExecutor": "fedsm.node.executor",
    "InProcessTrainingExecutor": "fedsm.node.executor",
    "TrainingTask": "fedsm.node.executor",
    "TrainingOutcome": "fedsm.node.executor",
    "ProcessTrainingExecutor": "fedsm.node.process_executor",
    "NodeError": "fedsm.node.errors",
    "RequestFailed": "fedsm.node.errors",
    "start_memory_nodes": "fedsm.node.simulate",
    "NodeHosts": "fedsm.node.hosts",
    "NodeHostError": "fedsm.node.hosts",
    "WitnessStore": "fedsm.node.witness",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsm.node' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
