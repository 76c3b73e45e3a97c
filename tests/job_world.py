"""A small embedded federation for Job tests: real nodes on a memory bus, a local repository,
the demo plan and data. Also a silent node (answers search and status, never trains), the one
situation a real node cannot be made to produce on purpose."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsm.core.messages import (
    Message,
    SearchReply,
    SearchRequest,
    TrainingPlanStatusReply,
    TrainingPlanStatusRequest,
)
from fedsm.data import breast_cancer_csv, partition_csv, split_holdout
from fedsm.log.read import scan
from fedsm.node.simulate import start_memory_nodes
from fedsm.repository import LocalRepository
from fedsm.researcher.experiment import Experiment
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.transport import Faults, MemoryBroker, MemoryBus

TRAINING_ARGS = {"lr": 0.5, "epochs": 1, "batch_size": 32}


@dataclass
class World:
    root: Path
    broker: MemoryBroker
    repository: LocalRepository
    plan: Path
    csvs: list[Path]
    nodes: list = field(default_factory=list)
    extra: list = field(default_factory=list)

    def researcher(self, faults: Faults | None = None) -> MemoryBus:
        bus = MemoryBus(
            self.broker, "researcher-test", role="researcher", faults=faults or Faults()
        )
        self.extra.append(bus)
        return bus

    def close(self) -> None:
        for thing in self.extra:
            thing.close()
        for node in self.nodes:
            node.stop()
        self.broker.close()


def make_world(root: Path, k: int, *, faults: Faults | None = None) -> World:
    train, _test = split_holdout(breast_cancer_csv(), root / "data", fraction=0.2, seed=0)
    csvs = partition_csv(train, k, root / "data", seed=0)
    plan = root / "plan.py"
    BreastCancerPlan().save_code(plan)
    broker = MemoryBroker(faults=faults) if faults is not None else MemoryBroker()
    repository = LocalRepository(root / "repository")
    world = World(root, broker, repository, plan, list(csvs))
    world.nodes = start_memory_nodes(root / "nodes", broker, repository, csvs, approve=[plan])
    return world


class SilentNode:
    """Finds its dataset and approves every plan, but never answers a train request."""

    def __init__(self, world: World, node_id: str, like: dict) -> None:
        self.node_id = node_id
        self.bus = MemoryBus(world.broker, node_id, role="node", faults=Faults())
        self.like = dict(like, dataset_id=f"dataset-{node_id}")
        self.train_requests = 0
        self.bus.subscribe(self.handle)
        world.extra.append(self.bus)

    def handle(self, message: Message) -> None:
        head = dict(
            request_id=message.request_id, researcher_id=message.researcher_id, node_id=self.node_id
        )
        if isinstance(message, SearchRequest):
            self.bus.reply(SearchReply(**head, datasets=(self.like,)))
        elif isinstance(message, TrainingPlanStatusRequest):
            self.bus.reply(
                TrainingPlanStatusReply(
                    **head,
                    job_id=message.job_id,
                    training_plan_sha256=message.training_plan_sha256,
                    status="approved",
                    approval_required=True,
                )
            )
        elif message.command == "train":
            self.train_requests += 1


# --------------------------------------------------------------------------- Experiment helpers


def researcher_bus(world: World) -> MemoryBus:
    """The researcher's bus as a new process would connect it (the previous one is closed)."""
    for thing in world.extra:
        if isinstance(thing, MemoryBus) and thing.participant_id == "researcher-test":
            thing.close()
    return world.researcher()


def experiment(world: World, run_dir: Path, **kwargs: Any) -> Experiment:
    """An Experiment on ``world``'s nodes (the demo plan, quiet, no discovery wait: the nodes
    are in this process and online already); ``kwargs`` override the defaults."""
    settings: dict[str, Any] = {
        "tags": ["breast-cancer"],
        "training_plan_class": "BreastCancerPlan",
        "training_plan_path": world.plan,
        "training_args": TRAINING_ARGS,
        "search_deadline_s": 2.0,
        "discovery_s": 0.0,
        "progress": False,
        "on_round": lambda summary: None,
        **kwargs,
    }
    return Experiment(
        run_dir=run_dir, bus=researcher_bus(world), repository=world.repository, **settings
    )


def resume(world: World, run_dir: Path) -> Experiment:
    """``Experiment.resume`` of ``run_dir``, as a new researcher process would."""
    return Experiment.resume(
        run_dir,
        bus=researcher_bus(world),
        repository=world.repository,
        progress=False,
        on_round=lambda summary: None,
    )


def run_events(run_dir: Path) -> list:
    """The events of ``run_dir``'s job log."""
    return [r.event for r in scan(run_dir / "job.log").records]
