"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", option II), the researcher's half, matched to Fed-BioMed's researcher-side
``Scaffold(server_lr=...)`` (``fedbiomed/researcher/aggregators/scaffold.py``: ``aggregate``,
``update_correction_states``, ``create_aggregator_args``).

Notation: ``x`` the global parameters of the round, ``y_i`` node i's parameters after its
``K_i`` optimizer steps (``num_updates``) at learning rate ``lr_i`` (``lr``), ``c`` the server
control variate, ``c_i`` node i's, ``S`` the replying nodes, ``N`` every node of the job.

- Before the first aggregation ``c = c_i = 0`` (Fed-BioMed's ``init_correction_states``).
- Each node of a round gets ``{"aggregator_correction": {param: c - c_i}}`` (a tensor dict:
  it travels as a file) and adds it to each parameter's gradient before every optimizer step,
  ``y <- y - lr (g(y) + c - c_i)``. Fed-BioMed sends ``delta_i = c_i - c`` and the node
  *subtracts* it (``param.grad.sub_(correction)`` in its torch training plan): the same step.
- ``x <- x + server_lr / |S| * sum_{i in S} (y_i - x)``: an **unweighted** mean over the
  replies, as Fed-BioMed (``global_new = x - (x - y_i summed) * server_lr / len(replies)``;
  its sample-count ``weights`` are "Unused for Scaffold") and the paper's Algorithm 1 do.
- For each replying node ``c_i <- c_i - c + (x - y_i) / (K_i * lr_i)`` (Fed-BioMed:
  ``c_i = delta_i + (x - y_i) / (lr_i * K)``, option II of the paper); a node that did not
  reply keeps its ``c_i``.
- ``c <- 1/N * sum_{i in N} c_i`` over every node of the job (a node that never replied
  counts as 0), as Fed-BioMed's ``global_state = sum(nodes_states) / len(nodes_states)``.

Differences from Fed-BioMed, all deliberate: ``K_i`` and ``lr_i`` come from each reply
(``num_updates``, ``lr``: the optimizer's first param group) instead of one round-wide
``n_updates`` and per-layer learning rates; the state is not kept in the aggregator object
but returned as tensors (``c/<param>``, ``ci/<node_id>/<param>``, float64), recorded by
digest and handed back next round, so a restored job and the audit get the same bits; all
arithmetic is float64 in sorted node order, cast back to each parameter's dtype.

Only floating-point parameters have control variates. Integer and bool buffers (e.g.
``num_batches_tracked``) are FedAvg's sample-weighted mean, rounded
(:class:`~fedsm.strategies.fedavg.FedAvgAccumulator`).

Node ids must not contain ``/`` (they are part of the state's keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsm.strategies.base import (
    AggregateContext,
    AggregateResult,
    AggregationError,
    MissingReplyData,
    NodeArgsContext,
    NodeUpdate,
    Strategy,
    StrategyError,
    check_number,
    register,
)
from fedsm.strategies.fedavg import FedAvgAccumulator
from fedsm.training.params import ParamsFileError, check_like

__all__ = ["Scaffold"]

_F64 = torch.float64


def _check_node_ids(node_ids: tuple[str, ...] | list[str]) -> None:
    for node in node_ids:
        if not node or "/" in node:
            raise StrategyError(
                f"Scaffold keeps per-node state under 'ci/<node_id>/<param>': node id {node!r} "
                "must be non-empty and contain no '/'"
            )


def _params_of(update: NodeUpdate, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = update.params()
    try:
        check_like(params, like, source=f"update of node {update.node_id!r}")
    except ParamsFileError as exc:
        raise AggregationError(str(exc)) from None
    return params


@register
class Scaffold(Strategy):
    """SCAFFOLD's server side: control variates kept as state, corrections sent as files.

    Parameters
    ----------
    server_lr
        The server (global) learning rate ``eta_g``, finite and ``> 0`` (1.0: the new global
        model is the replies' unweighted mean).

    Raises
    ------
    StrategyError
        ``server_lr`` not a finite number ``> 0``.
    """

    name = "scaffold"
    node_symmetric = False
    required_extras = ("num_updates", "lr")

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = check_number("Scaffold", "server_lr", server_lr, low=0.0, low_open=True)

    def config(self) -> dict[str, Any]:
        """``{"server_lr": server_lr}``."""
        return {"server_lr": self.server_lr}

    def check_update(self, update: NodeUpdate) -> None:
        """Refuse a reply without ``num_updates`` (a positive integer) and ``lr`` (> 0).

        Raises
        ------
        MissingReplyData
            Either is missing, not finite, or out of range: that node fails the round.
        """
        super().check_update(update)
        steps = float(update.extras["num_updates"])
        lr = float(update.extras["lr"])
        if steps < 1 or steps != int(steps):
            raise MissingReplyData(
                f"scaffold needs a positive integer 'num_updates' in the reply of "
                f"{update.node_id}, got {update.extras['num_updates']!r}"
            )
        if lr <= 0:
            raise MissingReplyData(
                f"scaffold needs 'lr' > 0 in the reply of {update.node_id}, got "
                f"{update.extras['lr']!r}"
            )

    # ------------------------------------------------------------------ state

    @staticmethod
    def _floats(global_params: Mapping[str, torch.Tensor]) -> list[str]:
        return sorted(name for name, t in global_params.items() if t.is_floating_point())

    def _read_state(
        self,
        state: Mapping[str, torch.Tensor] | None,
        global_params: Mapping[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """``(c, {node: c_i})`` in float64; zeros for ``c`` when there is no state yet."""
        floats = self._floats(global_params)
        c = {name: torch.zeros(tuple(global_params[name].shape), dtype=_F64) for name in floats}
        ci: dict[str, dict[str, torch.Tensor]] = {}
        if state is None:
            return c, ci
        seen_c: set[str] = set()
        for key in sorted(state):
            kind, _, rest = key.partition("/")
            if kind == "c":
                node, param = None, rest
            elif kind == "ci" and "/" in rest:
                node, _, param = rest.partition("/")
            else:
                raise StrategyError(f"Scaffold state has an unknown key {key!r}")
            if param not in c:
                raise StrategyError(
                    f"Scaffold state key {key!r} names no floating-point parameter of the model"
                )
            value = state[key]
            if tuple(value.shape) != tuple(c[param].shape):
                raise StrategyError(
                    f"Scaffold state {key!r} has shape {list(value.shape)}, the model's "
                    f"{param!r} has {list(c[param].shape)}"
                )
            value = value.detach().to("cpu", _F64)
            if node is None:
                c[param] = value
                seen_c.add(param)
            else:
                ci.setdefault(node, {})[param] = value
        if seen_c != set(c):
            raise StrategyError(f"Scaffold state lacks c for {sorted(set(c) - seen_c)}")
        for node, variates in ci.items():
            if set(variates) != set(c):
                raise StrategyError(
                    f"Scaffold state of node {node!r} lacks {sorted(set(c) - set(variates))}"
                )
        return c, ci

    # ------------------------------------------------------------------ the two halves

    def node_args(self, ctx: NodeArgsContext) -> dict[str, dict[str, Any]]:
        """Each node of the round: ``{"aggregator_correction": {param: c - c_i}}`` (in the
        parameter's dtype), zeros before the first aggregation."""
        _check_node_ids(list(ctx.node_ids))
        c, ci = self._read_state(ctx.state, ctx.global_params)
        if not c:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for node in ctx.node_ids:
            own = ci.get(node)
            correction = {}
            for name in sorted(c):
                ci_value = own[name] if own is not None else torch.zeros_like(c[name])
                correction[name] = (c[name] - ci_value).to(ctx.global_params[name].dtype)
            out[node] = {"aggregator_correction": correction}
        return out

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        """The new global parameters and control variates (see the module's docstring).

        Raises
        ------
        MissingReplyData
            A reply lacks a valid ``num_updates`` or ``lr``.
        AggregationError
            No reply, a reply from a node outside ``ctx.all_nodes``, mismatched tensors.
        StrategyError
            A node id with ``/``; a state that does not fit the model.
        """
        if not ctx.updates:
            raise AggregationError("no update to aggregate (the set of replies is empty)")
        all_nodes = tuple(sorted(ctx.all_nodes))
        _check_node_ids(list(all_nodes))
        x = ctx.global_params
        floats = self._floats(x)
        others = sorted(name for name in x if name not in set(floats))
        c, ci = self._read_state(ctx.state, x)
        x64 = {name: x[name].detach().to("cpu", _F64) for name in floats}

        deltas = FedAvgAccumulator()  # unweighted mean of (y_i - x), in float64
        buffers = FedAvgAccumulator()  # integer/bool buffers: FedAvg
        new_ci = {node: dict(variates) for node, variates in ci.items()}
        for update in ctx.updates:
            self.check_update(update)
            if update.node_id not in all_nodes:
                raise AggregationError(
                    f"reply from {update.node_id!r}, which is not a node of the job {all_nodes}"
                )
            y = _params_of(update, x)
            steps_lr = float(update.extras["lr"]) * float(update.extras["num_updates"])
            y64 = {name: y[name].detach().to("cpu", _F64) for name in floats}
            if floats:
                deltas.add(update.node_id, {n: y64[n] - x64[n] for n in floats}, 1.0)
            if others:
                buffers.add(update.node_id, {n: y[n] for n in others}, update.weight)
            old = ci.get(update.node_id)
            new_ci[update.node_id] = {
                n: ((old[n] if old is not None else torch.zeros_like(c[n])) - c[n])
                + (x64[n] - y64[n]) / steps_lr
                for n in floats
            }

        params: dict[str, torch.Tensor] = {}
        if floats:
            mean_delta = deltas.result()
            for name in floats:
                params[name] = (x64[name] + self.server_lr * mean_delta[name]).to(x[name].dtype)
        if others:
            params.update(buffers.result())

        new_c = {}
        for name in floats:
            total = torch.zeros_like(c[name])
            for node in all_nodes:
                if node in new_ci:
                    total = total + new_ci[node][name]
            new_c[name] = total / len(all_nodes)

        state: dict[str, torch.Tensor] = {f"c/{name}": new_c[name] for name in floats}
        for node in sorted(new_ci):
            for name in floats:
                state[f"ci/{node}/{name}"] = new_ci[node][name]
        return AggregateResult(dict(sorted(params.items())), state or None)
