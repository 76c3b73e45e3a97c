"""Plans that misbehave while training: raise, hang, or kill the process running them."""

import os
import signal
import time

from torch import nn

from fedsm.training.plan import TorchTrainingPlan


class _Base(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["in_features"], 1)


class RaisingPlan(_Base):
    def training_step(self, data, target):
        raise RuntimeError("this plan always fails")


class HangingPlan(_Base):
    def training_step(self, data, target):
        time.sleep(3600)


class ExitingPlan(_Base):
    def training_step(self, data, target):
        os._exit(13)


class SelfKillingPlan(_Base):
    def training_step(self, data, target):
        os.kill(os.getpid(), signal.SIGKILL)


class GoodPlan(_Base):
    def training_step(self, data, target):
        output = self.model()(data).reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(output, target.float())
