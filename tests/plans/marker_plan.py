"""A plan whose import creates a marker file: proof that a node imported (executed) it.

The test replaces MARKER_PATH before use, so each test's plan has its own bytes and digest.
"""

import pathlib

from torch import nn

from fedsm.training.plan import TorchTrainingPlan

pathlib.Path("MARKER_PATH").write_text("imported")


class MarkerPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["in_features"], 1)

    def training_step(self, data, target):
        output = self.model()(data).reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(output, target.float())
