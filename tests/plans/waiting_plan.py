"""A plan whose training waits (bounded) until a release file exists: keeps a node busy."""

import pathlib
import time

from torch import nn

from fedsm.training.plan import TorchTrainingPlan


class WaitingPlan(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["in_features"], 1)

    def training_step(self, data, target):
        deadline = time.monotonic() + 60
        while not pathlib.Path("MARKER_PATH").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        output = self.model()(data).reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(output, target.float())
