"""Robust aggregation: coordinate-wise median and trimmed mean of the replies, unweighted.

A consortium that does not trust every site bounds what one node can do to the global model:
for each coordinate, the **median** of the n replies' values (with n even, the mean of the
two middle ones, as ``numpy.median`` in Flower's ``aggregate_median``: ``torch.median``
returns the lower one and is not used), or the **trimmed mean**: sort the n values, drop
``floor(beta * n)`` from each end, average the rest (``scipy.stats.trim_mean``, Flower's
``aggregate_trimmed_avg`` / ``FedTrimmedAvg``, ``flwr/server/strategy/aggregate.py``).
Sample counts are ignored: weighting by them would let one node claiming many samples move
the result.

Arithmetic: float64, values sorted per coordinate (so the order of the replies can not
matter), sums over the sorted values in increasing order, ``+ 0.0`` to fold ``-0.0`` into
``0.0`` (two zeros of either sign compare equal, so which one sorting puts in the middle
could otherwise depend on who sent it), then cast back to each parameter's dtype. Integer
and bool buffers go through the same rule and are cast back as FedAvg does (rounded;
bool: ``>= 0.5``).

Not streaming: every reply's parameters are held at once (n models in float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsm.strategies.base import (
    AggregateContext,
    AggregateResult,
    AggregationError,
    NodeUpdate,
    Strategy,
    check_number,
    register,
)
from fedsm.training.params import ParamsFileError, check_like

__all__ = ["FedMedian", "FedTrimmedMean", "coordinate_median", "coordinate_trimmed_mean"]

_F64 = torch.float64


def _cast_back(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 result in ``dtype``, as :meth:`FedAvgAccumulator.result` casts."""
    if dtype == torch.bool:
        return value >= 0.5
    if not dtype.is_floating_point:
        return torch.round(value).to(dtype)
    return value.to(dtype)


def _sorted_values(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The n tensors stacked in float64 along a new first axis, sorted along it."""
    stacked = torch.stack([t.detach().to("cpu", _F64) for t in tensors])
    return torch.sort(stacked, dim=0).values


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median in float64 (n even: the mean of the two middle values)."""
    values = _sorted_values(tensors)
    n = values.shape[0]
    if n % 2:
        middle = values[n // 2]
    else:
        middle = (values[n // 2 - 1] + values[n // 2]) / 2.0
    return middle + 0.0


def coordinate_trimmed_mean(tensors: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping ``floor(beta * n)`` values from each end, float64."""
    values = _sorted_values(tensors)
    n = values.shape[0]
    cut = int(beta * n)  # as scipy.stats.trim_mean and Flower's _trim_mean
    if n - 2 * cut < 1:
        raise AggregationError(f"trimming {cut} of {n} values from each end leaves none")
    total = values[cut].clone()
    for j in range(cut + 1, n - cut):
        total = total + values[j]
    return total / float(n - 2 * cut) + 0.0


def _all_params(ctx: AggregateContext) -> list[dict[str, torch.Tensor]]:
    if not ctx.updates:
        raise AggregationError("no update to aggregate (the set of replies is empty)")
    out = []
    for update in ctx.updates:
        out.append(_params_of(update, ctx.global_params))
    return out


def _params_of(update: NodeUpdate, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = update.params()
    try:
        check_like(params, like, source=f"update of node {update.node_id!r}")
    except ParamsFileError as exc:
        raise AggregationError(str(exc)) from None
    return params


@register
class FedMedian(Strategy):
    """Coordinate-wise median of the replies (Yin et al., 2018), unweighted. Nodes get no
    arguments; no state."""

    name = "fedmedian"

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        """The median of each coordinate over the replies.

        Raises
        ------
        AggregationError
            No reply, mismatched tensors.
        """
        replies = _all_params(ctx)
        params = {
            name: _cast_back(coordinate_median([p[name] for p in replies]), t.dtype)
            for name, t in sorted(ctx.global_params.items())
        }
        return AggregateResult(params)


@register
class FedTrimmedMean(Strategy):
    """Coordinate-wise trimmed mean of the replies (Yin et al., 2018), unweighted.

    Parameters
    ----------
    beta
        Fraction cut from each end, in ``[0, 0.5)``: ``floor(beta * n)`` of the n values of
        each coordinate are dropped at each end (0: the plain unweighted mean).

    Raises
    ------
    StrategyError
        ``beta`` outside ``[0, 0.5)`` or not a number.
    """

    name = "fedtrimmedmean"

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = check_number("FedTrimmedMean", "beta", beta, low=0.0, high=0.5, high_open=True)

    def config(self) -> dict[str, Any]:
        """``{"beta": beta}``."""
        return {"beta": self.beta}

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        """The trimmed mean of each coordinate over the replies.

        Raises
        ------
        AggregationError
            No reply, mismatched tensors.
        """
        replies = _all_params(ctx)
        params = {
            name: _cast_back(
                coordinate_trimmed_mean([p[name] for p in replies], self.beta), t.dtype
            )
            for name, t in sorted(ctx.global_params.items())
        }
        return AggregateResult(params)
