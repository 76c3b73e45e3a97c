"""Bundled breast-cancer data, CSV/tensor dataset description, and partition helpers."""

from __future__ import annotations

import csv
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from fedsm.data import (
    PartitionError,
    breast_cancer_csv,
    breast_cancer_license,
    partition_csv,
    split_holdout,
)
from fedsm.training.datasets import (
    CsvDataset,
    DatasetError,
    TensorDataset,
    describe_csv,
    describe_tensors,
    load_dataset,
)


def _rows(path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        return next(reader), [tuple(row) for row in reader]


def test_bundled_breast_cancer_data_has_expected_shape_and_labels():
    header, rows = _rows(breast_cancer_csv())
    assert len(header) == 31 and header[-1] == "target" and header[0] == "mean radius"
    assert len(rows) == 569
    assert Counter(row[-1] for row in rows) == {"1": 357, "0": 212}
    info = describe_csv(breast_cancer_csv(), "target")
    assert info["shape"] == [569, 30] and info["sample_count"] == 569
    assert info["dtypes"] == ["float64"] * 30 and info["columns"] == header[:-1]


def test_licence_and_citation_ship_next_to_the_data():
    text = breast_cancer_license().read_text()
    assert "CC BY 4.0" in text and "Street" in text and "BSD 3-Clause" in text


def test_csv_dataset_loads_features_and_target():
    ds = CsvDataset(breast_cancer_csv(), "target")
    assert ds.data.shape == (569, 30) and ds.data.dtype == torch.float32
    assert ds.target.shape == (569,) and float(ds.target.sum()) == 357.0
    assert ds.data[0, 0] == pytest.approx(17.99)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "empty"),
        ("a,b\n1,2\n", "no target column 'target'"),
        ("a,target\n", "no rows"),
        ("a,target\n1,x\n", "'x' is not a number"),
        ("a,target\n1,\n", "is not a number"),
        ("a,target\nnan,1\n", "non-finite"),
        ("a,target\n1,2,3\n", "3 cells"),
        ("target\n1\n", "no feature column"),
        ("a,a,target\n1,2,3\n", "duplicate column"),
    ],
)
def test_bad_csv_is_a_typed_error(tmp_path, content, match):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        describe_csv(path, "target")


def test_missing_csv_is_a_typed_error(tmp_path):
    with pytest.raises(DatasetError, match="cannot open"):
        describe_csv(tmp_path / "none.csv", "target")


def test_tensor_dataset_description_and_errors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"data": torch.zeros(7, 3, 4), "target": torch.ones(7, dtype=torch.int64)}, str(path))
    info = describe_tensors(path)
    assert info["data_type"] == "tensors" and info["shape"] == [7, 3, 4]
    assert info["dtypes"] == ["float32"] and info["target_dtype"] == "int64"
    assert info["sample_count"] == 7
    ds = load_dataset(info)
    assert isinstance(ds, TensorDataset) and len(ds) == 7
    save_file({"data": torch.zeros(7, 2), "target": torch.ones(6)}, str(tmp_path / "bad.st"))
    with pytest.raises(DatasetError, match="first"):
        describe_tensors(tmp_path / "bad.st")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.st"))
    with pytest.raises(DatasetError, match="exactly 'data' and 'target'"):
        describe_tensors(tmp_path / "other.st")
    (tmp_path / "junk.st").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a safetensors"):
        describe_tensors(tmp_path / "junk.st")


def test_load_dataset_refuses_unknown_types_and_incomplete_records():
    with pytest.raises(DatasetError, match="unsupported data_type"):
        load_dataset({"data_type": "images", "path": "x"})
    with pytest.raises(DatasetError, match="lacks the key 'path'"):
        load_dataset({"data_type": "csv"})
    with pytest.raises(DatasetError, match="target column"):
        load_dataset({"data_type": "csv", "path": str(breast_cancer_csv())})


def test_split_holdout_is_stratified_disjoint_and_seeded(tmp_path):
    train, test = split_holdout(breast_cancer_csv(), tmp_path / "a", 0.2, seed=0)
    header, all_rows = _rows(breast_cancer_csv())
    _, train_rows = _rows(train)
    _, test_rows = _rows(test)
    assert len(test_rows) == round(357 * 0.2) + round(212 * 0.2)
    assert sorted(train_rows + test_rows) == sorted(all_rows)
    assert not set(train_rows) & set(test_rows)
    assert Counter(r[-1] for r in test_rows) == {"1": 71, "0": 42}
    again, again_test = split_holdout(breast_cancer_csv(), tmp_path / "b", 0.2, seed=0)
    assert again.read_bytes() == train.read_bytes() and again_test.read_bytes() == test.read_bytes()
    _, other_test = split_holdout(breast_cancer_csv(), tmp_path / "c", 0.2, seed=1)
    assert other_test.read_bytes() != test.read_bytes()
    with pytest.raises(PartitionError, match="fraction"):
        split_holdout(breast_cancer_csv(), tmp_path / "d", 1.0)


def test_iid_partition_covers_every_row_once_with_balanced_sizes(tmp_path):
    paths = partition_csv(breast_cancer_csv(), 3, tmp_path, seed=4)
    _, all_rows = _rows(breast_cancer_csv())
    parts = [_rows(p)[1] for p in paths]
    assert [p.name for p in paths] == ["node_0.csv", "node_1.csv", "node_2.csv"]
    assert sorted(r for part in parts for r in part) == sorted(all_rows)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for part in parts:  # each IID part is close to the population's 62.7 % benign
        share = sum(r[-1] == "1" for r in part) / len(part)
        assert 0.5 < share < 0.75
    assert [describe_csv(p, "target")["dtypes"] for p in paths] == [["float64"] * 30] * 3


def test_label_skewed_partition_concentrates_labels(tmp_path):
    paths = partition_csv(breast_cancer_csv(), 3, tmp_path, iid=False, seed=4)
    shares = []
    for path in paths:
        _, rows = _rows(path)
        shares.append(sum(r[-1] == "1" for r in rows) / len(rows))
    assert shares[0] == 0.0 and shares[2] == 1.0


def test_partition_with_test_fraction_writes_holdout(tmp_path):
    paths = partition_csv(breast_cancer_csv(), 2, tmp_path, test_fraction=0.2, seed=0)
    _, test_rows = _rows(tmp_path / "test.csv")
    node_rows = [r for p in paths for r in _rows(p)[1]]
    assert len(test_rows) == 113 and len(node_rows) == 569 - 113
    assert not set(test_rows) & set(node_rows)


def test_partition_argument_errors(tmp_path):
    with pytest.raises(PartitionError, match="k must be"):
        partition_csv(breast_cancer_csv(), 0, tmp_path)
    with pytest.raises(PartitionError, match="at least one row"):
        partition_csv(breast_cancer_csv(), 1000, tmp_path)
    with pytest.raises(PartitionError, match="no column"):
        partition_csv(breast_cancer_csv(), 2, tmp_path, target="label")


def test_package_data_is_declared_for_the_wheel():
    import importlib.resources

    files = {p.name for p in importlib.resources.files("fedsm.data").iterdir()}
    assert {"breast_cancer.csv", "BREAST_CANCER_LICENSE.txt", "__init__.py"} <= files
