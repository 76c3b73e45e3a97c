"""The public surface named in the issues, and the researcher's data quality check."""

from __future__ import annotations

import pytest

import fedsm
from fedsm.researcher.datacheck import check_data_quality
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
