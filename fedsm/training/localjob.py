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
from fedsm.training.loader import PlanImportError, load_plan_class
from fedsm.training.params import load_params
from fedsm.training.plan import TorchTrainingPlan
from fedsm.training.runner import RoundResult, deterministic, evaluate_plan, make_plan, train_plan

__all__ = ["LocalJob", "LocalJobError", "localJob"]


class LocalJobError(FedsmError):
    """A local (centralised) training run failed; the cause is chained and in the message."""


def dataset_record(path: str | Path, target: str = "target") -> dict[str, Any]:
    """Describe a local dataset file like a node registry would (``.csv`` or safetensors)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return describe_csv(path, target)
    return describe_tensors(path)


def _validated_args(training_args: Mapping[str, Any] | None) -> TrainingArgs:
    try:
        return TrainingArgs(training_args)
    except FedsmError as exc:
        raise LocalJobError(f"invalid training args: {exc}") from exc


def _plan_instance(
    plan: type[TorchTrainingPlan] | TorchTrainingPlan | str,
    path: str | Path | None,
) -> TorchTrainingPlan:
    """The plan instance the seed's ``training_plan_class`` / ``training_plan_path`` name."""
    if path is not None:
        if not isinstance(plan, str):
            raise LocalJobError(
                "with training_plan_path, training_plan_class must be the name of the class "
                f"in that file, got {plan!r}"
            )
        path = Path(path)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalJobError(f"cannot read training plan file {str(path)!r}: {exc}") from exc
        try:
            plan = load_plan_class(source, plan)
        except PlanImportError as exc:
            raise LocalJobError(f"cannot import class {plan!r} from {str(path)!r}: {exc}") from exc
    elif isinstance(plan, str):
        raise LocalJobError(
            f"training_plan_class {plan!r} is a class name: give training_plan_path, the file "
            "that defines it (or pass the class itself)"
        )
    if isinstance(plan, TorchTrainingPlan):
        return plan
    if isinstance(plan, type) and issubclass(plan, TorchTrainingPlan):
        try:
            return plan()
        except Exception as exc:  # noqa: BLE001 - plan code may raise anything
            raise LocalJobError(
                f"cannot instantiate {plan.__name__}: {type(exc).__name__}: {exc}"
            ) from exc
    raise LocalJobError(
        "training_plan_class must be a TorchTrainingPlan subclass, an instance of one, or a "
        f"class name with training_plan_path; got {plan!r}"
    )


class LocalJob:
    """Train a plan on ``dataset_path`` in this process: the seed's ``localJob``.

    Parameters
    ----------
    dataset_path
        A numeric CSV (header row, target column ``target``) or a safetensors file with
        ``data`` and ``target`` tensors. May be set later (``job.dataset_path = ...``).
    training_plan_class
        A :class:`~fedsm.training.plan.TorchTrainingPlan` subclass, an instance of one, or,
        with ``training_plan_path``, the name of the class in that file (default
        ``"MyTrainingPlan"``, as in the seed).
    training_plan_path
        A ``.py`` file holding the plan class named by ``training_plan_class``. It is
        imported into a fresh module (never through ``sys.path``).
    training_args
        Training args (dict or :class:`~fedsm.training.args.TrainingArgs`), validated now;
        ``None`` means every default, as in the seed.
    model_args
        Passed to the plan's ``init_model``.
    seed
        (Keyword-only, like the two below: fedsm's additions to the seed's arguments.)
        Seeds initialisation, shuffling and the split: same seed, same output bytes.
    out_dir
        Where ``local_params.safetensors`` is written; default a new temporary directory
        (kept after the run, the caller removes it).
    target
        Target column name for a CSV dataset.

    fedsm's earlier order ``LocalJob(dataset_path, plan_class, training_args, model_args)``
    still works: a mapping given in the third place is read as the training args (a plan
    path is a string or a path, never a mapping) and the fourth as the model args.

    The plan is built (``post_init``, seeded with ``seed``) when the job is, so
    :attr:`model` exists before training, as in the seed; :meth:`start_training` (or
    :meth:`run`) trains that plan in place, so afterwards :attr:`model` and
    :attr:`training_plan` are the trained ones.

    Raises
    ------
    LocalJobError
        Invalid arguments, a plan that does not load or build (at construction) or a failed
        run (from :meth:`run`), where the seed logged the error or called ``sys.exit``.
    """

    def __init__(
        self,
        dataset_path: str | Path | None = None,
        training_plan_class: type[TorchTrainingPlan] | TorchTrainingPlan | str = "MyTrainingPlan",
        training_plan_path: str | Path | None = None,
        training_args: Mapping[str, Any] | None = None,
        model_args: Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        out_dir: str | Path | None = None,
        target: str = "target",
    ) -> None:
        if isinstance(training_plan_path, Mapping):  # fedsm's earlier positional order
            if training_args is not None:  # (..., training_args, model_args)
                if model_args is not None:
                    raise LocalJobError(
                        "training args given in place of training_plan_path, then two more "
                        "mappings: pass training_args= and model_args= by name"
                    )
                model_args = training_args
            training_plan_path, training_args = None, training_plan_path
        self._training_args = _validated_args(training_args)
        self.dataset_path = Path(dataset_path) if dataset_path is not None else None
        self.model_args = dict(model_args or {})
        self.seed = seed
        self.target = target
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.params_path: Path | None = None
        self.params_sha256: str | None = None
        self.result: RoundResult | None = None
        self._training_plan = _plan_instance(training_plan_class, training_plan_path)
        try:
            with deterministic(seed):
                make_plan(self._training_plan, self.model_args, self._training_args)
        except FedsmError as exc:
            raise LocalJobError(
                f"cannot build training plan {type(self._training_plan).__name__}: {exc}"
            ) from exc

    @property
    def training_plan_class(self) -> type[TorchTrainingPlan]:
        """The plan's class."""
        return type(self._training_plan)

    @property
    def training_plan(self) -> TorchTrainingPlan:
        """The plan instance this job trains (the trained one after :meth:`run`)."""
        return self._training_plan

    @property
    def model(self) -> torch.nn.Module:
        """The plan's model (``training_plan.model()``), as the seed's ``localJob.model``."""
        return self._training_plan.model()

    @property
    def training_args(self) -> TrainingArgs:
        """The validated training args (defaults filled in)."""
        return self._training_args

    @training_args.setter
    def training_args(self, training_args: Mapping[str, Any] | None) -> None:
        """Validate and set new training args; the next :meth:`run` uses them."""
        self._training_args = _validated_args(training_args)

    def start_training(self) -> dict[str, torch.Tensor]:
        """Train once (the seed's name for :meth:`run`); returns the trained parameters.

        Unlike the seed, a failure raises :class:`LocalJobError` instead of being logged.
        """
        return self.run()

    def run(self) -> dict[str, torch.Tensor]:
        """Train once; save the parameters; return them (name -> tensor).

        After it returns, ``params_path``, ``params_sha256`` and ``result`` (losses and
        metrics, as a node's :class:`~fedsm.training.runner.RoundResult`) are set.

        Raises
        ------
        LocalJobError
            The dataset, plan, args or training failed; the cause is chained.
        """
        if self.dataset_path is None:
            raise LocalJobError("no dataset to train on: set dataset_path first")
        if self.out_dir is None:
            self.out_dir = Path(tempfile.mkdtemp(prefix="fedsm-localjob-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out_path = self.out_dir / "local_params.safetensors"
        try:
            record = dataset_record(self.dataset_path, self.target)
            result = train_plan(
                self._training_plan,
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
                type(self._training_plan),
                model_args=self.model_args,
                training_args=self._training_args,
                params_path=self.params_path,
                dataset=dataset_record(dataset_path, self.target),
            )
        except FedsmError as exc:
            raise LocalJobError(f"evaluation on {str(dataset_path)!r} failed: {exc}") from exc


localJob = LocalJob
"""The seed's (Fed-BioMed) name for :class:`LocalJob`."""
