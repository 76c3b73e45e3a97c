"""The public surface named in the issues, and the researcher's data quality check."""

from __future__ import annotations

import pytest

import fedsm
from fedsm.researcher.datacheck import (
    check_data_quality,
    usable_url,
    validate_minimal_arguments,
)
from fedsm.researcher.errors import DataQualityCheckError
from fedsm.researcher.requests import FederatedDataSet, FederatedDataSetError


def test_public_names_import_from_the_package() -> None:
    from fedsm import (  # noqa: F401
        Experiment,
        FedAvg,
        FederatedDataSet,
        Job,
        LocalJob,
        Requests,
        TorchTrainingPlan,
        TrainingArgs,
        localJob,
    )

    assert localJob is LocalJob
    assert (
        Job.__module__ == "fedsm.researcher.job"
        and Experiment.__module__ == "fedsm.researcher.experiment"
    )
    with pytest.raises(AttributeError):
        fedsm.NoSuchThing  # noqa: B018


def csv_entry(dataset_id: str, columns: int, dtypes: list[str]) -> dict:
    return {"dataset_id": dataset_id, "data_type": "csv", "shape": [100, columns], "dtypes": dtypes}


def test_matching_csv_datasets_pass() -> None:
    fds = FederatedDataSet(
        {
            "a": csv_entry("da", 3, ["float64"] * 3),
            "b": [csv_entry("db", 3, ["float64"] * 3)],  # the seed's one-element list form
        }
    )
    check_data_quality(fds)
    assert fds.node_ids() == ["a", "b"] and fds.dataset_ids() == {"a": "da", "b": "db"}


def test_a_different_column_count_names_the_node() -> None:
    fds = FederatedDataSet(
        {"a": csv_entry("da", 3, ["float64"] * 3), "b": csv_entry("db", 4, ["float64"] * 4)}
    )
    with pytest.raises(DataQualityCheckError, match="b has \\[4\\] columns, a has \\[3\\]"):
        check_data_quality(fds)


def test_a_different_dtype_names_node_and_column() -> None:
    fds = FederatedDataSet(
        {
            "a": csv_entry("da", 2, ["float64", "float64"]),
            "b": csv_entry("db", 2, ["float64", "object"]),
        }
    )
    with pytest.raises(DataQualityCheckError, match=r"\(1, 'object', 'float64'\)"):
        check_data_quality(fds)


def test_tensor_shapes_and_types_are_compared() -> None:
    img = {"dataset_id": "x", "data_type": "tensors", "shape": [10, 3, 28, 28]}
    other = dict(img, shape=[10, 1, 28, 28])
    with pytest.raises(DataQualityCheckError, match="shape \\[1, 28, 28\\]"):
        check_data_quality(FederatedDataSet({"a": img, "b": other}))
    with pytest.raises(DataQualityCheckError, match="csv dataset"):
        check_data_quality(FederatedDataSet({"a": img, "b": csv_entry("d", 3, ["float64"] * 3)}))


def test_more_than_one_dataset_per_node_is_refused() -> None:
    with pytest.raises(FederatedDataSetError, match="exactly one"):
        FederatedDataSet({"a": [csv_entry("d1", 1, ["float64"]), csv_entry("d2", 1, ["float64"])]})


@pytest.mark.parametrize(
    ("url", "usable"),
    [
        ("http://repo.example/files/x", True),
        ("https://repo.example:8443/files/x", True),
        ("file:///var/fedsm/repository/x", True),
        ("file://localhost/var/x", True),
        ("http://", False),
        ("http:///files/x", False),
        ("https://host:99999/x", False),
        ("file://relative/x", False),
        ("file:/no/slashes", False),
        ("ftp://host/x", False),
        ("javascript:alert(1)", False),
        ("http://host/a b", False),
        ("params.pt", False),
        ("", False),
        (b"http://host/x", False),
    ],
)
def test_usable_urls_are_http_with_a_host_or_absolute_files(url: object, usable: bool) -> None:
    assert usable_url(url) is usable


def test_validate_minimal_arguments_checks_presence_and_urls() -> None:
    fields = ["training_plan_url", "training_plan_class", "params_url"]
    good = {
        "training_plan_url": "file:///repo/plan",
        "training_plan_class": "Plan",
        "params_url": "http://repo/files/p",
    }
    assert validate_minimal_arguments(good, fields) is True
    assert validate_minimal_arguments(good, []) is True
    assert validate_minimal_arguments({**good, "training_plan_class": None}, fields) is False
    assert validate_minimal_arguments({**good, "params_url": "repo/p"}, fields) is False
    assert validate_minimal_arguments({k: good[k] for k in fields[:2]}, fields) is False
    assert validate_minimal_arguments(None, fields) is False
    # only names ending in _url are URLs; any other value is only required to be present
    assert validate_minimal_arguments({"url_prefix": "x", "n": 0}, ["url_prefix", "n"]) is True
