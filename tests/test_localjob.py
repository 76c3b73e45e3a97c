"""LocalJob: centralised baseline on the demo data: accuracy, determinism, typed failures."""

from __future__ import annotations

import pytest
import torch

from fedsm.data import breast_cancer_csv, split_holdout
from fedsm.digests import sha256_file as file_sha256
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
