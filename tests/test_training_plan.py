"""TorchTrainingPlan: source saving/loading, params I/O, routines, and plan errors."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsm.training import metrics
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


# --------------------------------------------------------------------------- test metrics
# Hand-computed numbers. Binary: y_true [1,0,1,1,0,1], y_pred [1,0,0,1,1,0]: for label 1
# TP=2 FP=1 FN=2, so precision 2/3, recall 1/2, F1 2*2/(2*2+1+2) = 4/7, accuracy 3/6; for
# label 0 TP=1 FP=2 FN=1: precision 1/3, recall 1/2, F1 2/(2+2+1) = 0.4.
BIN_TRUE = [1, 0, 1, 1, 0, 1]
BIN_PRED = [1, 0, 0, 1, 1, 0]
BIN_LOGITS = [2.0, -1.0, -3.0, 1.0, 0.5, -2.0]  # > 0 gives BIN_PRED


def _t(values):
    return torch.tensor(values)


def test_binary_classification_metrics_by_hand():
    y, p = _t(BIN_TRUE), _t(BIN_PRED)
    assert metrics.accuracy(y, p) == pytest.approx(0.5)
    assert metrics.precision(y, p) == pytest.approx(2 / 3)
    assert metrics.recall(y, p) == pytest.approx(0.5)
    assert metrics.f1_score(y, p) == pytest.approx(4 / 7)
    assert metrics.precision(y, p, pos_label=0) == pytest.approx(1 / 3)
    assert metrics.recall(y, p, pos_label=0) == pytest.approx(0.5)
    assert metrics.f1_score(y, p, pos_label=0) == pytest.approx(0.4)
    # label 1 never predicted: precision is 0/0, zero_division decides; recall is 0/1
    y, p = _t([0, 0, 1]), _t([0, 0, 0])
    assert metrics.precision(y, p) == 0.0
    assert metrics.precision(y, p, zero_division=1.0) == 1.0
    assert metrics.recall(y, p, zero_division=1.0) == 0.0
    assert metrics.f1_score(y, p) == 0.0


def test_multiclass_classification_metrics_by_hand():
    # label 0: true {0,5} pred {0,6}: TP 1, P 1/2, R 1/2, F1 1/2 (support 2)
    # label 1: true {1,4} pred {4,5}: TP 1, P 1/2, R 1/2, F1 1/2 (support 2)
    # label 2: true {2,3,6} pred {1,2,3}: TP 2, P 2/3, R 2/3, F1 2/3 (support 3)
    y, p = _t([0, 1, 2, 2, 1, 0, 2]), _t([0, 2, 2, 2, 1, 1, 0])
    kw = {"n_classes": 3}
    assert metrics.accuracy(y, p) == pytest.approx(4 / 7)
    for fn in (metrics.precision, metrics.recall, metrics.f1_score):
        assert fn(y, p, **kw) == pytest.approx(4 / 7)  # default: weighted by support
        assert fn(y, p, average="weighted", **kw) == pytest.approx((1 + 1 + 2) / 7)
        assert fn(y, p, average="macro", **kw) == pytest.approx((1 / 2 + 1 / 2 + 2 / 3) / 3)
        assert fn(y, p, average="micro", **kw) == pytest.approx(4 / 7)  # = accuracy
    with pytest.raises(metrics.MetricError, match="needs two classes"):
        metrics.f1_score(y, p, average="binary", **kw)
    # label 1 is neither true nor predicted here: macro averages over labels 0 and 2 only
    y, p = _t([0, 0, 2]), _t([0, 2, 2])
    assert metrics.recall(y, p, average="macro", **kw) == pytest.approx((1 / 2 + 1) / 2)


def test_regression_metrics_by_hand():
    # y - y_pred = [-0.5, 0, 1, -1]: MSE 2.25/4, MAE 2.5/4; the residual has mean -0.125 and
    # variance 2.1875/4 = 0.546875, y has variance 1.25: EV = 1 - 0.546875/1.25 = 0.5625.
    y, p = _t([1.0, 2.0, 3.0, 4.0]), _t([1.5, 2.0, 2.0, 5.0])
    assert metrics.mean_square_error(y, p) == pytest.approx(0.5625)
    assert metrics.mean_absolute_error(y, p) == pytest.approx(0.625)
    assert metrics.explained_variance(y, p) == pytest.approx(0.5625)
    # a second, constant and exactly predicted column: MSE 0, EV 1 (force_finite)
    y2 = torch.stack([y, torch.zeros(4)], dim=1)
    p2 = torch.stack([p, torch.zeros(4)], dim=1)
    assert metrics.mean_square_error(y2, p2) == pytest.approx(0.5625 / 2)
    assert metrics.explained_variance(y2, p2) == pytest.approx((0.5625 + 1.0) / 2)
    weighted = metrics.explained_variance(y2, p2, multioutput="variance_weighted")
    assert weighted == pytest.approx(0.5625)
    # constant target: 1.0 when the residual is constant (EV ignores a bias), else 0.0
    assert metrics.explained_variance(torch.ones(3), torch.zeros(3)) == 1.0
    assert metrics.explained_variance(torch.ones(3), _t([0.0, 1.0, 2.0])) == 0.0


def test_compute_metric_reads_logits_like_the_default_accuracy():
    logits, y = _t(BIN_LOGITS).reshape(6, 1), _t(BIN_TRUE).float()
    assert metrics.compute_metric("f1_score", logits, y) == pytest.approx(4 / 7)
    assert metrics.compute_metric("recall", logits, y, {"pos_label": 0}) == pytest.approx(0.5)
    several = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    assert metrics.compute_metric("accuracy", several, _t([1, 0, 0])) == pytest.approx(2 / 3)
    one_hot = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert metrics.compute_metric("accuracy", several, one_hot) == pytest.approx(2 / 3)
    with pytest.raises(metrics.MetricError, match="whole-number class targets"):
        metrics.compute_metric("precision", logits, _t([0.5] * 6))
    with pytest.raises(metrics.MetricError, match=r"must lie in \[0, 2\)"):
        metrics.compute_metric("precision", logits, _t([3] * 6))


class IdentityPlan(TorchTrainingPlan):
    """output = x: the data are the logits (or, for regression, the predictions)."""

    def init_model(self, model_args):
        model = nn.Linear(1, 1)
        with torch.no_grad():
            model.weight.fill_(1.0)
            model.bias.zero_()
        return model

    def training_step(self, data, target):
        out = self.model()(data).squeeze(-1)
        if self.model_args().get("regression"):
            return F.mse_loss(out, target)
        return F.binary_cross_entropy_with_logits(out, target.float())


def _loader(data, target, batch_size=2):
    data = _t(data).float().reshape(-1, 1)
    target = _t(target).float()
    idx = torch.arange(len(target))
    return BatchLoader(data, target, idx, batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("spelling", ["F1_SCORE", "f1_score", "F1_Score"])
def test_testing_routine_adds_test_metric_over_all_batches(spelling):
    plan = IdentityPlan()
    plan.post_init({}, {"test_metric": spelling})
    result = plan.testing_routine(_loader(BIN_LOGITS, BIN_TRUE))
    assert set(result) == {"accuracy", "f1_score", "loss"}
    assert result["f1_score"] == pytest.approx(4 / 7)  # not the mean of per-batch F1s
    assert result["accuracy"] == pytest.approx(0.5)
    plan.post_init({}, {"test_metric": "PRECISION", "test_metric_args": {"pos_label": 0}})
    assert plan.testing_routine(_loader(BIN_LOGITS, BIN_TRUE))["precision"] == pytest.approx(1 / 3)
    plan.post_init({}, {"test_metric": "ACCURACY"})
    assert set(plan.testing_routine(_loader(BIN_LOGITS, BIN_TRUE))) == {"accuracy", "loss"}


def test_testing_routine_regression_metric():
    plan = IdentityPlan()
    plan.post_init({"regression": True}, {"test_metric": "Explained_Variance"})
    result = plan.testing_routine(_loader([1.5, 2.0, 2.0, 5.0], [1.0, 2.0, 3.0, 4.5], 3))
    # y - y_pred = [-0.5, 0, 1, -0.5]: residual mean 0 -> variance 1.5/4; y has mean 2.625
    # and variance (2.640625 + 0.390625 + 0.140625 + 3.515625)/4 = 6.6875/4
    assert result["explained_variance"] == pytest.approx(1 - 1.5 / 6.6875)
    assert result["loss"] == pytest.approx(1.5 / 4)  # the plan's MSE, sample-weighted
    plan.post_init({"regression": True}, {"test_metric": "MEAN_ABSOLUTE_ERROR"})
    result = plan.testing_routine(_loader([1.5, 2.0, 2.0, 5.0], [1.0, 2.0, 3.0, 4.5], 3))
    assert result["mean_absolute_error"] == pytest.approx(2.0 / 4)
    plan.post_init({"regression": True}, {"test_metric": "recall"})
    with pytest.raises(metrics.MetricError, match="whole-number"):
        plan.testing_routine(_loader([1.5, 2.0, 2.0, 5.0], [1.0, 2.0, 3.0, 4.5], 3))


class OwnMetricsPlan(IdentityPlan):
    def testing_step(self, data, target):
        return {"ACCURACY": 0.25, "Dice": 0.5, "loss": 1.0}


class ClashingMetricsPlan(IdentityPlan):
    def testing_step(self, data, target):
        return {"accuracy": 0.25, "Accuracy": 0.5}


def test_plan_defined_metrics_keep_their_names_and_seed_names_any_case():
    plan = OwnMetricsPlan()
    plan.post_init({}, {"test_metric": "f1_score"})  # ignored: the plan has its own step
    result = plan.testing_routine(_loader(BIN_LOGITS, BIN_TRUE))
    assert result == {"Dice": 0.5, "accuracy": 0.25, "loss": 1.0}
    clash = ClashingMetricsPlan()
    clash.post_init({}, {})
    with pytest.raises(TrainingError, match="returned the metric 'accuracy' twice"):
        clash.testing_routine(_loader(BIN_LOGITS, BIN_TRUE))
