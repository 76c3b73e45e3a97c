"""Seeded train/test split and mini-batch iteration over an in-memory dataset.

A training plan's ``training_data()`` returns a :class:`DataManager`; the node (or LocalJob)
calls ``split(test_ratio, seed=...)`` and hands the two :class:`BatchLoader` objects to the
plan. Batches are built by indexing the dataset's tensors, so there are no worker processes
and no hidden random state: a loader shuffles with the ``torch.Generator`` it is given, which
is what makes a round reproducible bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from fedsm.training.datasets import DatasetError

__all__ = ["BatchLoader", "DataManager", "SupportsTensors"]


class SupportsTensors(Protocol):
    """What a dataset must offer: ``data`` and ``target`` tensors with samples on dim 0."""

    data: torch.Tensor
    target: torch.Tensor


class BatchLoader:
    """Mini-batches over a subset (``indices``) of a dataset's tensors.

    Parameters
    ----------
    data, target
        Full dataset tensors.
    indices
        Which samples belong to this loader (int64, 1-D).
    batch_size
        Samples per batch; the last batch may be smaller.
    shuffle
        Whether :meth:`batches` draws a fresh permutation (from the generator) per pass.
    """

    def __init__(
        self,
        data: torch.Tensor,
        target: torch.Tensor,
        indices: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool,
    ) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.target = target
        self.indices = indices
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __len__(self) -> int:
        """Number of batches in one pass."""
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def sample_count(self) -> int:
        """Number of samples this loader covers."""
        return int(len(self.indices))

    def batches(
        self, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(data, target)`` batches for one pass over the subset.

        With ``shuffle`` the order comes from ``torch.randperm(..., generator=generator)``;
        pass a seeded generator for reproducible passes (``None`` uses torch's global RNG).
        """
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            yield self.data.index_select(0, chunk), self.target.index_select(0, chunk)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass in stored order (no shuffling): for evaluation."""
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start : start + self.batch_size]
            yield self.data.index_select(0, chunk), self.target.index_select(0, chunk)


class DataManager:
    """Wraps a dataset and builds the train/test loaders for a round.

    Parameters
    ----------
    dataset
        An object with ``data`` and ``target`` tensors (``CsvDataset``, ``TensorDataset``).
    batch_size
        Default batch size of the loaders; the node overrides it with the training args.
    shuffle
        Whether the training loader reshuffles each pass (the test loader never does).
    """

    def __init__(self, dataset: Any, *, batch_size: int = 48, shuffle: bool = True) -> None:
        if dataset is None:
            raise DatasetError(
                "no dataset: the node (or LocalJob) sets plan.dataset before training_data()"
            )
        if not isinstance(getattr(dataset, "data", None), torch.Tensor) or not isinstance(
            getattr(dataset, "target", None), torch.Tensor
        ):
            raise DatasetError(
                f"{type(dataset).__name__} is not a dataset with 'data' and 'target' tensors"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle

    def __len__(self) -> int:
        return int(self.dataset.data.shape[0])

    def split(
        self, test_ratio: float, *, seed: int = 0, batch_size: int | None = None
    ) -> tuple[BatchLoader, BatchLoader | None]:
        """Split the samples into (train, test) loaders with a seeded permutation.

        ``floor(n * test_ratio)`` samples go to the test loader (``None`` when that is 0);
        each side keeps its samples in file order, so only the membership depends on ``seed``.

        Raises
        ------
        DatasetError
            ``test_ratio`` is outside [0, 1) or would leave no training sample.
        """
        if not 0.0 <= test_ratio < 1.0:
            raise DatasetError(f"test_ratio must lie in [0, 1), got {test_ratio}")
        n = len(self)
        n_test = math.floor(n * test_ratio)
        if n - n_test < 1:
            raise DatasetError(f"test_ratio {test_ratio} leaves no training sample out of {n}")
        size = self.batch_size if batch_size is None else batch_size
        data, target = self.dataset.data, self.dataset.target
        if n_test == 0:
            train_idx = torch.arange(n)
            return BatchLoader(data, target, train_idx, batch_size=size, shuffle=self.shuffle), None
        gen = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(n, generator=gen)
        test_idx, _ = torch.sort(perm[:n_test])
        train_idx, _ = torch.sort(perm[n_test:])
        train = BatchLoader(data, target, train_idx, batch_size=size, shuffle=self.shuffle)
        test = BatchLoader(data, target, test_idx, batch_size=size, shuffle=False)
        return train, test
