"""Demo training plan for the bundled Wisconsin breast-cancer data (``fedsm.data``).

Logistic regression (or, with ``model_args={"hidden": h}``, a one-hidden-layer MLP) on the 30
features, predicting ``target`` (1 = benign, 0 = malignant) with a logistic loss.

Feature scaling is a FIXED transform, the same on every node: ``log1p``, then an affine map of
the published per-feature range (the min/max table in the data set's documentation, as
shipped with scikit-learn) onto [-1, 1]. Nothing is fitted to any node's data, so:

- every node and the researcher see the same function of the raw features, and FedAvg of
  the weights means what it says (per-node standardisation would give each node its own
  input space, and the average of their weights would fit none of them);
- no statistic of one hospital's data leaks into the model.

The constants and the model class live inside the plan class so that ``save_code`` (class
source + imports) is self-contained. The scaling constants are non-persistent buffers: they
are not parameters, never travel and are never averaged.

Suggested training args: ``{"lr": 0.5, "epochs": 30, "batch_size": 32}`` (see
``BreastCancerPlan.SUGGESTED_TRAINING_ARGS``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsm.training.plan import TorchTrainingPlan

__all__ = ["BreastCancerPlan"]


class BreastCancerPlan(TorchTrainingPlan):
    """Logistic regression / small MLP for the breast-cancer demo, with fixed feature scaling."""

    SUGGESTED_TRAINING_ARGS = {"lr": 0.5, "epochs": 30, "batch_size": 32}

    # Published min / max of the 30 features (scikit-learn's DESCR table, 3 decimals), in
    # column order: mean x10, standard error x10, worst x10.
    FEATURE_MIN = (
        6.981, 9.71, 43.79, 143.5, 0.053, 0.019, 0.0, 0.0, 0.106, 0.05,
        0.112, 0.36, 0.757, 6.802, 0.002, 0.002, 0.0, 0.0, 0.008, 0.001,
        7.93, 12.02, 50.41, 185.2, 0.071, 0.027, 0.0, 0.0, 0.156, 0.055,
    )  # fmt: skip
    FEATURE_MAX = (
        28.11, 39.28, 188.5, 2501.0, 0.163, 0.345, 0.427, 0.201, 0.304, 0.097,
        2.873, 4.885, 21.98, 542.2, 0.031, 0.135, 0.396, 0.053, 0.079, 0.03,
        36.04, 49.54, 251.2, 4254.0, 0.223, 1.058, 1.252, 0.291, 0.664, 0.208,
    )  # fmt: skip

    class Model(nn.Module):
        """Fixed log/range scaling to [-1, 1], then a linear layer or a small MLP -> logit."""

        def __init__(self, low: tuple, high: tuple, hidden: int) -> None:
            super().__init__()
            low_t = torch.log1p(torch.tensor(low, dtype=torch.float32))
            high_t = torch.log1p(torch.tensor(high, dtype=torch.float32))
            self.register_buffer("offset", low_t, persistent=False)
            self.register_buffer("span", high_t - low_t, persistent=False)
            n = len(low)
            if hidden > 0:
                self.net = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            else:
                self.net = nn.Linear(n, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = 2.0 * (torch.log1p(torch.clamp(x, min=0.0)) - self.offset) / self.span - 1.0
            return self.net(z).squeeze(-1)

    def init_dependencies(self) -> list[str]:
        """The plan uses ``F`` (torch.nn.functional) besides the implied torch imports."""
        return ["import torch.nn.functional as F"]

    def init_model(self, model_args: dict) -> nn.Module:
        """``model_args``: ``hidden`` (0 = logistic regression), ``n_features`` (must be 30)."""
        n_features = int(model_args.get("n_features", len(self.FEATURE_MIN)))
        if n_features != len(self.FEATURE_MIN):
            raise ValueError(
                f"BreastCancerPlan expects {len(self.FEATURE_MIN)} features, got {n_features}"
            )
        hidden = int(model_args.get("hidden", 0))
        return self.Model(self.FEATURE_MIN, self.FEATURE_MAX, hidden)

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy on the logits."""
        return F.binary_cross_entropy_with_logits(self.model()(data), target.float())
