"""Adaptive server optimisers: FedAdagrad, FedAdam and FedYogi (Reddi et al., 2021,
"Adaptive Federated Optimization", Algorithm 2).

Each round, with ``x`` the global parameters and ``y_i`` node i's::

    delta = sum_i n_i (y_i - x) / sum_i n_i          (FedAvg's sample-count weights)
    m     = beta_1 m + (1 - beta_1) delta             (m starts at 0)
    v     = v + delta^2                               FedAdagrad
    v     = beta_2 v + (1 - beta_2) delta^2           FedAdam
    v     = v - (1 - beta_2) delta^2 sign(v - delta^2)  FedYogi
    x     = x + eta m / (sqrt(v) + tau)

``v`` starts at ``tau^2`` (the paper asks ``v_{-1} >= tau^2``). No bias correction, as in
the paper. Flower (``flwr/server/strategy/fedadam.py``, ``fedyogi.py``, ``fedadagrad.py``,
on ``fedopt.py``) differs in two ways, so the same run gives other numbers there: it starts
``v`` at 0, and its FedAdam (only) multiplies ``eta`` by the bias correction
``sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` (``t`` the server round, from 1). Flower's
FedAdagrad fixes ``beta_1 = 0`` (no momentum) and has no ``beta_2``; here ``beta_1`` is a
hyper-parameter whose default is Flower's 0, so the paper's momentum is available.

Defaults are Flower's: FedAdam and FedAdagrad ``eta=0.1, tau=1e-9`` (``beta_1=0.9,
beta_2=0.99`` for FedAdam); FedYogi ``eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3``.

State (float64, recorded by digest, handed back next round): ``m/<param>`` and
``v/<param>`` per floating-point parameter. Integer and bool buffers are plain FedAvg
(:class:`~fedsm.strategies.fedavg.FedAvgAccumulator`). Arithmetic is float64 in sorted node
order, cast back to each parameter's dtype.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedsm.strategies.base import (
    AggregateContext,
    AggregateResult,
    AggregationError,
    NodeUpdate,
    Strategy,
    StrategyError,
    check_number,
    register,
)
from fedsm.strategies.fedavg import FedAvgAccumulator
from fedsm.training.params import ParamsFileError, check_like

__all__ = ["FedAdagrad", "FedAdam", "FedYogi"]

_F64 = torch.float64


def _params_of(update: NodeUpdate, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = update.params()
    try:
        check_like(params, like, source=f"update of node {update.node_id!r}")
    except ParamsFileError as exc:
        raise AggregationError(str(exc)) from None
    return params


class _FedOpt(Strategy):
    """A server optimiser on the FedAvg pseudo-gradient; subclasses give ``_second_moment``."""

    #: The hyper-parameters, in the order of the constructor.
    _hyper: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        owner = type(self).__name__
        self.eta = check_number(owner, "eta", eta, low=0.0, low_open=True)
        self.beta_1 = check_number(owner, "beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = check_number(owner, "beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.tau = check_number(owner, "tau", tau, low=0.0, low_open=True)

    def config(self) -> dict[str, Any]:
        """The hyper-parameters, by name."""
        return {name: getattr(self, name) for name in self._hyper}

    @abc.abstractmethod
    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """The new ``v`` from the previous one and ``delta^2`` (float64)."""

    def _read_state(
        self, state: Mapping[str, torch.Tensor] | None, floats: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if state is None:
            m = {name: torch.zeros(tuple(t.shape), dtype=_F64) for name, t in floats.items()}
            tau_sq = self.tau * self.tau
            v = {name: torch.full(tuple(t.shape), tau_sq, dtype=_F64) for name, t in floats.items()}
            return m, v
        expected = {f"{kind}/{name}" for kind in ("m", "v") for name in floats}
        if set(state) != expected:
            raise StrategyError(
                f"{type(self).__name__} state does not fit the model: missing "
                f"{sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}"
            )
        out: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
        for kind, moments in zip(("m", "v"), out, strict=True):
            for name, t in floats.items():
                value = state[f"{kind}/{name}"]
                if tuple(value.shape) != tuple(t.shape):
                    raise StrategyError(
                        f"{type(self).__name__} state {kind}/{name} has shape "
                        f"{list(value.shape)}, the model's has {list(t.shape)}"
                    )
                moments[name] = value.detach().to("cpu", _F64)
        return out

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        """One server optimiser step on the weighted mean of the replies' ``y_i - x``.

        Raises
        ------
        AggregationError
            No reply, all-zero weights, mismatched tensors.
        StrategyError
            A state that does not fit the model.
        """
        if not ctx.updates:
            raise AggregationError("no update to aggregate (the set of replies is empty)")
        x = ctx.global_params
        floats = sorted(name for name, t in x.items() if t.is_floating_point())
        others = sorted(name for name in x if not x[name].is_floating_point())
        x64 = {name: x[name].detach().to("cpu", _F64) for name in floats}
        m_prev, v_prev = self._read_state(ctx.state, {name: x[name] for name in floats})

        deltas = FedAvgAccumulator()
        buffers = FedAvgAccumulator()
        for update in ctx.updates:
            y = _params_of(update, x)
            if floats:
                delta = {n: y[n].detach().to("cpu", _F64) - x64[n] for n in floats}
                deltas.add(update.node_id, delta, update.weight)
            if others:
                buffers.add(update.node_id, {n: y[n] for n in others}, update.weight)

        params: dict[str, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        if floats:
            delta = deltas.result()
            for name in floats:
                d = delta[name]
                m = self.beta_1 * m_prev[name] + (1.0 - self.beta_1) * d
                v = self._second_moment(v_prev[name], d * d)
                step = self.eta * m / (torch.sqrt(v) + self.tau)
                params[name] = (x64[name] + step).to(x[name].dtype)
                state[f"m/{name}"] = m
                state[f"v/{name}"] = v
        if others:
            params.update(buffers.result())
        return AggregateResult(dict(sorted(params.items())), dict(sorted(state.items())) or None)


@register
class FedAdagrad(_FedOpt):
    """FedAdagrad: ``v = v + delta^2`` (Reddi et al., 2021).

    Parameters
    ----------
    eta
        Server learning rate, ``> 0``.
    beta_1
        Momentum, in ``[0, 1)``; 0 (Flower's FedAdagrad) uses ``delta`` itself.
    tau
        Adaptivity, ``> 0``; ``v`` starts at ``tau^2``.

    Raises
    ------
    StrategyError
        A hyper-parameter out of range or not a finite number.
    """

    name = "fedadagrad"
    _hyper = ("eta", "beta_1", "tau")

    def __init__(self, eta: float = 0.1, beta_1: float = 0.0, tau: float = 1e-9) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=0.0, tau=tau)

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq


@register
class FedAdam(_FedOpt):
    """FedAdam: ``v = beta_2 v + (1 - beta_2) delta^2``, no bias correction (Reddi et al.,
    2021).

    Parameters
    ----------
    eta
        Server learning rate, ``> 0``.
    beta_1, beta_2
        Moment decays, in ``[0, 1)``.
    tau
        Adaptivity, ``> 0``; ``v`` starts at ``tau^2``.

    Raises
    ------
    StrategyError
        A hyper-parameter out of range or not a finite number.
    """

    name = "fedadam"
    _hyper = ("eta", "beta_1", "beta_2", "tau")

    def __init__(
        self, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-9
    ) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_sq


@register
class FedYogi(_FedOpt):
    """FedYogi: ``v = v - (1 - beta_2) delta^2 sign(v - delta^2)`` (Reddi et al., 2021).

    Parameters
    ----------
    eta
        Server learning rate, ``> 0``.
    beta_1, beta_2
        Moment decays, in ``[0, 1)``.
    tau
        Adaptivity, ``> 0``; ``v`` starts at ``tau^2``.

    Raises
    ------
    StrategyError
        A hyper-parameter out of range or not a finite number.
    """

    name = "fedyogi"
    _hyper = ("eta", "beta_1", "beta_2", "tau")

    def __init__(
        self, eta: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)

    def _second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta_2) * delta_sq * torch.sign(v - delta_sq)
