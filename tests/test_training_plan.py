"""TorchTrainingPlan: source saving/loading, params I/O, routines, and plan errors."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsm.training.datasets import DatasetError
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.loader import PlanImportError, load_plan_class
from fedsm.training.loaders import BatchLoader, DataManager
from fedsm.training.params import ParamsFileError, save_params
from fedsm.training.plan import PlanError, TorchTrainingPlan, TrainingError


class TinyPlan(TorchTrainingPlan):
    """A two-class linear classifier used by these tests."""

    def init_dependencies(self):
        return ["import torch.nn.functional as F"]

    def init_model(self, model_args):
        return nn.Linear(model_args.get("d", 2), 2)

    def training_step(self, data, target):
        return F.cross_entropy(self.model()(data), target.long())


class NeedsMissingImport(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(1, 1)

    def training_step(self, data, target):
        return torch.zeros(())

    marker = hashlib.sha256(b"x").hexdigest()  # uses hashlib, which the saved source lacks


class BadModel(TorchTrainingPlan):
    def init_model(self, model_args):
        return "not a module"


class BadDependency(TinyPlan):
    def init_dependencies(self):
        return ["import os; os.system('echo pwned')"]


def _dataset(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(n, 2, generator=gen)
    target = (data[:, 0] > 0).float()

    class DS:
        pass

    ds = DS()
    ds.data, ds.target = data, target
    return ds


def _plan(cls=TinyPlan, **args):
    plan = cls()
    plan.post_init({"d": 2}, {"lr": 0.5, "batch_size": 8, **args})
    return plan


def test_save_code_writes_self_contained_importable_source(tmp_path):
    plan = _plan()
    path = tmp_path / "plan.py"
    sha = plan.save_code(path)
    source = path.read_text()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "import torch.nn.functional as F" in source
    cls = load_plan_class(source, "TinyPlan")
    assert cls is not TinyPlan and issubclass(cls, TorchTrainingPlan)
    loaded = cls()
    loaded.post_init({"d": 2}, {"lr": 0.5})
    assert isinstance(loaded.model(), nn.Linear)
    # saving a loaded plan again reproduces the same bytes (the digest nodes approve)
    assert loaded.save_code(tmp_path / "again.py") == sha


def test_demo_plan_source_imports_on_its_own(tmp_path):
    sha = BreastCancerPlan().save_code(tmp_path / "demo.py")
    cls = load_plan_class((tmp_path / "demo.py").read_text(), "BreastCancerPlan")
    plan = cls()
    plan.post_init({}, cls.SUGGESTED_TRAINING_ARGS)
    assert sorted(plan.get_params()) == ["net.bias", "net.weight"]
    assert len(sha) == 64


def test_save_code_refuses_source_that_would_not_import(tmp_path):
    with pytest.raises(PlanError, match="does not import on its own"):
        NeedsMissingImport().save_code(tmp_path / "p.py")
    assert not (tmp_path / "p.py").exists()


def test_dependencies_must_be_plain_import_lines():
    with pytest.raises(PlanError, match="single 'import x'"):
        _plan(BadDependency)


def test_init_model_must_return_a_module():
    with pytest.raises(PlanError, match="expected a torch.nn.Module"):
        _plan(BadModel)


def test_model_before_post_init_is_a_clear_error():
    with pytest.raises(PlanError, match="post_init"):
        TinyPlan().model()


def test_load_plan_class_uses_fresh_namespaces_and_leaves_sys_path_alone():
    source = (
        "from fedsm.training.plan import TorchTrainingPlan\n"
        "COUNTER = []\n"
        "class P(TorchTrainingPlan):\n    pass\n"
    )
    path_before = list(sys.path)
    a = load_plan_class(source, "P")
    b = load_plan_class(source, "P")
    assert a is not b and a.__module__ != b.__module__
    assert sys.modules[a.__module__].COUNTER is not sys.modules[b.__module__].COUNTER
    assert sys.path == path_before


@pytest.mark.parametrize(
    ("source", "name", "match"),
    [
        ("def broken(:\n", "P", "does not compile"),
        ("raise RuntimeError('boom')\n", "P", "RuntimeError: boom"),
        ("import not_a_module_xyz\n", "P", "ModuleNotFoundError"),
        ("class Q:\n    pass\n", "P", r"defines no 'P'; classes found: \['Q'\]"),
        ("class P:\n    pass\n", "P", "not a TorchTrainingPlan subclass"),
        ("import sys\nsys.exit(3)\n", "P", "SystemExit"),
        ("x = 1\n", "not valid", "not a valid class name"),
    ],
)
def test_load_plan_class_errors_are_typed(source, name, match):
    with pytest.raises(PlanImportError, match=match):
        load_plan_class(source, name)


def test_save_and_load_params_round_trip(tmp_path):
    plan = _plan()
    other = _plan()
    with torch.no_grad():
        for p in other.model().parameters():
            p.add_(1.0)
    sha = other.save(tmp_path / "p.safetensors")
    loaded = plan.load(tmp_path / "p.safetensors")
    assert len(sha) == 64
    for name, value in other.get_params().items():
        assert torch.equal(plan.get_params()[name], value)
        assert torch.equal(loaded[name], value)


def test_load_refuses_params_of_another_model(tmp_path):
    save_params(tmp_path / "p", {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})
    with pytest.raises(ParamsFileError, match="shape"):
        _plan().load(tmp_path / "p")


def test_training_routine_counts_steps_and_learns():
    plan = _plan(epochs=20)
    train, test = plan_split(plan)
    before = plan.testing_routine(test)["loss"]
    losses = plan.training_routine(generator=torch.Generator().manual_seed(0))
    assert len(losses) == 20 * len(train)
    assert plan.testing_routine(test)["loss"] < before
    assert plan.testing_routine(test)["accuracy"] >= 0.9


def plan_split(plan):
    plan.dataset = _dataset()
    train, test = plan.training_data().split(0.25, seed=1)
    plan.training_data_loader, plan.testing_data_loader = train, test
    return train, test


def test_num_updates_and_dry_run_bound_the_steps():
    plan = _plan(num_updates=13)
    plan_split(plan)
    assert len(plan.training_routine()) == 13
    plan = _plan(epochs=5, dry_run=True)
    plan_split(plan)
    assert len(plan.training_routine()) == 1


def test_same_generator_seed_gives_identical_losses():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        plan = _plan(epochs=3)
        plan_split(plan)
        runs.append(plan.training_routine(generator=torch.Generator().manual_seed(5)))
    assert runs[0] == runs[1]


def test_diverging_loss_raises_training_error():
    plan = _plan(lr=1e30, epochs=50)
    ds = _dataset()
    ds.data = ds.data * 1e20
    plan.dataset = ds
    plan.training_data_loader, _ = plan.training_data().split(0.0)
    with pytest.raises(TrainingError, match="diverged"):
        plan.training_routine()


def test_routines_without_loaders_are_clear_errors():
    plan = _plan()
    with pytest.raises(TrainingError, match="no training data loader"):
        plan.training_routine()
    with pytest.raises(TrainingError, match="no testing data loader"):
        plan.testing_routine()
    with pytest.raises(DatasetError, match="sets plan.dataset"):
        plan.training_data()


def test_data_manager_split_is_seeded_disjoint_and_complete():
    manager = DataManager(_dataset(n=50), batch_size=7)
    train, test = manager.split(0.2, seed=3)
    again, again_test = manager.split(0.2, seed=3)
    other, _ = manager.split(0.2, seed=4)
    assert isinstance(train, BatchLoader) and test is not None and again_test is not None
    assert test.sample_count == 10 and train.sample_count == 40
    assert torch.equal(train.indices, again.indices) and torch.equal(
        test.indices, again_test.indices
    )
    assert not torch.equal(train.indices, other.indices)
    union = torch.cat([train.indices, test.indices]).sort().values
    assert torch.equal(union, torch.arange(50))
    assert len(train) == 6
    full, none = manager.split(0.0)
    assert none is None and full.sample_count == 50
    with pytest.raises(DatasetError, match="test_ratio"):
        manager.split(1.0)
