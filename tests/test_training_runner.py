"""Node runner: deterministic rounds (in-process, threads, another process), metrics, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from fedsm.data import breast_cancer_csv, partition_csv
from fedsm.digests import sha256_file
from fedsm.training.datasets import DatasetError, describe_csv
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.plan import TrainingError
from fedsm.training.runner import (
    RoundResult,
    evaluate,
    initial_params,
    train_round,
    validate_round,
)

ARGS = {"lr": 0.5, "epochs": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runner")
    source = BreastCancerPlan().source()
    nodes = partition_csv(breast_cancer_csv(), 2, tmp / "parts", seed=1)
    init = tmp / "init.safetensors"
    initial_params(
        plan_source=source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=ARGS,
        seed=11,
        out_path=init,
    )
    return tmp, source, [describe_csv(p, "target") for p in nodes], init


def _round(setup, out_name, seed=5, args=ARGS, dataset_index=0):
    tmp, source, records, init = setup
    return train_round(
        plan_source=source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=args,
        params_path=init,
        dataset=records[dataset_index],
        seed=seed,
        out_path=tmp / out_name,
    )


def test_same_inputs_same_bytes_and_seed_matters(setup):
    tmp = setup[0]
    a = _round(setup, "a.safetensors")
    b = _round(setup, "b.safetensors")
    c = _round(setup, "c.safetensors", seed=6)
    assert isinstance(a, RoundResult)
    assert a == b
    assert (tmp / "a.safetensors").read_bytes() == (tmp / "b.safetensors").read_bytes()
    assert c.params_sha256 != a.params_sha256
    assert a.sample_size == setup[2][0]["sample_count"]
    assert a.metrics["train_loss"] == pytest.approx(sum(a.losses) / len(a.losses))


def test_concurrent_threads_give_the_sequential_bytes(setup):
    expected = _round(setup, "seq.safetensors").params_sha256
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = _round(setup, f"t{i}.safetensors", dataset_index=i % 2).params_sha256
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 6
    assert {results[i] for i in (0, 2, 4)} == {expected}
    assert len({results[i] for i in (1, 3, 5)}) == 1


def test_another_process_gives_the_same_bytes(setup):
    tmp, source, records, init = setup
    expected = _round(setup, "here.safetensors").params_sha256
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from fedsm.training.runner import train_round\n"
        "cfg = json.loads(sys.argv[1])\n"
        "r = train_round(plan_source=Path(cfg['src']).read_text(), plan_class='BreastCancerPlan',\n"
        "    model_args={}, training_args=cfg['args'], params_path=Path(cfg['init']),\n"
        "    dataset=cfg['record'], seed=5, out_path=Path(cfg['out']))\n"
        "print(r.params_sha256)\n"
    )
    (tmp / "plan_src.py").write_text(source)
    cfg = {
        "src": str(tmp / "plan_src.py"),
        "args": ARGS,
        "init": str(init),
        "record": records[0],
        "out": str(tmp / "there.safetensors"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_validation_metrics_and_train_sample_size(setup):
    args = {
        **ARGS,
        "test_ratio": 0.25,
        "test_on_local_updates": True,
        "test_on_global_updates": True,
    }
    result = _round(setup, "val.safetensors", args=args)
    total = setup[2][0]["sample_count"]
    assert result.sample_size == total - int(total * 0.25)
    for key in ("val_accuracy", "val_loss", "global_val_accuracy", "global_val_loss", "train_loss"):
        assert key in result.metrics
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    assert result.metrics["val_loss"] < result.metrics["global_val_loss"]


def test_random_seed_fixes_the_split_across_rounds(setup):
    args = {**ARGS, "test_ratio": 0.3, "test_on_local_updates": True, "random_seed": 9}
    a = _round(setup, "s1.safetensors", seed=1, args=args)
    b = _round(setup, "s2.safetensors", seed=2, args=args)
    assert a.sample_size == b.sample_size
    assert a.params_sha256 != b.params_sha256


def test_initial_params_are_seeded(setup):
    tmp, source, _, init = setup
    kwargs = {
        "plan_source": source,
        "plan_class": "BreastCancerPlan",
        "model_args": {},
        "training_args": ARGS,
    }
    again = initial_params(seed=11, out_path=tmp / "i2", **kwargs)
    other = initial_params(seed=12, out_path=tmp / "i3", **kwargs)
    assert (tmp / "i2").read_bytes() == init.read_bytes()
    assert other != again


def test_evaluate_reports_accuracy_loss_and_count(setup):
    tmp, source, records, _ = setup
    _round(setup, "trained.safetensors", args={**ARGS, "epochs": 20})
    metrics = evaluate(
        plan_source=source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=ARGS,
        params_path=tmp / "trained.safetensors",
        dataset=records[1],
    )
    assert metrics["sample_count"] == records[1]["sample_count"]
    assert metrics["accuracy"] > 0.9 and metrics["loss"] > 0


def test_plan_exceptions_become_training_errors(setup):
    tmp, _, records, _ = setup
    source = (
        "from fedsm.training.plan import TorchTrainingPlan\n"
        "from torch import nn\n"
        "class P(TorchTrainingPlan):\n"
        "    def init_model(self, model_args):\n"
        "        return nn.Linear(30, 1)\n"
        "    def training_step(self, data, target):\n"
        "        raise KeyError('oops')\n"
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
    with pytest.raises(TrainingError, match="KeyError"):
        train_round(
            plan_source=source,
            plan_class="P",
            model_args={},
            training_args=ARGS,
            params_path=p_init,
            dataset=records[0],
            seed=1,
            out_path=tmp / "never",
        )
    assert not (tmp / "never").exists()


def test_dataset_changed_since_registration_is_refused(setup):
    record = dict(setup[2][0])
    record["sample_count"] += 1
    tmp, source, _, init = setup
    with pytest.raises(DatasetError, match="re-register"):
        train_round(
            plan_source=source,
            plan_class="BreastCancerPlan",
            model_args={},
            training_args=ARGS,
            params_path=init,
            dataset=record,
            seed=1,
            out_path=tmp / "x",
        )


def _validate(setup, seed=5, args=ARGS, dataset_index=0):
    _, source, records, init = setup
    return validate_round(
        plan_source=source,
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=args,
        params_path=init,
        dataset=records[dataset_index],
        seed=seed,
    )


def test_validation_round_is_the_global_validation_of_a_training_round(setup):
    args = {**ARGS, "test_ratio": 0.25, "test_on_global_updates": True, "test_metric": "F1_SCORE"}
    trained = _round(setup, "with-global-val.safetensors", args=args)
    checked = _validate(setup, args=args)
    expected = {k: v for k, v in trained.metrics.items() if k.startswith("global_val_")}
    assert set(expected) == {"global_val_accuracy", "global_val_f1_score", "global_val_loss"}
    assert checked.metrics == expected  # bit for bit, not approximately
    total = setup[2][0]["sample_count"]
    assert checked.sample_size == int(total * 0.25)
    assert checked.params_sha256 == sha256_file(setup[3]) and checked.losses == ()
    assert _validate(setup, args=args) == checked
    # test_on_global_updates is not needed: a validation round validates
    plain = {**ARGS, "test_ratio": 0.25, "test_metric": "f1_score"}
    assert _validate(setup, args=plain).metrics == expected
    # another seed draws another split (unless random_seed fixes it)
    assert _validate(setup, seed=6, args=args).metrics != expected


def test_validation_round_without_split_uses_the_whole_dataset(setup):
    _, _, records, init = setup
    checked = _validate(setup, dataset_index=1)
    assert checked.sample_size == records[1]["sample_count"]
    assert set(checked.metrics) == {"global_val_accuracy", "global_val_loss"}
    whole = evaluate(
        plan_source=setup[1],
        plan_class="BreastCancerPlan",
        model_args={},
        training_args=ARGS,
        params_path=init,
        dataset=records[1],
    )
    assert checked.metrics["global_val_accuracy"] == whole["accuracy"]
    assert checked.metrics["global_val_loss"] == pytest.approx(whole["loss"])
