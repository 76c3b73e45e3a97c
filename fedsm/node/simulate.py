"""Simulated nodes in one process, on a memory bus: the embedded default of the demo and Job.

:func:`start_memory_nodes` does what K operators would do with the command line (init a node
directory, register a CSV dataset, approve the plan) and starts the nodes. Re-running it on
the same base directory re-opens the existing nodes (a resumed run finds its nodes, their
datasets and their reply caches as they were). Each set-up step is checked by its outcome and
done only if missing, so a node directory left half-made by a killed run is completed; a
dataset registered at a path that no longer holds it (the run directory moved) is registered
again where the CSV is now.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Sequence
from pathlib import Path

from fedsm.errors import ConfigurationError
from fedsm.node.executor import InProcessTrainingExecutor, TrainingExecutor
from fedsm.node.node import Node
from fedsm.node.settings import SETTINGS_FILE, NodeSettings, init_node_dir, load_settings
from fedsm.repository.base import Repository
from fedsm.transport import MemoryBroker, MemoryBus

__all__ = [
    "close_shared_executors",
    "register_csv_dataset",
    "shared_executor",
    "shared_pool",
    "start_memory_nodes",
]

_SHARED: InProcessTrainingExecutor | None = None
#: Process-wide training pools by worker count (started on first use, closed at exit).
_POOLS: dict[int, TrainingExecutor] = {}
_POOLS_LOCK = threading.Lock()


def shared_executor() -> InProcessTrainingExecutor:
    """The process-wide executor simulated nodes share unless given one (never closed)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = InProcessTrainingExecutor()
    return _SHARED


def shared_pool(workers: int) -> TrainingExecutor:
    """The process-wide :class:`~fedsm.node.pool_executor.PoolTrainingExecutor` of
    ``workers`` worker processes, started on first use (its workers import torch once) and
    shared by every simulation of this process that asks for as many; closed at exit or by
    :func:`close_shared_executors`. The workers start in the background."""
    from fedsm.node.pool_executor import PoolTrainingExecutor

    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = PoolTrainingExecutor(workers)
            # The workers import torch while the nodes are set up; a training waits for its
            # worker to be ready (ProcessTrainingExecutor starts one at the latest then).
            threading.Thread(target=_start_quietly, args=(pool,), daemon=True).start()
            if not _POOLS:
                atexit.register(close_shared_executors)
            _POOLS[workers] = pool
        return pool


def _start_quietly(pool: TrainingExecutor) -> None:
    try:
        pool.start()
    except Exception:  # noqa: BLE001 - each training starts (and reports) its worker itself
        pass


def close_shared_executors() -> None:
    """Stop the worker processes of the shared pools (the next simulation starts new ones)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def register_csv_dataset(
    node: Node,
    path: str | Path,
    *,
    name: str,
    tags: Sequence[str],
    target: str,
    description: str = "",
    dataset_id: str | None = None,
) -> dict:
    """Describe a CSV file (checking it loads) and register it on ``node``; return the record."""
    from fedsm.training.datasets import describe_csv  # imports torch

    meta = describe_csv(path, target)
    return node.datasets.add(
        name=name,
        tags=tags,
        data_type="csv",
        path=path,
        target=target,
        shape=meta["shape"],
        dtypes=list(meta["dtypes"]),
        columns=list(meta["columns"]),
        sample_count=meta["sample_count"],
        description=description,
        dataset_id=dataset_id,
    )


def start_memory_nodes(
    base_dir: Path,
    broker: MemoryBroker,
    repository: Repository,
    datasets: Sequence[Path],
    *,
    tags: Sequence[str] = ("breast-cancer",),
    target: str = "target",
    approve: Sequence[Path] = (),
    executor: TrainingExecutor | None = None,
    workers: int = 0,
    node_ids: Sequence[str] | None = None,
) -> list[Node]:
    """Start one node per CSV in ``datasets`` (ids ``node-1`` .. ``node-K``) and return them.

    Each node lives in ``base_dir/node-k``, holds its CSV as dataset ``dataset-node-k`` and
    has every plan file in ``approve`` approved. The nodes share ``executor`` (default: one
    process-wide :class:`InProcessTrainingExecutor`), so they cost a registry each, not a
    process. Stop them with :meth:`Node.stop`; the caller closes an executor it passed.

    ``workers`` > 0 (and no ``executor``): the nodes train in a process-wide pool of that
    many worker processes (:func:`shared_pool`), so trainings use every core; the final
    parameters are bit-identical to a one-core run (trainings are pure functions of their
    tasks and aggregation goes in sorted node order).

    ``node_ids`` names the nodes instead (one per dataset): a share of a larger simulation
    (:mod:`fedsm.node.hosts` starts each share in a process of its own).
    """
    if node_ids is None:
        node_ids = [f"node-{k}" for k in range(1, len(datasets) + 1)]
    if len(node_ids) != len(datasets):
        raise ValueError(f"{len(node_ids)} node ids for {len(datasets)} datasets")
    if executor is None:
        executor = shared_pool(workers) if workers > 0 else shared_executor()
    sources = [Path(p).read_bytes() for p in approve]
    nodes: list[Node] = []
    try:
        for node_id, csv in zip(node_ids, datasets, strict=True):
            node_dir = Path(base_dir) / node_id
            settings = _open_or_init(node_dir, node_id)
            bus = MemoryBus(broker, settings.node_id, role="node")
            node = Node(
                node_dir,
                bus=bus,
                repository=repository,
                settings=settings,
                executor=executor,
                durable=False,
            )
            nodes.append(node)
            dataset_id = f"dataset-{settings.node_id}"
            ours = [d for d in node.datasets.list() if d["dataset_id"] == dataset_id]
            if ours and Path(ours[0]["path"]) != Path(csv).resolve():
                node.datasets.remove(dataset_id)  # moved: registered again below
                ours = []
            if not ours:
                register_csv_dataset(
                    node,
                    csv,
                    name=f"{tags[0] if tags else 'data'}-{node_id}",
                    tags=tags,
                    target=target,
                    dataset_id=dataset_id,
                )
            for path, source in zip(approve, sources, strict=True):
                if node.plans.status_of_source(source) != "approved":
                    node.plans.decide(
                        "approved", source=source, name=Path(path).name, by="simulation"
                    )
            node.start()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _open_or_init(node_dir: Path, node_id: str) -> NodeSettings:
    """The settings of the simulated node in ``node_dir``, initialising it if it is not yet
    (or if its ``node.toml`` is empty: a write cut short before the node ever ran)."""
    settings_path = node_dir / SETTINGS_FILE
    if settings_path.is_file() and not settings_path.read_bytes().strip():
        settings_path.unlink()
    if not settings_path.exists():
        return init_node_dir(node_dir, node_id)
    settings = load_settings(node_dir, env={})
    if settings.node_id != node_id:
        raise ConfigurationError(
            f"{settings_path} holds node {settings.node_id!r}, not {node_id!r}: "
            f"{node_dir} belongs to another set-up; give the nodes a directory of their own"
        )
    return settings
