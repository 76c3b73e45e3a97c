"""Bundled demo data and helpers that cut it into node-local CSV files.

``breast_cancer.csv`` is the Wisconsin diagnostic breast-cancer data set (569 patients, 30
numeric features, ``target`` 1 = benign / 0 = malignant, as in scikit-learn), taken from
scikit-learn's copy; ``BREAST_CANCER_LICENSE.txt`` next to it gives provenance, licence
(CC BY 4.0 for the data, BSD-3 for scikit-learn's distribution) and the papers to cite.
"""

from __future__ import annotations

from pathlib import Path

from fedsm.data.partition import PartitionError, partition_csv, split_holdout

__all__ = [
    "PartitionError",
    "breast_cancer_csv",
    "breast_cancer_license",
    "partition_csv",
    "split_holdout",
]

_HERE = Path(__file__).resolve().parent


def breast_cancer_csv() -> Path:
    """Path of the bundled breast-cancer CSV (header row; target column ``"target"``)."""
    return _HERE / "breast_cancer.csv"


def breast_cancer_license() -> Path:
    """Path of the text giving the breast-cancer data's provenance, licence and citation."""
    return _HERE / "BREAST_CANCER_LICENSE.txt"
