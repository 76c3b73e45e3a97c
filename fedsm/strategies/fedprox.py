"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg on
the researcher's side, a proximal term on the nodes' side.

Each node adds ``mu / 2 * ||w - w_global||^2`` to its training loss, which keeps a
heterogeneous (non-IID) hospital from drifting far from the global model during its local
steps. The strategy's only job is to tell the nodes ``mu`` (``{"fedprox_mu": mu}`` in every
train request); aggregation is :class:`~fedsm.strategies.fedavg.FedAvg`'s, the same code
path, so ``FedProx(mu=0)`` gives FedAvg's bits (as Flower's ``FedProx``, whose
``aggregate_fit`` is FedAvg's and whose clients read ``proximal_mu``).
"""

from __future__ import annotations

from typing import Any

from fedsm.strategies.base import NodeArgsContext, check_number, register
from fedsm.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


@register
class FedProx(FedAvg):
    """FedAvg plus a proximal term ``mu / 2 * ||w - w_global||^2`` in each node's loss.

    Parameters
    ----------
    mu
        Weight of the proximal term, finite and ``>= 0`` (0: plain FedAvg training).

    Raises
    ------
    StrategyError
        ``mu`` negative, not finite or not a number.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = check_number("FedProx", "mu", mu, low=0.0)

    def config(self) -> dict[str, Any]:
        """``{"mu": mu}``."""
        return {"mu": self.mu}

    def node_args(self, ctx: NodeArgsContext) -> dict[str, dict[str, Any]]:
        """Every node of the round gets ``{"fedprox_mu": mu}`` in its train request."""
        return {node: {"fedprox_mu": self.mu} for node in ctx.node_ids}
