"""Node-local datasets: a CSV table and a safetensors pair of tensors, plus their metadata.

A node registers a dataset once (``describe_csv`` / ``describe_tensors`` produce the record's
metadata: shape, per-feature dtypes, columns, sample count) and loads it for every round from
that record (``load_dataset``). The metadata is what the researcher compares across nodes
for its data quality check, so it is computed the same way on every node.

Two formats, both read without executing anything from the file:

- ``csv``: a header row of column names, one row per sample, every cell numeric. The target
  column is chosen by name; every other column is a feature. Every numeric column is
  reported as ``"float64"`` (a column that happens to hold only whole numbers in one
  hospital's extract would otherwise be ``int64`` there and ``float64`` elsewhere, and the
  quality check would reject a federation whose data are in fact alike).
- ``tensors``: a safetensors file with exactly a ``"data"`` tensor (samples on dim 0) and a
  ``"target"`` tensor with the same first dimension.

A node loads its dataset every round, and a process simulating many nodes loads many: a
loaded dataset is kept by its file's identity (device, inode, size, modification time) and
each load gets its own copy of the tensors (a plan may change them in place), so a file
changed on disk is read again and no round sees another round's changes. The cache holds at
most :data:`DATASET_CACHE_BYTES` of tensors.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedsm.errors import FedsmError

__all__ = [
    "CsvDataset",
    "DatasetError",
    "TensorDataset",
    "describe_csv",
    "describe_tensors",
    "load_dataset",
]


class DatasetError(FedsmError, ValueError):
    """A dataset file is missing, unreadable, or does not have the expected layout."""


def _read_csv(path: Path, target: str) -> tuple[list[str], list[list[float]], list[float]]:
    """Parse ``path`` into (feature names, feature rows, target values), all numeric."""
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot open CSV dataset {str(path)!r}: {exc.strerror}") from exc
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"CSV dataset {str(path)!r} is empty (no header row)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"CSV dataset {str(path)!r} is not readable CSV: {exc}") from exc
        header = [name.strip() for name in header]
        if target not in header:
            raise DatasetError(
                f"CSV dataset {str(path)!r} has no target column {target!r}; "
                f"its columns are {header}"
            )
        if len(set(header)) != len(header):
            raise DatasetError(f"CSV dataset {str(path)!r} has duplicate column names")
        t_index = header.index(target)
        features: list[list[float]] = []
        targets: list[float] = []
        try:
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DatasetError(
                        f"{str(path)!r} line {line_no}: {len(row)} cells, header has {len(header)}"
                    )
                values = []
                for col, cell in zip(header, row, strict=True):
                    try:
                        value = float(cell)
                    except ValueError:
                        raise DatasetError(
                            f"{str(path)!r} line {line_no}, column {col!r}: {cell!r} is not a "
                            "number (only numeric CSV datasets are supported)"
                        ) from None
                    if not math.isfinite(value):
                        raise DatasetError(
                            f"{str(path)!r} line {line_no}, column {col!r}: missing or "
                            f"non-finite value {cell!r}"
                        )
                    values.append(value)
                targets.append(values.pop(t_index))
                features.append(values)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"CSV dataset {str(path)!r} is not readable CSV: {exc}") from exc
    names = [name for i, name in enumerate(header) if i != t_index]
    if not features:
        raise DatasetError(f"CSV dataset {str(path)!r} has a header but no rows")
    if not names:
        raise DatasetError(f"CSV dataset {str(path)!r} has no feature column besides {target!r}")
    return names, features, targets


def describe_csv(path: str | Path, target: str) -> dict[str, Any]:
    """Return the registry metadata of a CSV dataset, checking it can be loaded.

    Returns
    -------
    dict
        ``data_type`` ("csv"), ``path``, ``target``, ``columns`` (feature column names, in
        file order), ``dtypes`` (one string per feature column, always ``"float64"``),
        ``shape`` ([sample_count, n_features]) and ``sample_count``.

    Raises
    ------
    DatasetError
        The file cannot be read, lacks the target column, or holds a non-numeric cell.
    """
    path = Path(path)
    names, features, _ = _read_csv(path, target)
    return {
        "data_type": "csv",
        "path": str(path),
        "target": target,
        "columns": names,
        "dtypes": ["float64"] * len(names),
        "shape": [len(features), len(names)],
        "sample_count": len(features),
    }


def _read_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except FileNotFoundError as exc:
        raise DatasetError(f"tensor dataset {str(path)!r} does not exist") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise DatasetError(
            f"tensor dataset {str(path)!r} is not a safetensors file: {exc}"
        ) from exc
    if set(tensors) != {"data", "target"}:
        raise DatasetError(
            f"tensor dataset {str(path)!r} must hold exactly 'data' and 'target' tensors, "
            f"found {sorted(tensors)}"
        )
    data, target = tensors["data"], tensors["target"]
    if data.dim() < 1 or target.dim() < 1 or data.shape[0] != target.shape[0]:
        raise DatasetError(
            f"tensor dataset {str(path)!r}: 'data' {list(data.shape)} and 'target' "
            f"{list(target.shape)} must share their first (sample) dimension"
        )
    if data.shape[0] == 0:
        raise DatasetError(f"tensor dataset {str(path)!r} holds no samples")
    return data, target


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_tensors(path: str | Path) -> dict[str, Any]:
    """Return the registry metadata of a safetensors dataset ("data" and "target" tensors).

    ``shape`` is the shape of ``data``, ``dtypes`` a one-element list with its dtype name,
    ``target_shape`` and ``target_dtype`` describe ``target``.

    Raises
    ------
    DatasetError
        The file is missing, not safetensors, or does not hold the two expected tensors.
    """
    path = Path(path)
    data, target = _read_tensors(path)
    return {
        "data_type": "tensors",
        "path": str(path),
        "target": "target",
        "columns": [],
        "dtypes": [_dtype_name(data.dtype)],
        "shape": list(data.shape),
        "target_shape": list(target.shape),
        "target_dtype": _dtype_name(target.dtype),
        "sample_count": int(data.shape[0]),
    }


class _InMemoryDataset:
    """Samples held as two tensors: ``data`` (features) and ``target``, sample-major."""

    def __init__(self, data: torch.Tensor, target: torch.Tensor) -> None:
        self.data = data
        self.target = target

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index], self.target[index]


class CsvDataset(_InMemoryDataset):
    """A numeric CSV dataset: ``data`` is float32 ``[n, n_features]``, ``target`` float32 ``[n]``.

    Targets stay float32 whatever their values; a classification plan casts them (for example
    ``target.long()`` for a cross-entropy loss).
    """

    def __init__(self, path: str | Path, target: str) -> None:
        self.path = Path(path)
        self.target_column = target
        names, features, targets = _read_csv(self.path, target)
        self.columns = names
        super().__init__(
            torch.tensor(features, dtype=torch.float64).to(torch.float32),
            torch.tensor(targets, dtype=torch.float64).to(torch.float32),
        )


class TensorDataset(_InMemoryDataset):
    """A safetensors dataset holding ``data`` and ``target`` tensors (loaded as stored)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        data, target = _read_tensors(self.path)
        super().__init__(data, target)


#: Most bytes of loaded datasets kept for the next load of the same file.
DATASET_CACHE_BYTES = 256 * 2**20

_CACHE: OrderedDict[tuple, CsvDataset | TensorDataset] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_cache_bytes = 0


def _nbytes(dataset: _InMemoryDataset) -> int:
    return sum(t.element_size() * t.nelement() for t in (dataset.data, dataset.target))


def _copy(dataset: CsvDataset | TensorDataset) -> CsvDataset | TensorDataset:
    """A copy sharing nothing mutable with ``dataset`` (its own tensors and column list)."""
    out = copy.copy(dataset)
    out.data = dataset.data.clone()
    out.target = dataset.target.clone()
    if isinstance(out, CsvDataset):
        out.columns = list(dataset.columns)
    return out


def _cache_key(data_type: str, path: Any, target: Any) -> tuple | None:
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None  # the loader reports it
    return (
        data_type,
        os.path.abspath(path),
        target,
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
    )


def _cached(key: tuple | None, load: Any) -> CsvDataset | TensorDataset:
    """The dataset under ``key`` (a copy), loading and keeping it when missing."""
    global _cache_bytes
    if key is not None:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
        if hit is not None:
            return _copy(hit)
    dataset = load()
    size = _nbytes(dataset)
    if key is not None and size <= DATASET_CACHE_BYTES // 4:
        kept = _copy(dataset)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = kept
                _cache_bytes += size
            while _cache_bytes > DATASET_CACHE_BYTES and _CACHE:
                _, old = _CACHE.popitem(last=False)
                _cache_bytes -= _nbytes(old)
    return dataset


def load_dataset(record: Mapping[str, Any]) -> CsvDataset | TensorDataset:
    """Load the dataset a node registry record points to, reading only ``record["path"]``.

    When the record carries ``sample_count`` (as registered), the file must still hold that
    many samples: a file changed behind the registry's back is refused rather than trained on.

    Raises
    ------
    DatasetError
        Unknown ``data_type``, missing keys, unreadable file or a file that changed.
    """
    try:
        data_type = record["data_type"]
        path = record["path"]
    except KeyError as exc:
        raise DatasetError(f"dataset record lacks the key {exc.args[0]!r}") from None
    dataset: CsvDataset | TensorDataset
    if data_type == "csv":
        target = record.get("target")
        if not isinstance(target, str):
            raise DatasetError("a csv dataset record needs its target column name under 'target'")
        dataset = _cached(_cache_key("csv", path, target), lambda: CsvDataset(path, target))
    elif data_type == "tensors":
        dataset = _cached(_cache_key("tensors", path, None), lambda: TensorDataset(path))
    else:
        raise DatasetError(f"unsupported data_type {data_type!r}; expected 'csv' or 'tensors'")
    expected = record.get("sample_count")
    if expected is not None and int(expected) != len(dataset):
        raise DatasetError(
            f"dataset {str(path)!r} now holds {len(dataset)} samples but was registered with "
            f"{expected}; re-register it"
        )
    return dataset
