"""LocalJob: centralised baseline on the demo data: accuracy, determinism, typed failures."""

from __future__ import annotations

import math

import pytest
import torch

from fedsm.data import breast_cancer_csv, split_holdout
from fedsm.digests import sha256_file as file_sha256
from fedsm.training.args import TrainingArgs
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.localjob import LocalJob, LocalJobError, localJob
from fedsm.training.params import load_params
from fedsm.training.plan import TorchTrainingPlan


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return split_holdout(breast_cancer_csv(), tmp_path_factory.mktemp("split"), 0.2, seed=0)


def test_localjob_reaches_093_on_heldout_20_percent_deterministically(split, tmp_path):
    train, test = split
    args = BreastCancerPlan.SUGGESTED_TRAINING_ARGS
    job = LocalJob(train, BreastCancerPlan, args, seed=0, out_dir=tmp_path / "a")
    params = job.run()
    metrics = job.evaluate(test)
    assert metrics["sample_count"] == 113
    assert metrics["accuracy"] >= 0.93, metrics
    assert job.params_sha256 == file_sha256(job.params_path)
    saved = load_params(job.params_path)
    assert all(torch.equal(saved[k], params[k]) for k in params)

    again = localJob(train, BreastCancerPlan, args, seed=0, out_dir=tmp_path / "b")
    again.run()
    assert again.params_sha256 == job.params_sha256
    assert again.params_path.read_bytes() == job.params_path.read_bytes()

    other = LocalJob(train, BreastCancerPlan, args, seed=1, out_dir=tmp_path / "c")
    other.run()
    assert other.params_sha256 != job.params_sha256


def test_localjob_reports_losses_and_mlp_variant(split, tmp_path):
    train, test = split
    job = LocalJob(
        train,
        BreastCancerPlan,
        {"lr": 0.1, "epochs": 20, "batch_size": 32},
        {"hidden": 8},
        seed=3,
        out_dir=tmp_path,
    )
    params = job.run()
    assert "net.0.weight" in params
    assert job.result is not None and len(job.result.losses) == 20 * 15
    assert job.result.losses[-1] < job.result.losses[0]
    assert job.evaluate(test)["accuracy"] >= 0.9


def test_localjob_default_out_dir_is_created(split):
    job = LocalJob(split[0], BreastCancerPlan, {"epochs": 1, "lr": 0.5}, seed=0)
    job.run()
    assert job.params_path is not None and job.params_path.exists()
    job.params_path.unlink()
    job.params_path.parent.rmdir()


def test_bad_arguments_raise_localjob_error(split):
    with pytest.raises(LocalJobError, match="invalid training args"):
        LocalJob(split[0], BreastCancerPlan, {"lr": -1})
    with pytest.raises(LocalJobError, match="TorchTrainingPlan subclass"):
        LocalJob(split[0], object, {})  # type: ignore[arg-type]


def test_failures_raise_instead_of_being_logged(tmp_path, split):
    with pytest.raises(LocalJobError, match="cannot open") as info:
        LocalJob(tmp_path / "missing.csv", BreastCancerPlan, {}, out_dir=tmp_path).run()
    assert info.value.__cause__ is not None

    class Exploding(TorchTrainingPlan):
        def init_model(self, model_args):
            return torch.nn.Linear(30, 1)

        def training_step(self, data, target):
            raise RuntimeError("kaput")

    with pytest.raises(LocalJobError, match="RuntimeError: kaput"):
        LocalJob(split[0], Exploding, {}, out_dir=tmp_path).run()
    with pytest.raises(LocalJobError, match="call run"):
        LocalJob(split[0], Exploding, {}).evaluate(split[1])


# --------------------------------------------------------------------------- the seed's API

SEED_ARGS = {"lr": 0.5, "epochs": 2, "batch_size": 32}
MY_PLAN = '''
from fedsm.training.demo_plan import BreastCancerPlan


class MyTrainingPlan(BreastCancerPlan):
    """The demo plan under the seed's default class name."""
'''


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "my_plan.py"
    path.write_text(MY_PLAN)
    return path


def test_seed_arguments_path_class_and_instance_train_the_same_bytes(split, plan_file, tmp_path):
    train = split[0]
    from_path = localJob(
        dataset_path=str(train),
        training_plan_class="MyTrainingPlan",
        training_plan_path=str(plan_file),
        training_args=SEED_ARGS,
        model_args={},
        out_dir=tmp_path / "path",
    )
    default_name = localJob(  # training_plan_class defaults to "MyTrainingPlan"
        dataset_path=train,
        training_plan_path=plan_file,
        training_args=SEED_ARGS,
        out_dir=tmp_path / "default",
    )
    from_class = localJob(
        dataset_path=train,
        training_plan_class=BreastCancerPlan,
        training_args=SEED_ARGS,
        out_dir=tmp_path / "class",
    )
    instance = BreastCancerPlan()
    from_instance = localJob(
        train, instance, None, SEED_ARGS, None, out_dir=tmp_path / "instance"
    )  # the seed's positional order
    assert type(from_path.training_plan).__name__ == "MyTrainingPlan"
    assert from_instance.training_plan is instance
    digests = set()
    for job in (from_path, default_name, from_class, from_instance):
        assert isinstance(job.training_plan, TorchTrainingPlan)
        assert isinstance(job.model, torch.nn.Module)  # built before training, as in the seed
        params = job.start_training()
        digests.add(job.params_sha256)
        # the job's plan is the trained one
        trained = job.model.state_dict()
        assert all(torch.equal(trained[k], params[k]) for k in params)
    assert len(digests) == 1
    assert from_instance.model is instance.model()


def test_model_before_training_is_the_seeded_initial_model(split):
    a = localJob(split[0], BreastCancerPlan, training_args=SEED_ARGS, seed=4)
    b = localJob(split[0], BreastCancerPlan, training_args=SEED_ARGS, seed=4)
    c = localJob(split[0], BreastCancerPlan, training_args=SEED_ARGS, seed=5)
    weight = a.model.state_dict()["net.weight"]
    assert torch.equal(weight, b.model.state_dict()["net.weight"])
    assert not torch.equal(weight, c.model.state_dict()["net.weight"])


def test_training_args_default_as_in_the_seed_and_have_a_setter(split, tmp_path):
    job = localJob(dataset_path=split[0], training_plan_class=BreastCancerPlan)
    assert isinstance(job.training_args, TrainingArgs)
    assert job.training_args.dict() == TrainingArgs().dict()  # every default
    job.out_dir = tmp_path / "a"
    job.start_training()
    n = job.result.sample_size if job.result is not None else 0
    assert n == 456 and len(job.result.losses) == math.ceil(n / 48)  # 1 epoch, batches of 48
    job.training_args = {"lr": 0.5, "epochs": 2, "batch_size": 100}
    assert job.training_args["batch_size"] == 100
    job.out_dir = tmp_path / "b"
    job.run()  # run() is kept
    assert len(job.result.losses) == 2 * math.ceil(n / 100)
    with pytest.raises(LocalJobError, match="invalid training args"):
        job.training_args = {"lr": 0}
    assert job.training_args["batch_size"] == 100  # unchanged by the refused value


def test_fedsm_positional_order_still_works(split, tmp_path):
    job = LocalJob(split[0], BreastCancerPlan, SEED_ARGS, model_args={"hidden": 4})
    assert job.training_args["epochs"] == 2 and job.model_args == {"hidden": 4}
    job = LocalJob(split[0], BreastCancerPlan, SEED_ARGS, {"hidden": 4})
    assert job.training_args["epochs"] == 2 and job.model_args == {"hidden": 4}
    with pytest.raises(LocalJobError, match="by name"):
        LocalJob(split[0], BreastCancerPlan, SEED_ARGS, {"hidden": 4}, {"hidden": 4})


def test_seed_argument_errors_raise_localjob_error(split, plan_file, tmp_path):
    with pytest.raises(LocalJobError, match="give training_plan_path"):
        localJob(dataset_path=split[0])  # "MyTrainingPlan" names a class in no file
    with pytest.raises(LocalJobError, match="cannot read training plan file"):
        localJob(split[0], "MyTrainingPlan", tmp_path / "nowhere.py")
    with pytest.raises(LocalJobError, match="cannot import class 'OtherPlan'") as info:
        localJob(split[0], "OtherPlan", plan_file)
    assert info.value.__cause__ is not None
    with pytest.raises(LocalJobError, match="must be the name of the class"):
        localJob(split[0], BreastCancerPlan, plan_file)
    with pytest.raises(LocalJobError, match="cannot build training plan"):
        localJob(split[0], BreastCancerPlan, model_args={"n_features": 3})
    with pytest.raises(LocalJobError, match="set dataset_path first"):
        localJob(training_plan_class=BreastCancerPlan).start_training()
