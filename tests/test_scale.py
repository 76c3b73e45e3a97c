"""Scale: a real round over 1,000 in-memory nodes, and plan imports that leave nothing behind.

The 1,000-node round goes through :class:`~fedsm.researcher.experiment.Experiment` exactly as a
researcher's script would (search, data check, approval check, round, aggregation); its
aggregate is checked against FedAvg recomputed here from the reply files on disk. The leak
tests count ``sys.modules`` and ``linecache`` entries around repeated plan imports and
trainings: a simulated node imports the plan every round, so anything an import leaves
behind grows with nodes x rounds.
"""

from __future__ import annotations

import csv
import linecache
import sys
import traceback
from pathlib import Path

import pytest
import torch

from fedsm.data import breast_cancer_csv
from fedsm.node.simulate import start_memory_nodes
from fedsm.repository import LocalRepository
from fedsm.researcher.experiment import Experiment
from fedsm.strategies.fedavg import fedavg
from fedsm.training.datasets import describe_csv
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.loader import (
    PlanImportError,
    load_plan_class,
    loaded_plan_class,
    unload_plan_class,
)
from fedsm.training.params import load_params
from fedsm.training.plan import TrainingError
from fedsm.training.runner import evaluate, initial_params, train_round
from fedsm.transport import MemoryBroker, MemoryBus

NODES = 1000
ARGS = {"lr": 0.5, "epochs": 1, "batch_size": 8}


def _write_shards(root: Path, rows: list[int]) -> list[Path]:
    """One CSV shard per entry of ``rows``, that many rows of the bundled data each."""
    with breast_cancer_csv().open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        data = list(reader)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, count in enumerate(rows):
        path = root / f"shard-{i:04d}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for j in range(count):
                writer.writerow(data[(i * 7 + j) % len(data)])
        paths.append(path)
    return paths


def _plan_modules() -> int:
    return sum(1 for name in sys.modules if name.startswith("fedsm_plan_"))


def _plan_lines() -> int:
    return sum(1 for name in list(linecache.cache) if str(name).startswith("<fedsm-plan>"))


def test_a_round_with_a_thousand_in_memory_nodes_is_fedavg_of_their_replies(tmp_path):
    rows = [2 + k % 3 for k in range(NODES)]  # 2..4 rows: unequal FedAvg weights
    shards = _write_shards(tmp_path / "data", rows)
    plan = tmp_path / "plan.py"
    BreastCancerPlan().save_code(plan)
    broker = MemoryBroker()
    repo = LocalRepository(tmp_path / "repository")
    nodes = start_memory_nodes(tmp_path / "nodes", broker, repo, shards, approve=[plan])
    bus = MemoryBus(broker, "researcher-scale", role="researcher")
    modules_before = _plan_modules()
    try:
        exp = Experiment(
            tags=["breast-cancer"],
            training_plan_class="BreastCancerPlan",
            training_plan_path=plan,
            training_args=ARGS,
            round_limit=1,
            run_dir=tmp_path / "run",
            bus=bus,
            repository=repo,
            progress=False,
            on_round=lambda summary: None,
            search_deadline_s=120,
            discovery_s=0.0,  # the nodes are in this process, online already
            reply_deadline_s=600,
            durability="batch",
        )
        try:
            final = exp.run()
            job = exp.job
            aggregated = job.state.aggregates[1]
            replies = job.training_replies[1]
            final_path = exp.final_params_path()
        finally:
            exp.close()
    finally:
        bus.close()
        for node in nodes:
            node.stop()
        broker.close()

    expected_ids = sorted(f"node-{k}" for k in range(1, NODES + 1))
    assert list(aggregated.nodes) == expected_ids
    assert sorted(replies) == expected_ids
    # each node's weight is its row count (no test split in ARGS)
    assert {n: int(w) for n, w in aggregated.weights.items()} == {
        f"node-{k}": rows[k - 1] for k in range(1, NODES + 1)
    }
    updates = [
        (n, load_params(r["params_path"]), float(r["sample_size"])) for n, r in replies.items()
    ]
    # nodes trained on different rows: the replies are not all the same model
    assert len({r["params_sha256"] for r in replies.values()}) > NODES // 2
    aggregate = load_params(final_path)
    assert aggregated.params_sha256 == final
    expected = fedavg(updates)
    assert sorted(aggregate) == sorted(expected)
    for name in expected:
        assert torch.equal(aggregate[name], expected[name]), name
    # and against a plain float64 weighted mean, in another order (reversed)
    total = sum(w for _, _, w in updates)
    for name in expected:
        acc = torch.zeros_like(expected[name], dtype=torch.float64)
        for _, params, w in reversed(updates):
            acc += params[name].to(torch.float64) * w
        assert torch.allclose(aggregate[name].to(torch.float64), acc / total, atol=1e-6), name
    # 1,000 trainings left no plan module behind
    assert _plan_modules() == modules_before


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leak")
    source = BreastCancerPlan().source()
    shard = _write_shards(tmp / "data", [6])[0]
    record = describe_csv(shard, "target")
    init = tmp / "init.safetensors"
    initial_params(
        plan_source=source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=ARGS,
        seed=3,
        out_path=init,
    )
    return tmp, source, record, init


def test_loaded_plan_class_unloads_and_load_plan_class_can_be_unloaded(world):
    _, source, _, _ = world
    modules, lines = _plan_modules(), _plan_lines()
    for _ in range(20):
        with loaded_plan_class(source, "BreastCancerPlan") as cls:
            # registered while in use: the module and its source are reachable by name
            assert sys.modules[cls.__module__].__dict__["BreastCancerPlan"] is cls
            assert _plan_lines() == lines + 1
    assert (_plan_modules(), _plan_lines()) == (modules, lines)
    classes = [load_plan_class(source, "BreastCancerPlan") for _ in range(5)]
    assert _plan_modules() == modules + 5
    for cls in classes:
        unload_plan_class(cls)
        unload_plan_class(cls)  # idempotent
    assert (_plan_modules(), _plan_lines()) == (modules, lines)
    # an unloaded class still works for whoever holds it
    plan = classes[0]()
    plan.post_init({}, ARGS)
    assert sorted(plan.get_params()) == ["net.bias", "net.weight"]


def test_repeated_trainings_do_not_grow_sys_modules_or_linecache(world):
    tmp, source, record, init = world
    modules_before = set(sys.modules)
    lines = _plan_lines()
    shas = set()
    for k in range(25):
        result = train_round(
            plan_source=source,
            plan_class="BreastCancerPlan",
            model_args={},
            training_args=ARGS,
            params_path=init,
            dataset=record,
            seed=9,
            out_path=tmp / f"out-{k}.safetensors",
        )
        shas.add(result.params_sha256)
        evaluate(
            plan_source=source,
            plan_class="BreastCancerPlan",
            model_args={},
            training_args=ARGS,
            params_path=init,
            dataset=record,
        )
    assert len(shas) == 1  # unloading changes nothing to determinism
    assert set(sys.modules) - modules_before == set()
    assert _plan_lines() == lines


def test_failed_imports_leave_nothing_behind():
    modules, lines = _plan_modules(), _plan_lines()
    bad = [
        ("raise RuntimeError('at import')\n", "P"),
        ("from fedsm.training.plan import TorchTrainingPlan\n", "Missing"),
        ("class P:\n    pass\n", "P"),
    ]
    for source, name in bad * 3:
        with pytest.raises(PlanImportError):
            load_plan_class(source, name)
    assert (_plan_modules(), _plan_lines()) == (modules, lines)


def test_a_plan_traceback_shows_the_plan_lines_after_unloading(world):
    tmp, _, record, _ = world
    source = (
        "from fedsm.training.plan import TorchTrainingPlan\n"
        "from torch import nn\n"
        "class P(TorchTrainingPlan):\n"
        "    def init_model(self, model_args):\n"
        "        return nn.Linear(30, 1)\n"
        "    def training_step(self, data, target):\n"
        "        raise KeyError('marker-in-plan-' + str(len(target)))\n"
    )
    p_init = tmp / "p_init.safetensors"
    initial_params(
        plan_source=source,
        plan_class="P",
        model_args={},
        training_args=ARGS,
        seed=0,
        out_path=p_init,
    )
    modules = _plan_modules()
    with pytest.raises(TrainingError) as info:
        train_round(
            plan_source=source,
            plan_class="P",
            model_args={},
            training_args=ARGS,
            params_path=p_init,
            dataset=record,
            seed=1,
            out_path=tmp / "never",
        )
    assert _plan_modules() == modules  # unloaded although training failed
    text = "".join(traceback.format_exception(info.value))
    assert "raise KeyError('marker-in-plan-' + str(len(target)))" in text
    assert "<fedsm-plan>/" in text
