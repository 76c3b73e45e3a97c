"""What a node executes for a round, and what the researcher runs to seed and evaluate a model.

Every function here is a pure function of its inputs: the same plan source, arguments, params
file, dataset and seed give the same output bytes, whether called in-process, in a worker
process, or from several threads at once. That is what lets an auditor replay a run and a
restored job carry on bit for bit. How:

- torch's global RNG (used by model initialisation and dropout) is shared by all threads, so
  seeding and training happen under one module-level lock (:data:`_LOCK`);
- shuffling and the train/test split draw from their own seeded ``torch.Generator``;
- inside the lock torch runs with one intra-op thread and deterministic algorithms on, and
  the previous settings are restored afterwards.

A node reads only the dataset record's own ``path``; plan code is whatever the node approved.
Errors raised by plan code (any exception) are re-raised as :class:`TrainingError` so a node
can report them without knowing the plan.

:func:`validate_round` is a validation-only round (a train request with ``do_training``
False): everything :func:`train_round` does before it trains, then the same
``global_val_*`` metrics, and nothing written.

:func:`train_round`, :func:`validate_round`, :func:`initial_params` and :func:`evaluate`
import the plan for the call only (:func:`~fedsm.training.loader.loaded_plan_class`): a
process simulating 1,000 nodes runs 1,000 imports a round, and none of them may stay in
``sys.modules``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsm.digests import sha256_file, sha256_hex
from fedsm.errors import FedsmError
from fedsm.training.args import TrainingArgs
from fedsm.training.datasets import load_dataset
from fedsm.training.loader import loaded_plan_class
from fedsm.training.loaders import BatchLoader, DataManager
from fedsm.training.params import load_params, params_from_bytes, params_to_bytes, save_params
from fedsm.training.plan import PlanError, TorchTrainingPlan, TrainingError

__all__ = [
    "RoundResult",
    "deterministic",
    "evaluate",
    "evaluate_plan",
    "initial_params",
    "make_plan",
    "train_plan",
    "train_round",
    "validate_plan",
    "validate_round",
]

_LOCK = threading.RLock()


@dataclass(frozen=True)
class RoundResult:
    """Outcome of one local training round.

    Attributes
    ----------
    params_sha256
        sha256 of the params file written to ``out_path``.
    sample_size
        Number of training samples used (after the test split): the FedAvg weight. For a
        validation-only round: the number of samples validated on.
    metrics
        ``train_loss`` (mean of all step losses of the round), ``train_loss_last``; with
        ``test_ratio`` > 0, ``val_<metric>`` after training when ``test_on_local_updates``
        and ``global_val_<metric>`` before training when ``test_on_global_updates``.
    losses
        Per-step training losses.
    """

    params_sha256: str
    sample_size: int
    metrics: dict[str, float] = field(default_factory=dict)
    losses: tuple[float, ...] = ()
    extras: dict[str, float] = field(default_factory=dict)
    #: The new parameters' safetensors bytes when the round was asked to keep them in
    #: memory (``out_path`` None) instead of writing a file; not part of :meth:`to_dict`.
    params_bytes: bytes | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (msgpack/JSON-ready); ``losses`` as a list."""
        out = asdict(self)
        out.pop("params_bytes")
        out["losses"] = list(self.losses)
        return out


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise TrainingError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Hold the module lock, seed torch, force reproducible settings; restore them on exit."""
    _check_seed(seed)
    with _LOCK:
        threads = torch.get_num_threads()
        det = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        rng_state = torch.get_rng_state()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        _seed_torch(seed)
        try:
            yield
        finally:
            torch.set_rng_state(rng_state)
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            torch.set_num_threads(threads)


@functools.cache
def _has_accelerator() -> bool:
    """Whether torch may run on a device other than the CPU here (asked once per process)."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(
        torch.cuda.is_available()
        or (mps is not None and mps.is_available())
        or (xpu is not None and xpu.is_available())
    )


def _seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)``, without its cost where only the CPU exists.

    ``torch.manual_seed`` also queues a seeding of every CUDA device, and while CUDA is not
    initialised that queueing records a Python traceback (about 100 us a call, the largest
    cost of a small model's round). Where no accelerator exists the CPU generator is all
    there is to seed, and seeding it alone draws the same numbers.
    """
    if _has_accelerator():
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


def warm_up() -> None:
    """Pay the one-off costs of the first training now (torch's deterministic-algorithms
    switch imports much of torch on first use): a worker process calls this before it says
    it is ready, so a node's training time limit measures training, not imports."""
    with deterministic(0):
        pass


@contextlib.contextmanager
def _plan_errors() -> Iterator[None]:
    """Turn any non-fedsm exception (from plan code) into a TrainingError."""
    try:
        yield
    except FedsmError:
        raise
    except Exception as exc:  # noqa: BLE001 - plan code may raise anything
        raise TrainingError(f"the training plan raised {type(exc).__name__}: {exc}") from exc


def make_plan(
    plan_cls: type[TorchTrainingPlan] | TorchTrainingPlan,
    model_args: Mapping[str, Any] | None,
    training_args: Mapping[str, Any] | None,
) -> TorchTrainingPlan:
    """Instantiate and ``post_init`` a plan (call inside :func:`deterministic` for seeding).

    Given an instance instead of a class, ``post_init`` that instance (its model and
    optimiser are rebuilt) and return it.
    """
    if isinstance(plan_cls, TorchTrainingPlan):
        plan = plan_cls
    elif isinstance(plan_cls, type) and issubclass(plan_cls, TorchTrainingPlan):
        plan = None
    else:
        raise PlanError(f"{plan_cls!r} is not a TorchTrainingPlan subclass or instance")
    with _plan_errors():
        if plan is None:
            plan = plan_cls()
        plan.post_init(dict(model_args or {}), TrainingArgs(training_args))
    return plan


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def _prepare_round(
    plan_cls: type[TorchTrainingPlan] | TorchTrainingPlan,
    *,
    model_args: Mapping[str, Any] | None,
    args: TrainingArgs,
    params: Path | bytes | None,
    dataset: Mapping[str, Any],
    seed: int,
) -> tuple[TorchTrainingPlan, BatchLoader, BatchLoader | None]:
    """The start every round shares (call inside :func:`deterministic` and
    :func:`_plan_errors`): build the plan, load the params, load the dataset, split it.

    Returns the plan and its (train, test) loaders, also set on the plan.
    """
    plan = make_plan(plan_cls, model_args, args)
    if isinstance(params, bytes):
        like = plan.model().state_dict()
        plan.set_params(params_from_bytes(params, like, source="the round's parameters"))
    elif params is not None:
        plan.set_params(load_params(params, like=plan.model().state_dict()))
    plan.dataset = load_dataset(dataset)
    manager = plan.training_data()
    if not isinstance(manager, DataManager):
        raise PlanError(
            f"{type(plan).__name__}.training_data must return a DataManager, "
            f"got {type(manager).__name__}"
        )
    split_seed = args["random_seed"] if args["random_seed"] is not None else seed
    train, test = manager.split(args["test_ratio"], seed=split_seed, batch_size=args["batch_size"])
    plan.training_data_loader, plan.testing_data_loader = train, test
    return plan, train, test


def _global_validation(plan: TorchTrainingPlan, loader: BatchLoader) -> dict[str, float]:
    """The received parameters' metrics on ``loader``, named ``global_val_<metric>``."""
    return {f"global_val_{name}": value for name, value in plan.testing_routine(loader).items()}


def train_plan(
    plan_cls: type[TorchTrainingPlan] | TorchTrainingPlan,
    *,
    model_args: Mapping[str, Any] | None,
    training_args: Mapping[str, Any] | None,
    params_path: Path | bytes | None,
    dataset: Mapping[str, Any],
    seed: int,
    out_path: Path | None,
    aggregator_args: Mapping[str, Any] | None = None,
    durable: bool = True,
) -> RoundResult:
    """Train ``plan_cls`` for one round and write its parameters; see :func:`train_round`.

    ``params_path`` None starts from the plan's own seeded initialisation (LocalJob); bytes
    are the parameters themselves (safetensors). ``out_path`` None keeps the new parameters
    in memory (:attr:`RoundResult.params_bytes`) instead of writing a file; ``durable``
    False writes it without fsync (a scratch file that an upload makes durable).
    ``plan_cls`` may be a plan instance (LocalJob): it is ``post_init``-ed again (seeded)
    and trained in place.
    """
    args = TrainingArgs(training_args)
    with deterministic(seed), _plan_errors():
        plan, train, test = _prepare_round(
            plan_cls,
            model_args=model_args,
            args=args,
            params=params_path,
            dataset=dataset,
            seed=seed,
        )
        plan.aggregator_args = dict(aggregator_args or {})
        metrics: dict[str, float] = {}
        if test is not None and args["test_on_global_updates"]:
            metrics.update(_global_validation(plan, test))
        generator = torch.Generator().manual_seed(seed)
        losses = plan.training_routine(generator=generator)
        if test is not None and args["test_on_local_updates"]:
            for name, value in plan.testing_routine(test).items():
                metrics[f"val_{name}"] = value
        metrics["train_loss"] = _mean(losses)
        metrics["train_loss_last"] = losses[-1] if losses else float("nan")
        if out_path is None:
            payload: bytes | None = params_to_bytes(plan.get_params())
            sha = sha256_hex(payload)
        else:
            payload = None
            sha = save_params(out_path, plan.get_params(), durable=durable)
    return RoundResult(
        params_sha256=sha,
        params_bytes=payload,
        sample_size=train.sample_count,
        metrics=dict(sorted(metrics.items())),
        losses=tuple(losses),
        extras={str(k): float(v) for k, v in sorted(plan.reply_extras.items())},
    )


def validate_plan(
    plan_cls: type[TorchTrainingPlan],
    *,
    model_args: Mapping[str, Any] | None,
    training_args: Mapping[str, Any] | None,
    params_path: Path | bytes,
    dataset: Mapping[str, Any],
    seed: int,
) -> RoundResult:
    """Validate the params at ``params_path`` (or these safetensors bytes) without
    training; see :func:`validate_round`."""
    args = TrainingArgs(training_args)
    with deterministic(seed), _plan_errors():
        plan, train, test = _prepare_round(
            plan_cls,
            model_args=model_args,
            args=args,
            params=params_path,
            dataset=dataset,
            seed=seed,
        )
        loader = test if test is not None else train
        metrics = _global_validation(plan, loader)
    return RoundResult(
        params_sha256=(
            sha256_hex(params_path) if isinstance(params_path, bytes) else sha256_file(params_path)
        ),
        sample_size=loader.sample_count,
        metrics=dict(sorted(metrics.items())),
    )


def train_round(
    *,
    plan_source: str,
    plan_class: str,
    model_args: dict[str, Any],
    training_args: dict[str, Any],
    params_path: Path | bytes,
    dataset: Mapping[str, Any],
    seed: int,
    out_path: Path | None,
    aggregator_args: Mapping[str, Any] | None = None,
    aggregator_files: Mapping[str, str] | None = None,
    durable: bool = True,
) -> RoundResult:
    """Run one node-side training round: import the plan, load params, train, save params.

    Parameters
    ----------
    plan_source, plan_class
        The approved plan source and the class to instantiate from it.
    model_args, training_args
        As sent by the researcher (training args are validated here).
    params_path
        Global parameters of the round (a safetensors file, or its bytes), checked against
        the model.
    dataset
        The node registry record (``data_type``, ``path``, ``target``, ``sample_count``...).
    seed
        Seed of this (job, round, node): initialisation, shuffling, split (unless the
        training args fix ``random_seed``).
    out_path
        Where the updated parameters are written (atomically; without fsync when
        ``durable`` is False); None: kept in memory as :attr:`RoundResult.params_bytes`.
    aggregator_args, aggregator_files
        The strategy's values for this node, and its files (safetensors, already checked
        against their digests), loaded as tensors: together ``plan.aggregator_args``.

    Raises
    ------
    PlanImportError, TrainingArgsError, ParamsFileError, DatasetError, PlanError, TrainingError
        All :class:`~fedsm.errors.FedsmError`; plan exceptions arrive as ``TrainingError``.
    """
    sent = dict(aggregator_args or {})
    for name, path in sorted((aggregator_files or {}).items()):
        sent[name] = load_params(Path(path))
    with loaded_plan_class(plan_source, plan_class) as plan_cls:
        return train_plan(
            plan_cls,
            model_args=model_args,
            training_args=training_args,
            params_path=_as_params(params_path),
            dataset=dataset,
            seed=seed,
            out_path=None if out_path is None else Path(out_path),
            aggregator_args=sent,
            durable=durable,
        )


def validate_round(
    *,
    plan_source: str,
    plan_class: str,
    model_args: dict[str, Any],
    training_args: dict[str, Any],
    params_path: Path | bytes,
    dataset: Mapping[str, Any],
    seed: int,
) -> RoundResult:
    """A validation-only round (the seed's ``training: False``): evaluate, train nothing.

    Everything up to training is what :func:`train_round` does with the same arguments (the
    plan, the parameters, the dataset, the seeded split), and the metrics are the ones a
    training round reports as ``global_val_<metric>`` before it trains: the same request
    gives the same numbers, bit for bit, whether or not it also trains. They are computed on
    the validation split (``test_ratio`` > 0) whatever ``test_on_global_updates`` says, or,
    when ``test_ratio`` is 0, on the whole dataset.

    Returns a :class:`RoundResult` whose ``params_sha256`` is the digest of the file at
    ``params_path`` (nothing is written), ``sample_size`` the number of samples validated on
    (the validation split, or the whole dataset), ``metrics`` the ``global_val_*`` metrics
    and ``losses`` empty.

    Raises
    ------
    PlanImportError, TrainingArgsError, ParamsFileError, DatasetError, PlanError, TrainingError
        As :func:`train_round`; a ``test_metric`` that does not fit the model raises
        :class:`~fedsm.training.metrics.MetricError`.
    """
    with loaded_plan_class(plan_source, plan_class) as plan_cls:
        return validate_plan(
            plan_cls,
            model_args=model_args,
            training_args=training_args,
            params_path=_as_params(params_path),
            dataset=dataset,
            seed=seed,
        )


def _as_params(value: Path | str | bytes) -> Path | bytes:
    """Parameters given as bytes stay bytes; anything else names a file."""
    return value if isinstance(value, bytes) else Path(value)


def initial_params(
    *,
    plan_source: str,
    plan_class: str,
    model_args: dict[str, Any],
    training_args: dict[str, Any],
    seed: int,
    out_path: Path,
) -> str:
    """Write the researcher's seeded initial model to ``out_path``; return its sha256."""
    with loaded_plan_class(plan_source, plan_class) as plan_cls, deterministic(seed):
        plan = make_plan(plan_cls, model_args, training_args)
        return save_params(Path(out_path), plan.get_params())


def evaluate_plan(
    plan_cls: type[TorchTrainingPlan],
    *,
    model_args: Mapping[str, Any] | None,
    training_args: Mapping[str, Any] | None,
    params_path: Path,
    dataset: Mapping[str, Any],
) -> dict[str, float]:
    """Evaluate params on a whole dataset with the plan's ``testing_step``; see :func:`evaluate`."""
    with deterministic(0), _plan_errors():
        plan = make_plan(plan_cls, model_args, training_args)
        plan.set_params(load_params(params_path, like=plan.model().state_dict()))
        plan.dataset = load_dataset(dataset)
        manager = plan.training_data()
        if not isinstance(manager, DataManager):
            raise PlanError(f"{plan_cls.__name__}.training_data must return a DataManager")
        loader, _ = manager.split(0.0, batch_size=plan.training_args()["batch_size"])
        metrics = plan.testing_routine(loader)
    metrics["sample_count"] = float(loader.sample_count)
    return metrics


def evaluate(
    *,
    plan_source: str,
    plan_class: str,
    model_args: dict[str, Any],
    training_args: dict[str, Any],
    params_path: Path,
    dataset: Mapping[str, Any],
) -> dict[str, float]:
    """Evaluate the params at ``params_path`` on the whole ``dataset``.

    Returns the sample-weighted means of the plan's ``testing_step`` metrics (by default
    ``loss`` and, for integer targets, ``accuracy``) plus ``sample_count``.
    """
    with loaded_plan_class(plan_source, plan_class) as plan_cls:
        return evaluate_plan(
            plan_cls,
            model_args=model_args,
            training_args=training_args,
            params_path=Path(params_path),
            dataset=dataset,
        )
