"""``LocalJob``: train a plan on one local dataset, the centralised baseline of an experiment.

It runs the very code a node runs (:func:`fedsm.training.runner.train_plan`), with the same
training args and seeding, so "federated vs centralised" compares algorithms, not code
paths. Unlike the seed's ``localJob``, a failure raises :class:`LocalJobError` (with the
original error chained) instead of being logged and ignored, and the trained parameters are
returned, saved as safetensors, and hashed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedsm.errors import FedsmError
from fedsm.training.args import TrainingArgs
from fedsm.training.datasets import describe_csv, describe_tensors
from fedsm.training.params import load_params
from fedsm.training.plan import TorchTrainingPlan
from fedsm.training.runner import RoundResult, evaluate_plan, train_plan

__all__ = ["LocalJob", "LocalJobError", "localJob"]


class LocalJobError(FedsmError):
    """A local (centralised) training run failed; the cause is chained and in the message."""


def dataset_record(path: str | Path, target: str = "target") -> dict[str, Any]:
    """Describe a local dataset file like a node registry would (``.csv`` or safetensors)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return describe_csv(path, target)
    return describe_tensors(path)


class LocalJob:
    """Train ``training_plan_class`` on ``dataset_path`` in this process.

    Parameters
    ----------
    dataset_path
        A numeric CSV (header row, target column ``target``) or a safetensors file with
        ``data`` and ``target`` tensors.
    training_plan_class
        A :class:`~fedsm.training.plan.TorchTrainingPlan` subclass.
    training_args
        Training args (dict or :class:`~fedsm.training.args.TrainingArgs`), validated now.
    model_args
        Passed to the plan's ``init_model``.
    seed
        Seeds initialisation, shuffling and the split: same seed, same output bytes.
    out_dir
        Where ``local_params.safetensors`` is written; default a new temporary directory
        (kept after the run, the caller removes it).
    target
        Target column name for a CSV dataset.

    Raises
    ------
    LocalJobError
        Invalid arguments (at construction) or a failed run (from :meth:`run`).
    """

    def __init__(
        self,
        dataset_path: str | Path,
        training_plan_class: type[TorchTrainingPlan],
        training_args: Mapping[str, Any] | None,
        model_args: Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        out_dir: str | Path | None = None,
        target: str = "target",
    ) -> None:
        if not (
            isinstance(training_plan_class, type)
            and issubclass(training_plan_class, TorchTrainingPlan)
        ):
            raise LocalJobError(
                "training_plan_class must be a TorchTrainingPlan subclass, "
                f"got {training_plan_class!r}"
            )
        try:
            self._training_args = TrainingArgs(training_args)
        except FedsmError as exc:
            raise LocalJobError(f"invalid training args: {exc}") from exc
        self.dataset_path = Path(dataset_path)
        self.training_plan_class = training_plan_class
        self.model_args = dict(model_args or {})
        self.seed = seed
        self.target = target
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.params_path: Path | None = None
        self.params_sha256: str | None = None
        self.result: RoundResult | None = None

    @property
    def training_args(self) -> TrainingArgs:
        """The validated training args."""
        return self._training_args

    def run(self) -> dict[str, torch.Tensor]:
        """Train once; save the parameters; return them (name -> tensor).

        After it returns, ``params_path``, ``params_sha256`` and ``result`` (losses and
        metrics, as a node's :class:`~fedsm.training.runner.RoundResult`) are set.

        Raises
        ------
        LocalJobError
            The dataset, plan, args or training failed; the cause is chained.
        """
        if self.out_dir is None:
            self.out_dir = Path(tempfile.mkdtemp(prefix="fedsm-localjob-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out_path = self.out_dir / "local_params.safetensors"
        try:
            record = dataset_record(self.dataset_path, self.target)
            result = train_plan(
                self.training_plan_class,
                model_args=self.model_args,
                training_args=self._training_args,
                params_path=None,
                dataset=record,
                seed=self.seed,
                out_path=out_path,
            )
            params = load_params(out_path)
        except FedsmError as exc:
            raise LocalJobError(
                f"local training on {str(self.dataset_path)!r} failed: {exc}"
            ) from exc
        self.result = result
        self.params_path = out_path
        self.params_sha256 = result.params_sha256
        return params

    def evaluate(self, dataset_path: str | Path) -> dict[str, float]:
        """Evaluate the trained parameters on another dataset file (e.g. a held-out test CSV).

        Raises
        ------
        LocalJobError
            :meth:`run` has not succeeded yet, or evaluation failed.
        """
        if self.params_path is None:
            raise LocalJobError("nothing to evaluate: call run() first")
        try:
            return evaluate_plan(
                self.training_plan_class,
                model_args=self.model_args,
                training_args=self._training_args,
                params_path=self.params_path,
                dataset=dataset_record(dataset_path, self.target),
            )
        except FedsmError as exc:
            raise LocalJobError(f"evaluation on {str(dataset_path)!r} failed: {exc}") from exc


localJob = LocalJob
"""The seed's (Fed-BioMed) name for :class:`LocalJob`."""
