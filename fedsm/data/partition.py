"""Cut a CSV data set into node-local files: a held-out test split and K node partitions.

Rows are copied verbatim (the cells are not re-formatted), each output keeps the header and
the source's row order, and the assignment of rows depends only on ``seed``: it uses
``random.Random(seed)``, whose shuffle is stable across Python versions, so the demo's
partitions are the same everywhere.

- IID: rows are shuffled and dealt round-robin, so node sizes differ by at most one and each
  node's label mix is the population's up to sampling noise.
- Label-skewed (``iid=False``): rows are ordered by label (random order within a label) and cut
  into K contiguous blocks of equal size, so most nodes see mostly one label (McMahan et al.'s
  "pathological non-IID" shards, with one shard per node).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from fedsm.errors import FedsmError

__all__ = ["PartitionError", "partition_csv", "split_holdout"]


class PartitionError(FedsmError, ValueError):
    """The source CSV cannot be read or cannot be split as asked."""


def _read(source: Path, target: str) -> tuple[list[str], list[list[str]], list[str]]:
    try:
        with open(source, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [row for row in reader if row]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise PartitionError(f"cannot read CSV {str(source)!r}: {exc}") from exc
    if header is None:
        raise PartitionError(f"CSV {str(source)!r} is empty")
    if target not in header:
        raise PartitionError(f"CSV {str(source)!r} has no column {target!r}; columns: {header}")
    index = header.index(target)
    bad = [i + 2 for i, row in enumerate(rows) if len(row) != len(header)]
    if bad:
        raise PartitionError(f"CSV {str(source)!r}: rows on lines {bad[:5]} have the wrong width")
    return header, rows, [row[index] for row in rows]


def _write(path: Path, header: list[str], rows: list[list[str]], indices: list[int]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows[i] for i in sorted(indices))
    tmp.replace(path)
    return path


def _holdout_indices(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split: each label gives ``round(count * fraction)`` rows to the test side."""
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, value in enumerate(labels) if value == label]
        rng.shuffle(members)
        n_test = round(len(members) * fraction)
        test.extend(members[:n_test])
        train.extend(members[n_test:])
    return sorted(train), sorted(test)


def split_holdout(
    source: str | Path,
    out_dir: str | Path,
    fraction: float = 0.2,
    *,
    seed: int = 0,
    target: str = "target",
) -> tuple[Path, Path]:
    """Write a stratified (train, test) split of ``source`` as ``train.csv`` / ``test.csv``.

    Returns
    -------
    (Path, Path)
        ``out_dir/train.csv`` and ``out_dir/test.csv``.

    Raises
    ------
    PartitionError
        Unreadable source, missing target column, or ``fraction`` not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise PartitionError(f"fraction must lie in (0, 1), got {fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows, labels = _read(Path(source), target)
    train, test = _holdout_indices(labels, fraction, seed)
    if not train or not test:
        raise PartitionError(f"fraction {fraction} leaves one side empty ({len(rows)} rows)")
    return _write(out / "train.csv", header, rows, train), _write(
        out / "test.csv", header, rows, test
    )


def partition_csv(
    source: str | Path,
    k: int,
    out_dir: str | Path,
    *,
    iid: bool = True,
    seed: int = 0,
    test_fraction: float = 0.0,
    target: str = "target",
) -> list[Path]:
    """Split ``source`` into ``k`` node files ``out_dir/node_<i>.csv`` (IID or label-skewed).

    With ``test_fraction`` > 0 a stratified held-out split is taken first and written to
    ``out_dir/test.csv``; only the remaining rows are partitioned.

    Returns
    -------
    list[Path]
        The ``k`` node files, in node order.

    Raises
    ------
    PartitionError
        Unreadable source, ``k`` < 1 or larger than the number of rows, bad ``test_fraction``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise PartitionError(f"k must be an int >= 1, got {k!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise PartitionError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows, labels = _read(Path(source), target)
    pool = list(range(len(rows)))
    if test_fraction > 0.0:
        pool, test = _holdout_indices(labels, test_fraction, seed)
        _write(out / "test.csv", header, rows, test)
    if k > len(pool):
        raise PartitionError(f"cannot give {k} nodes at least one row each out of {len(pool)}")
    rng = random.Random(seed + 1)
    order = list(pool)
    rng.shuffle(order)
    parts: list[list[int]]
    if iid:
        parts = [order[i::k] for i in range(k)]
    else:
        rank = {index: position for position, index in enumerate(order)}
        order.sort(key=lambda i: (labels[i], rank[i]))
        bounds = [round(j * len(order) / k) for j in range(k + 1)]
        parts = [order[bounds[j] : bounds[j + 1]] for j in range(k)]
    return [_write(out / f"node_{i}.csv", header, rows, part) for i, part in enumerate(parts)]
