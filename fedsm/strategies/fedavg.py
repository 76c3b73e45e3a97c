"""Federated averaging: a pure function, a streaming accumulator, and the FedAvg aggregator.

The result of a round must be bit-identical whatever order the node replies arrived in,
because the auditor's ``replay --verify`` and a restored job recompute it. Floating-point
addition is not associative, so the order of summation is fixed: **sorted node ids**.

- :func:`fedavg` takes updates in any order and sorts them.
- :class:`FedAvgAccumulator` keeps one float64 running sum (memory for one model, not K) and
  *requires* ``add`` calls in strictly increasing node-id order; an out-of-order or repeated
  id raises :class:`AggregationError` rather than silently producing different bits. Callers
  that hold files (the usual case) sort first, as :meth:`FedAvg.aggregate_files` does.

Arithmetic: each tensor is accumulated as ``sum_i(w_i * float64(p_i))`` and divided by
``sum_i(w_i)`` (a float64 sum in the same order), then cast back to the parameter's dtype
(integer buffers are rounded first). Weights are the nodes' training sample counts.

:class:`FedAvg` is the :class:`~fedsm.strategies.base.Strategy` built on the accumulator;
other strategies reuse :class:`FedAvgAccumulator` for their weighted means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from fedsm.strategies.base import (
    AggregateContext,
    AggregateResult,
    AggregationError,
    Strategy,
    register,
)
from fedsm.training.params import ParamsFileError, check_like, load_params, save_params

__all__ = ["AggregationError", "FedAvg", "FedAvgAccumulator", "fedavg"]


def _check_weight(node_id: str, weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise AggregationError(
            f"weight of node {node_id!r} must be a number, got {type(weight).__name__}"
        )
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise AggregationError(f"weight of node {node_id!r} must be finite and >= 0, got {weight}")
    return value


class FedAvgAccumulator:
    """Streaming weighted mean of parameter dicts, added in strictly increasing node-id order.

    Example
    -------
    >>> acc = FedAvgAccumulator()
    >>> for node_id, params, n in sorted(updates):   # doctest: +SKIP
    ...     acc.add(node_id, params, n)
    >>> mean = acc.result()                          # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self._total = 0.0
        self._last_id: str | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """Number of updates added."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights added so far."""
        return self._total

    def add(self, node_id: str, params: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add one node's parameters with its weight (sample count).

        Raises
        ------
        AggregationError
            ``node_id`` not greater than the previous one, a bad weight, non-tensor values, or
            names/shapes/dtypes differing from the first update. The accumulator is left
            unchanged when this is raised.
        """
        if not isinstance(node_id, str):
            raise AggregationError(f"node ids must be str, got {type(node_id).__name__}")
        if self._last_id is not None and node_id <= self._last_id:
            raise AggregationError(
                f"updates must be added in strictly increasing node-id order (canonical order "
                f"for bit-identical results): {node_id!r} came after {self._last_id!r}"
            )
        w = _check_weight(node_id, weight)
        for name, value in params.items():
            if not isinstance(value, torch.Tensor):
                raise AggregationError(
                    f"node {node_id!r}: parameter {name!r} is {type(value).__name__}, not a tensor"
                )
            if value.is_complex():
                raise AggregationError(f"node {node_id!r}: complex parameter {name!r} unsupported")
        if self._sums is None:
            if not params:
                raise AggregationError(f"node {node_id!r} sent no parameters")
            self._dtypes = {name: params[name].dtype for name in params}
            sums = {
                name: torch.zeros(tuple(t.shape), dtype=torch.float64) for name, t in params.items()
            }
        else:
            like = {
                name: torch.empty(tuple(self._sums[name].shape), dtype=self._dtypes[name])
                for name in self._sums
            }
            try:
                check_like(params, like, source=f"update of node {node_id!r}")
            except ParamsFileError as exc:
                raise AggregationError(str(exc)) from None
            sums = self._sums
        for name in sorted(sums):
            sums[name].add_(params[name].detach().to("cpu", torch.float64), alpha=w)
        self._sums = sums
        self._total += w
        self._last_id = node_id
        self._count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """Return the weighted mean, each tensor in its original dtype.

        Raises
        ------
        AggregationError
            No update was added, or all weights were zero.
        """
        if self._sums is None:
            raise AggregationError("no update to aggregate (the set of replies is empty)")
        if self._total == 0.0:
            raise AggregationError(
                f"all {self._count} updates have weight 0: nothing to average (did every node "
                "train on 0 samples?)"
            )
        out: dict[str, torch.Tensor] = {}
        for name in sorted(self._sums):
            mean = self._sums[name] / self._total
            dtype = self._dtypes[name]
            if dtype == torch.bool:
                out[name] = mean >= 0.5
            elif not dtype.is_floating_point:
                out[name] = torch.round(mean).to(dtype)
            else:
                out[name] = mean.to(dtype)
        return out


def fedavg(
    updates: Iterable[tuple[str, Mapping[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor]:
    """Weighted mean of ``(node_id, params, weight)`` updates, summed in sorted node-id order.

    Raises
    ------
    AggregationError
        Empty input, duplicate node ids, all-zero weights, or mismatched tensors.
    """
    items = list(updates)
    ids = [item[0] for item in items]
    if len(set(ids)) != len(ids):
        raise AggregationError(f"duplicate node ids among updates: {sorted(ids)}")
    acc = FedAvgAccumulator()
    for node_id, params, weight in sorted(items, key=lambda item: item[0]):
        acc.add(node_id, params, weight)
    return acc.result()


@register
class FedAvg(Strategy):
    """Federated averaging weighted by sample counts (McMahan et al., 2017). Nodes get no
    arguments; the aggregate streams one reply at a time through :class:`FedAvgAccumulator`."""

    name = "fedavg"

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        """Weighted mean of the replies, summed in sorted node order."""
        acc = FedAvgAccumulator()
        for update in ctx.updates:
            acc.add(update.node_id, update.params(), update.weight)
        return AggregateResult(acc.result())

    def aggregate_files(
        self,
        items: Sequence[tuple[str, Path, float]],
        out_path: Path,
        *,
        like: Mapping[str, torch.Tensor] | None = None,
    ) -> str:
        """FedAvg of ``(node_id, params_path, weight)`` files written to ``out_path``; its
        sha256. A convenience for tools and tests; jobs and audits go through
        :func:`fedsm.strategies.base.aggregate_files`, which runs :meth:`aggregate`.

        Raises
        ------
        AggregationError
            Empty set, duplicate node ids, all-zero weights, mismatched updates.
        ParamsFileError
            A file is unreadable or not valid safetensors.
        """
        ordered = sorted(items, key=lambda item: item[0])
        ids = [item[0] for item in ordered]
        if len(set(ids)) != len(ids):
            raise AggregationError(f"duplicate node ids among updates: {ids}")
        if not ordered:
            raise AggregationError("no update to aggregate (the set of replies is empty)")
        acc = FedAvgAccumulator()
        for node_id, path, weight in ordered:
            _check_weight(node_id, weight)
            acc.add(node_id, load_params(path, like=like), weight)
        return save_params(Path(out_path), acc.result())
