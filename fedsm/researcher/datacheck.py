"""The seed's checks of a Job's inputs: the data quality check over a FederatedDataSet
(raising on every mismatch) and ``validate_minimal_arguments`` (mandatory fields and URLs)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from fedsm.researcher.errors import DataQualityCheckError
from fedsm.researcher.requests import FederatedDataSet

__all__ = ["check_data_quality", "usable_url", "validate_minimal_arguments"]


def usable_url(value: Any) -> bool:
    """Whether ``value`` is a URL fedsm can fetch: ``http(s)://`` with a host (and a valid
    port if any), or ``file://`` naming an absolute path on this machine. No whitespace or
    control characters anywhere."""
    if not isinstance(value, str) or not value.isprintable() or any(c.isspace() for c in value):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return bool(parts.hostname)
    if scheme == "file":
        return (
            value[5:7] == "//"  # file://, not file:/path
            and parts.netloc in ("", "localhost")
            and parts.path.startswith("/")
        )
    return False


def validate_minimal_arguments(obj: Mapping[str, Any] | None, fields: Iterable[str]) -> bool:
    """The seed's ``Job.validate_minimal_arguments``: True when ``obj`` holds a non-None value
    for every name in ``fields`` and every such field whose name ends in ``_url`` is a URL
    fedsm can use (:func:`usable_url`); False otherwise (the seed asserted)."""
    if not isinstance(obj, Mapping):
        return False
    for name in fields:
        value = obj.get(name)
        if value is None:
            return False
        if isinstance(name, str) and name.endswith("_url") and not usable_url(value):
            return False
    return True


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
