"""Property-based testing of the fedsm protocol, for fedsm itself and for whoever writes their
own transport, repository, node or strategy (``pip install fedsm[testing]``: hypothesis and
pytest are optional dependencies of this package only).

- :mod:`fedsm.testing.strategies`: hypothesis strategies for every event and protocol message
  (valid ones, and near-valid ones a decoder must refuse) and for fault schedules.
- Contract suites, written once and run by fedsm against each of its own implementations; to
  test yours, subclass one, set ``__test__ = True`` and give the factory:
  :class:`BusContract` (:mod:`fedsm.testing.bus`), :class:`RepositoryContract`
  (:mod:`fedsm.testing.repository`), :class:`LogReaderContract` (:mod:`fedsm.testing.logreader`),
  :class:`StrategyContract` (:mod:`fedsm.testing.strategy`).
- :class:`JobProtocolMachine` (:mod:`fedsm.testing.machine`): the stateful model of a
  federation, usable with any bus and node factory.

Names are imported lazily, so ``import fedsm.testing`` costs nothing until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BusContract": "fedsm.testing.bus",
    "RepositoryContract": "fedsm.testing.repository",
    "LogReaderContract": "fedsm.testing.logreader",
    "StrategyContract": "fedsm.testing.strategy",
    "JobProtocolMachine": "fedsm.testing.machine",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsm.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
