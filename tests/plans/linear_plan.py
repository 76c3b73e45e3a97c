"""A tiny logistic-regression plan the node tests train (fast: a few features, few rows)."""

from torch import nn

from fedsm.training.plan import TorchTrainingPlan


class LinearPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["in_features"], 1)

    def training_step(self, data, target):
        output = self.model()(data).reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(output, target.float())
