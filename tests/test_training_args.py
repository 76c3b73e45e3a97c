"""TrainingArgs: defaults, plain dict(), and the documented errors."""

from __future__ import annotations

import pytest

from fedsm.errors import FedsmError
from fedsm.training.args import (
    TEST_METRICS,
    VALID_KEYS,
    TrainingArgs,
    TrainingArgsError,
    metric_name,
)


def test_defaults_and_plain_dict():
    args = TrainingArgs()
    plain = args.dict()
    assert set(plain) == set(VALID_KEYS)
    assert plain["epochs"] == 1 and plain["num_updates"] is None
    assert plain["lr"] == 0.01 and plain["batch_size"] == 48
    assert TrainingArgs(plain).dict() == plain
    plain["optimizer_args"]["momentum"] = 0.9
    assert args["optimizer_args"] == {}, "dict() must return a copy"


def test_mapping_and_kwargs_merge_and_kwargs_win():
    args = TrainingArgs(
        {"lr": 0.1, "epochs": 3}, lr=0.2, optimizer_args={"lr": 0.05, "momentum": 0.9}
    )
    assert args["lr"] == 0.2 and args["epochs"] == 3
    assert args.optimizer_arguments() == {"lr": 0.05, "momentum": 0.9}
    assert TrainingArgs(args) == args


def test_unknown_key_lists_valid_keys():
    with pytest.raises(TrainingArgsError) as info:
        TrainingArgs({"learning_rate": 0.1})
    message = str(info.value)
    assert "learning_rate" in message
    for key in VALID_KEYS:
        assert key in message
    assert isinstance(info.value, FedsmError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lr", "0.1", "'lr' must be a finite number > 0"),
        ("lr", True, "'lr' must be a finite number > 0"),
        ("epochs", 1.5, "'epochs' must be an int >= 1 or None"),
        ("epochs", True, "'epochs' must be an int >= 1 or None"),
        ("batch_size", "32", "'batch_size' must be an int >= 1"),
        ("batch_size", None, "'batch_size' must be an int >= 1"),
        ("optimizer_args", [("momentum", 0.9)], "'optimizer_args' must be a dict"),
        ("optimizer_args", {"betas": object()}, "'optimizer_args.betas' must hold plain values"),
        ("test_ratio", "0.2", "'test_ratio' must be a number in [0, 1)"),
        ("dry_run", 1, "'dry_run' must be a bool"),
        ("use_gpu", "yes", "'use_gpu' must be a bool"),
        ("test_metric", 3, "'test_metric' must be one of"),
        ("random_seed", 1.0, "'random_seed' must be an int >= 0"),
    ],
)
def test_wrong_type_names_the_key_and_expectation(key, value, expected):
    with pytest.raises(TrainingArgsError) as info:
        TrainingArgs({key: value})
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"lr": 0}, "'lr' must be a finite number > 0"),
        ({"lr": -0.1}, "'lr' must be a finite number > 0"),
        ({"lr": float("nan")}, "'lr' must be a finite number > 0"),
        ({"epochs": 0}, "'epochs' must be >= 1"),
        ({"num_updates": 0}, "'num_updates' must be >= 1"),
        ({"batch_size": 0}, "'batch_size' must be >= 1"),
        ({"log_interval": 0}, "'log_interval' must be >= 1"),
        ({"random_seed": -1}, "'random_seed' must be >= 0"),
        ({"test_ratio": 1.0}, "'test_ratio' must be a number in [0, 1)"),
        ({"test_ratio": -0.1}, "'test_ratio' must be a number in [0, 1)"),
        ({"test_metric": "f1"}, "'test_metric' must be one of ['accuracy', 'f1_score'"),
        ({"test_metric_args": {"average": "macro"}}, "'test_metric_args' needs 'test_metric'"),
        (
            {"test_metric": "ACCURACY", "test_metric_args": {"average": "macro"}},
            "test_metric_args ['average'] do not apply to 'accuracy'",
        ),
        (
            {"test_metric": "F1_SCORE", "test_metric_args": {"average": "samples"}},
            "test_metric_args.average of 'f1_score' must be one of",
        ),
        (
            {"test_metric": "recall", "test_metric_args": {"pos_label": True}},
            "test_metric_args.pos_label of 'recall' must be one of [0, 1]",
        ),
        (
            {"test_metric": "MEAN_SQUARE_ERROR", "test_metric_args": {"multioutput": "x"}},
            "test_metric_args.multioutput of 'mean_square_error' must be one of",
        ),
        ({"test_metric_args": [1]}, "'test_metric_args' must be a dict"),
        ({"optimizer_args": {"eps": float("inf")}}, "'optimizer_args.eps' must be finite"),
        ({"epochs": 2, "num_updates": 5}, "either 'epochs' or 'num_updates', not both"),
        ({"test_on_local_updates": True}, "need 'test_ratio' > 0"),
        ({"test_on_global_updates": True, "test_ratio": 0.0}, "need 'test_ratio' > 0"),
    ],
)
def test_out_of_range_values_are_refused(args, expected):
    with pytest.raises(TrainingArgsError) as info:
        TrainingArgs(args)
    assert expected in str(info.value)


def test_num_updates_replaces_default_epochs():
    args = TrainingArgs(num_updates=7)
    assert args["num_updates"] == 7 and args["epochs"] is None


def test_non_mapping_is_refused():
    with pytest.raises(TrainingArgsError, match="must be a mapping"):
        TrainingArgs([("lr", 0.1)])  # type: ignore[arg-type]


def test_is_read_only():
    args = TrainingArgs()
    with pytest.raises(TypeError):
        args["lr"] = 1.0  # type: ignore[index]


SEED_METRICS = {
    "ACCURACY": "accuracy",
    "F1_SCORE": "f1_score",
    "PRECISION": "precision",
    "RECALL": "recall",
    "MEAN_SQUARE_ERROR": "mean_square_error",
    "MEAN_ABSOLUTE_ERROR": "mean_absolute_error",
    "EXPLAINED_VARIANCE": "explained_variance",
}


@pytest.mark.parametrize(("seed_name", "canonical"), sorted(SEED_METRICS.items()))
def test_seed_metric_names_are_accepted_in_any_case(seed_name, canonical):
    for spelling in (seed_name, seed_name.lower(), seed_name.title(), canonical):
        args = TrainingArgs(test_metric=spelling)
        assert args["test_metric"] == canonical
        assert args.dict()["test_metric"] == canonical
        assert metric_name(spelling) == canonical
    assert set(SEED_METRICS.values()) | {"loss"} == set(TEST_METRICS)
    assert metric_name("dice") is None and metric_name(3) is None


def test_test_metric_args_are_checked_and_kept_plain():
    args = TrainingArgs(
        test_metric="F1_Score",
        test_metric_args={"average": "macro", "zero_division": 1.0, "pos_label": 0},
    )
    assert args["test_metric_args"] == {"average": "macro", "zero_division": 1, "pos_label": 0}
    assert TrainingArgs(args.dict()) == args
    plain = args.dict()
    plain["test_metric_args"]["average"] = "micro"
    assert args["test_metric_args"]["average"] == "macro", "dict() must return a copy"
    assert TrainingArgs()["test_metric_args"] == {}
    ev = TrainingArgs(
        test_metric="explained_variance", test_metric_args={"multioutput": "variance_weighted"}
    )
    assert ev["test_metric_args"] == {"multioutput": "variance_weighted"}
