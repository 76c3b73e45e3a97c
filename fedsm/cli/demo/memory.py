"""The embedded world of the demo: K simulated nodes and the researcher on one memory bus."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsm.node.simulate import start_memory_nodes
from fedsm.repository import LocalRepository
from fedsm.transport import MemoryBroker, MemoryBus

if TYPE_CHECKING:
    from fedsm.cli.demo.run import DemoConfig

__all__ = ["memory_world", "RESEARCHER_ID"]

RESEARCHER_ID = "researcher-demo"


@contextmanager
def memory_world(
    run_dir: Path,
    config: DemoConfig,
    files: dict[str, Any],
    *,
    say: Callable[[str], None] = print,
) -> Iterator[tuple[MemoryBus, LocalRepository]]:
    """Start the nodes (re-opening their directories on a resume) and yield the researcher's
    bus and the local repository; stop everything on exit. (``say``: progress lines; the
    nodes of one process start at once, so there are none.)"""
    from fedsm.cli.demo.run import TAGS

    # Simulated nodes and researcher in one process: files need not survive a crash of the
    # machine, only of the process (see LocalRepository's durable=False).
    repository = LocalRepository(run_dir / "repository", durable=False)
    broker = MemoryBroker()
    nodes = start_memory_nodes(
        run_dir / "nodes",
        broker,
        repository,
        files["nodes"],
        tags=TAGS,
        target="target",
        approve=[files["plan"]],
    )
    bus = MemoryBus(broker, RESEARCHER_ID, role="researcher")
    try:
        yield bus, repository
    finally:
        bus.close()
        for node in nodes:
            node.stop()
