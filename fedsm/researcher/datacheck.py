"""The seed's data quality check over a FederatedDataSet, raising on every mismatch."""

from __future__ import annotations

from fedsm.researcher.errors import DataQualityCheckError
from fedsm.researcher.requests import FederatedDataSet

__all__ = ["check_data_quality"]


def check_data_quality(data: FederatedDataSet) -> None:
    """The seed's data quality check, raising instead of logging for images/tensors too."""
    entries = data.data()
    if len(entries) < 2:
        return
    ref_node, ref = next(iter(entries.items()))
    for node, entry in entries.items():
        if entry.get("data_type") != ref.get("data_type"):
            raise DataQualityCheckError(
                f"{node} has a {entry.get('data_type')} dataset, {ref_node} a "
                f"{ref.get('data_type')} one"
            )
        shape, ref_shape = list(entry.get("shape", [])), list(ref.get("shape", []))
        if ref.get("data_type") == "csv":
            if shape[1:] != ref_shape[1:]:
                raise DataQualityCheckError(
                    f"{node} has {shape[1:]} columns, {ref_node} has {ref_shape[1:]}"
                )
            if list(entry.get("dtypes", [])) != list(ref.get("dtypes", [])):
                diff = [
                    (i, a, b)
                    for i, (a, b) in enumerate(
                        zip(entry.get("dtypes", []), ref.get("dtypes", []), strict=False)
                    )
                    if a != b
                ]
                raise DataQualityCheckError(
                    f"column dtypes of {node} differ from {ref_node}: (column, {node}, "
                    f"{ref_node}) {diff or 'different column counts'}"
                )
        elif shape[1:] != ref_shape[1:]:
            raise DataQualityCheckError(
                f"{node} has samples of shape {shape[1:]} (channels first), {ref_node} "
                f"{ref_shape[1:]}"
            )
