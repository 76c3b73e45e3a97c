"""``TorchTrainingPlan``: what a researcher subclasses, and what a node runs.

The shape follows Fed-BioMed's torch training plan (``post_init``, ``training_data``,
``training_step``, ``training_routine``, ``save_code``, ``save``/``load``, ``model``,
``type``), with three differences that matter for safety and reproducibility:

- ``save_code`` writes a self-contained module (its imports, then the class source) and checks
  that it imports on its own before returning its sha256, the digest nodes approve.
  Dependency lines must be plain ``import``/``from ... import`` statements; they are written
  into the source, never ``exec``'ed by the library.
- ``save``/``load`` use safetensors files (see :mod:`fedsm.training.params`), checked against
  the model's own names, shapes and dtypes.
- ``training_routine`` shuffles with an explicit ``torch.Generator``; with the same seed and
  inputs it takes the same steps bit for bit.

Lifecycle on a node: ``plan = cls()``, ``post_init(model_args, training_args)``,
``set_params(...)``, ``plan.dataset = <loaded dataset>``, ``training_data().split(...)``
into ``training_data_loader`` / ``testing_data_loader``, ``training_routine(...)``,
``testing_routine(...)``, ``get_params()``.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import logging
import math
import os
import sys
import textwrap
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsm.digests import sha256_hex
from fedsm.errors import FedsmError
from fedsm.training.args import TrainingArgs, metric_name
from fedsm.training.loader import PLAN_SOURCE_ATTRIBUTE, PlanImportError, loaded_plan_class
from fedsm.training.loaders import BatchLoader, DataManager
from fedsm.training.metrics import compute_metric
from fedsm.training.params import check_like, load_params, save_params

__all__ = ["PlanError", "TorchTrainingPlan", "TrainingError"]

_LOG = logging.getLogger(__name__)
_LOG.addHandler(logging.NullHandler())

# Imports every saved plan starts with, so a plan's class body can name them directly.
BASE_IMPORTS = (
    "import torch",
    "from torch import nn",
    "from fedsm.training.plan import TorchTrainingPlan",
    "from fedsm.training.loaders import DataManager",
)


class PlanError(FedsmError):
    """A training plan is misdefined (e.g. ``init_model`` returned no module)."""


class TrainingError(FedsmError):
    """Training could not proceed (non-finite loss, no data loader, bad step output)."""


def _check_import_line(line: str) -> str:
    """Return ``line`` stripped if it is exactly one import statement, else raise PlanError."""
    if not isinstance(line, str):
        raise PlanError(f"a dependency must be an import line (str), got {type(line).__name__}")
    stripped = line.strip()
    try:
        tree = ast.parse(stripped)
    except SyntaxError as exc:
        raise PlanError(f"dependency {line!r} is not valid Python: {exc.msg}") from exc
    if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.Import, ast.ImportFrom)):
        raise PlanError(
            f"dependency {line!r} must be a single 'import x' or 'from x import y' statement"
        )
    return stripped


def _own_functions(klass: type) -> list[types.FunctionType]:
    """The functions written in ``klass``'s own class body (methods, static/class methods,
    property accessors), unwrapped from decorators; not functions assigned from elsewhere."""
    found = []
    prefix = f"{klass.__qualname__}."
    for value in vars(klass).values():
        candidates: list[Any] = [value]
        if isinstance(value, (staticmethod, classmethod)):
            candidates = [value.__func__]
        elif isinstance(value, property):
            candidates = [value.fget, value.fset, value.fdel]
        for candidate in candidates:
            try:
                func = inspect.unwrap(candidate) if callable(candidate) else candidate
            except ValueError:  # a __wrapped__ cycle
                continue
            if isinstance(func, types.FunctionType) and func.__qualname__.startswith(prefix):
                found.append(func)
    return found


def _same_file(a: str, b: str | None) -> bool:
    if b is None:
        return False
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _class_source(klass: type) -> str:
    """The text of ``klass``'s class statement (decorators included), as written.

    A class whose file ``inspect`` reads (and where its methods were compiled from) gives
    exactly what ``inspect.getsource`` gives, so plans saved from files keep their digests.
    Otherwise (a class typed in an IPython/Jupyter cell: ``__main__`` has no file, and the
    cell's text is in ``linecache`` under the name its code was compiled with, e.g.
    ``<ipython-input-3-...>``), the statement is found by parsing that text: the class of
    that name whose lines hold every one of its methods.
    """
    functions = _own_functions(klass)
    filenames = sorted({func.__code__.co_filename for func in functions})
    if len(filenames) > 1:
        raise PlanError(
            f"cannot read the source of {klass.__name__}: its methods come from several "
            f"sources {filenames}; define the class in one file or one cell"
        )
    try:
        inspected_file: str | None = inspect.getsourcefile(klass)
    except (OSError, TypeError):
        inspected_file = None
    if not filenames or _same_file(filenames[0], inspected_file):
        try:
            return inspect.getsource(klass)
        except (OSError, TypeError) as exc:
            if not filenames:
                raise PlanError(
                    f"cannot read the source of {klass.__name__}: define the plan in a .py "
                    f"file or a notebook cell (inspect said: {exc})"
                ) from exc
    return _class_source_from_lines(klass, filenames[0], functions)


def _class_source_from_lines(
    klass: type, filename: str, functions: list[types.FunctionType]
) -> str:
    """The class statement of ``klass`` in the text ``linecache`` holds for ``filename``."""
    name = klass.__name__
    lines = linecache.getlines(filename)
    if not lines:
        raise PlanError(
            f"cannot read the source of {name}: its code comes from {filename!r}, whose text is "
            "not available (define the plan in a .py file or a notebook cell)"
        )
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError as exc:
        raise PlanError(f"cannot read the source of {name}: {filename!r} does not parse") from exc
    first_lines = {func.__code__.co_firstlineno for func in functions}
    firstlineno = vars(klass).get("__firstlineno__")  # Python 3.13+
    matches = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef) or node.name != name:
            continue
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        end = node.end_lineno or node.lineno
        if all(start <= line <= end for line in first_lines) and (
            not isinstance(firstlineno, int) or firstlineno in (start, node.lineno)
        ):
            matches.append((start, end))
    if len(matches) != 1:
        raise PlanError(
            f"cannot read the source of {name}: {len(matches)} class statements named {name} "
            f"in {filename!r} hold its methods"
        )
    start, end = matches[0]
    return "".join(lines[start - 1 : end])


class TorchTrainingPlan:
    """Base class of torch training plans.

    Subclasses must define :meth:`init_model` and :meth:`training_step`; they may override
    :meth:`init_optimizer`, :meth:`init_dependencies`, :meth:`training_data` and
    :meth:`testing_step`.

    Attributes
    ----------
    dataset
        The node's loaded dataset (``CsvDataset``/``TensorDataset``), set by the node or
        LocalJob before :meth:`training_data` is called.
    training_data_loader, testing_data_loader
        The loaders :meth:`training_routine` / :meth:`testing_routine` use by default.
    """

    def __init__(self) -> None:
        self.dataset: Any = None
        self.training_data_loader: BatchLoader | None = None
        self.testing_data_loader: BatchLoader | None = None
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._model_args: dict[str, Any] = {}
        self._training_args: TrainingArgs = TrainingArgs()
        self._dependencies: list[str] = []
        #: What the researcher's strategy sent this node for the round: numbers, and
        #: tensors (files through the repository, loaded). :meth:`training_routine` knows
        #: ``fedprox_mu`` (FedProx's proximal term) and ``aggregator_correction`` (SCAFFOLD's
        #: gradient correction ``c - c_i``); a plan's own routine may read anything else.
        self.aggregator_args: dict[str, Any] = {}
        #: Numbers sent back beside the parameters (``num_updates``, ``lr``), for the strategy.
        self.reply_extras: dict[str, float] = {}

    # ----------------------------------------------------------------- researcher hooks

    def init_model(self, model_args: dict[str, Any]) -> nn.Module:
        """Build and return the model (an ``nn.Module``) from ``model_args``."""
        raise NotImplementedError(f"{type(self).__name__} must define init_model(model_args)")

    def init_optimizer(self, optimizer_args: dict[str, Any]) -> torch.optim.Optimizer:
        """Return the optimiser; default ``SGD(model.parameters(), **optimizer_args)``.

        ``optimizer_args`` is the training args' ``lr`` merged with their ``optimizer_args``.
        """
        return torch.optim.SGD(self.model().parameters(), **optimizer_args)

    def init_dependencies(self) -> list[str]:
        """Return extra import lines the plan's source needs (``torch``/``nn`` are implied)."""
        return []

    def training_data(self) -> DataManager:
        """Return a :class:`DataManager` over ``self.dataset`` (batch size from the args)."""
        return DataManager(self.dataset, batch_size=self._training_args["batch_size"])

    def training_step(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the (scalar, differentiable) loss of one batch."""
        raise NotImplementedError(f"{type(self).__name__} must define training_step(data, target)")

    def testing_step(self, data: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Return metrics of one batch, averaged per sample. Called under ``torch.no_grad``.

        Default: ``loss`` is :meth:`training_step` on the batch; ``accuracy`` is added when
        every target is a whole number, reading the model output as logits: argmax over the
        last dimension when it has several classes, ``output > 0`` for a single output.
        Override it for regression or any other metric.
        """
        metrics = {"loss": float(self.training_step(data, target))}
        if bool(torch.all(target == torch.round(target))):
            output = self.model()(data)
            if output.dim() >= 2 and output.shape[-1] > 1:
                predicted = output.argmax(dim=-1)
            else:
                predicted = (output.reshape(target.shape) > 0).long()
            correct = (predicted.reshape(-1) == target.reshape(-1).long()).double().mean()
            metrics["accuracy"] = float(correct)
        return metrics

    # ----------------------------------------------------------------- framework side

    def post_init(
        self, model_args: Mapping[str, Any] | None, training_args: Mapping[str, Any] | None
    ) -> None:
        """Validate the args, build the model, the dependency list and the optimiser.

        Raises
        ------
        TrainingArgsError
            Invalid training args.
        PlanError
            ``init_model`` did not return an ``nn.Module``, a dependency is not an import
            line, or ``init_optimizer`` did not return an optimiser.
        """
        self._model_args = dict(model_args or {})
        self._training_args = (
            training_args
            if isinstance(training_args, TrainingArgs)
            else TrainingArgs(training_args)
        )
        model = self.init_model(self._model_args)
        if not isinstance(model, nn.Module):
            raise PlanError(
                f"{type(self).__name__}.init_model returned {type(model).__name__}, "
                "expected a torch.nn.Module"
            )
        self._model = model
        self._dependencies = [_check_import_line(line) for line in self.init_dependencies()]
        optimizer = self.init_optimizer(self._training_args.optimizer_arguments())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise PlanError(
                f"{type(self).__name__}.init_optimizer returned {type(optimizer).__name__}, "
                "expected a torch.optim.Optimizer"
            )
        self._optimizer = optimizer

    def model(self) -> nn.Module:
        """Return the model; :meth:`post_init` must have run."""
        if self._model is None:
            raise PlanError(
                "the model does not exist yet: call post_init(model_args, training_args)"
            )
        return self._model

    def optimizer(self) -> torch.optim.Optimizer:
        """Return the optimiser built by :meth:`post_init`."""
        if self._optimizer is None:
            raise PlanError("no optimizer yet: call post_init(model_args, training_args)")
        return self._optimizer

    def type(self) -> str:
        """The plan family, ``"torch"`` (the seed's ``TrainingPlans.TorchTrainingPlan``)."""
        return "torch"

    def model_args(self) -> dict[str, Any]:
        """The model args given to :meth:`post_init`."""
        return dict(self._model_args)

    def training_args(self) -> TrainingArgs:
        """The validated training args given to :meth:`post_init`."""
        return self._training_args

    def dependencies(self) -> list[str]:
        """The validated import lines from :meth:`init_dependencies`."""
        return list(self._dependencies)

    def get_params(self) -> dict[str, torch.Tensor]:
        """Return a detached CPU copy of the model's ``state_dict`` (parameters and buffers)."""
        return {
            name: value.detach().to("cpu").clone()
            for name, value in self.model().state_dict().items()
        }

    def set_params(self, params: Mapping[str, torch.Tensor]) -> None:
        """Load ``params`` into the model after checking names, shapes and dtypes.

        Raises
        ------
        ParamsFileError
            The tensors do not fit the model.
        """
        model = self.model()
        check_like(params, model.state_dict(), source="parameters")
        model.load_state_dict(dict(params), strict=True)

    def save(self, path: str | Path, params: Mapping[str, torch.Tensor] | None = None) -> str:
        """Write ``params`` (default: the model's) as a safetensors file; return its sha256."""
        return save_params(path, self.get_params() if params is None else params)

    def load(self, path: str | Path) -> dict[str, torch.Tensor]:
        """Read a params file checked against the model, load it, and return the tensors."""
        params = load_params(path, like=self.model().state_dict())
        self.model().load_state_dict(params, strict=True)
        return params

    # ----------------------------------------------------------------- source

    def source(self) -> str:
        """Return the self-contained module source of this plan (what :meth:`save_code` writes).

        A plan that was itself loaded from source returns that source unchanged, so saving a
        loaded plan again gives the same bytes and sha256. Otherwise: a header, the base
        imports, :meth:`init_dependencies`' lines, then the source of the class and of any
        intermediate base classes between it and ``TorchTrainingPlan``.

        A class defined in an IPython or Jupyter cell has no file ``inspect`` can read; its
        class statement is then cut out of the cell's text, which IPython keeps in
        ``linecache``, found through the code objects of the class's own methods. The cell's
        number is not part of the source: the same cell gives the same source in any session.

        Raises
        ------
        PlanError
            The class source is not available (e.g. typed at a plain ``python`` prompt, or
            built by ``exec`` of a string).
        """
        cls = type(self)
        module = sys.modules.get(cls.__module__)
        loaded = getattr(module, PLAN_SOURCE_ATTRIBUTE, None)
        if isinstance(loaded, str):
            return loaded
        deps = [_check_import_line(line) for line in self.init_dependencies()]
        chain = [
            klass
            for klass in reversed(cls.__mro__)
            if klass is not TorchTrainingPlan and issubclass(klass, TorchTrainingPlan)
        ]
        blocks = [textwrap.dedent(_class_source(klass)).rstrip() + "\n" for klass in chain]
        lines = [
            f'"""Training plan {cls.__name__}, written by fedsm TorchTrainingPlan.save_code."""',
            "",
            "from __future__ import annotations",
            "",
        ]
        for line in (*BASE_IMPORTS, *deps):
            if line not in lines:
                lines.append(line)
        return "\n".join(lines) + "\n\n\n" + "\n\n".join(blocks)

    def save_code(self, path: str | Path) -> str:
        """Write :meth:`source` to ``path`` (atomically) and return the sha256 of its bytes.

        The source is first imported on its own with :func:`loaded_plan_class`, so a plan that
        would not import on a node fails here, on the researcher's side.

        Raises
        ------
        PlanError
            The source cannot be produced or does not import on its own.
        """
        source = self.source()
        try:
            with loaded_plan_class(source, type(self).__name__):
                pass
        except PlanImportError as exc:
            raise PlanError(
                f"the saved source of {type(self).__name__} does not import on its own: {exc}. "
                "Add the missing imports to init_dependencies()."
            ) from exc
        data = source.encode("utf-8")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(path)
        except OSError as exc:
            raise PlanError(f"cannot write training plan source to {str(path)!r}: {exc}") from exc
        return sha256_hex(data)

    # ----------------------------------------------------------------- routines

    def training_routine(
        self,
        *,
        generator: torch.Generator | None = None,
        loader: BatchLoader | None = None,
    ) -> list[float]:
        """Train on ``loader`` (default ``training_data_loader``); return the per-step losses.

        Runs ``epochs`` passes, or exactly ``num_updates`` optimiser steps (cycling through
        passes), or a single step with ``dry_run``. Each pass reshuffles with ``generator``.

        Raises
        ------
        TrainingError
            No loader, an empty loader, a non-scalar loss, or a loss that is NaN/inf (the
            message gives the step; lowering ``lr`` usually helps).
        """
        loader = loader if loader is not None else self.training_data_loader
        if loader is None:
            raise TrainingError("no training data loader: set training_data_loader or pass loader")
        if loader.sample_count == 0:
            raise TrainingError("the training data loader holds no sample")
        args = self._training_args
        model, optimizer = self.model(), self.optimizer()
        proximal = self._proximal_term()
        correction = self._gradient_correction()
        self.reply_extras = {}
        budget = args["num_updates"]
        if args["dry_run"]:
            budget = 1
        epochs = args["epochs"] if budget is None else math.inf
        losses: list[float] = []
        model.train()
        epoch = 0
        while epoch < epochs:
            epoch += 1
            for data, target in loader.batches(generator):
                optimizer.zero_grad(set_to_none=True)
                loss = self.training_step(data, target)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TrainingError(
                        f"{type(self).__name__}.training_step must return a scalar tensor loss"
                    )
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(
                        f"loss is {value} at step {len(losses) + 1} (epoch {epoch}); training "
                        "diverged, try a lower lr"
                    )
                if proximal is not None:
                    loss = loss + proximal()
                loss.backward()
                for param, delta in correction:
                    if param.grad is not None:
                        param.grad.add_(delta)
                optimizer.step()
                losses.append(value)
                self._count_update(optimizer)
                if len(losses) % args["log_interval"] == 0:
                    _LOG.info("epoch %d step %d loss %.6f", epoch, len(losses), value)
                if budget is not None and len(losses) >= budget:
                    return losses
        return losses

    def _count_update(self, optimizer: torch.optim.Optimizer) -> None:
        extras = self.reply_extras
        extras["num_updates"] = extras.get("num_updates", 0.0) + 1.0
        extras["lr"] = float(optimizer.param_groups[0].get("lr", float("nan")))

    def _proximal_term(self) -> Callable[[], torch.Tensor] | None:
        """FedProx (Li et al., 2020): ``mu/2 * ||w - w_global||^2`` added to each step's loss,
        ``w_global`` the parameters the round started from. None when ``mu`` is 0 (the same
        bits as FedAvg's training) or not sent. The logged loss stays the plan's own."""
        mu = self.aggregator_args.get("fedprox_mu")
        if mu is None:
            return None
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu >= 0:
            raise TrainingError(f"fedprox_mu must be a number >= 0, got {mu!r}")
        if mu == 0:
            return None
        pairs = [(p, p.detach().clone()) for p in self.model().parameters() if p.requires_grad]

        def term() -> torch.Tensor:
            total = sum(((p - start) ** 2).sum() for p, start in pairs)
            return (float(mu) / 2.0) * total  # type: ignore[return-value]

        return term

    def _gradient_correction(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """SCAFFOLD (Karimireddy et al., 2020): each step's gradient plus ``c - c_i``, the
        correction the strategy sent as tensors named like the model's parameters."""
        sent = self.aggregator_args.get("aggregator_correction")
        if sent is None:
            return []
        if not isinstance(sent, Mapping):
            raise TrainingError("aggregator_correction must be a mapping of parameter tensors")
        out = []
        for name, param in self.model().named_parameters():
            delta = sent.get(name)
            if delta is None:
                continue
            if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(param.shape):
                raise TrainingError(
                    f"aggregator_correction[{name!r}] does not match the parameter's shape "
                    f"{tuple(param.shape)}"
                )
            out.append((param, delta.to(param.dtype)))
        return out

    def testing_routine(self, loader: BatchLoader | None = None) -> dict[str, float]:
        """Evaluate on ``loader`` (default ``testing_data_loader``) in eval mode.

        Returns the sample-weighted mean over batches of each metric :meth:`testing_step`
        returns (so ``accuracy`` is the fraction correct over all samples). A returned name
        that is one of the seed's test metrics in another case (``"ACCURACY"``,
        ``"F1_Score"``) is reported under its lower-case name; any other name is kept as the
        plan wrote it.

        With the default :meth:`testing_step`, the training arg ``test_metric`` (when set and
        not already among the metrics) is added, computed over all the loader's predictions
        at once (see :mod:`fedsm.training.metrics`). A plan with its own ``testing_step``
        reports exactly what that returns, as in the seed.

        Raises
        ------
        TrainingError
            No loader, a ``testing_step`` that does not return a dict of numbers, or two
            returned names that are the same metric in different cases.
        MetricError
            ``test_metric`` does not apply to this model's outputs or targets.
        """
        loader = loader if loader is not None else self.testing_data_loader
        if loader is None:
            raise TrainingError("no testing data loader: set testing_data_loader or pass loader")
        extra = self._training_args["test_metric"]
        own_step = type(self).testing_step is not TorchTrainingPlan.testing_step
        if extra is not None and own_step:
            _LOG.warning(
                "%s defines its own testing_step: test_metric %r is not computed (the plan's "
                "metrics are reported as it returns them)",
                type(self).__name__,
                extra,
            )
            extra = None
        model = self.model()
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        outputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for data, target in loader:
                    metrics = self.testing_step(data, target)
                    if not isinstance(metrics, Mapping) or not metrics:
                        raise TrainingError(
                            f"{type(self).__name__}.testing_step must return a dict of metrics"
                        )
                    n = int(data.shape[0])
                    for name, value in _canonical_names(type(self).__name__, metrics).items():
                        sums[name] = sums.get(name, 0.0) + float(value) * n
                    count += n
                    if extra is not None:
                        outputs.append(model(data).detach())
                        targets.append(target)
        finally:
            model.train(was_training)
        if count == 0:
            raise TrainingError("the testing data loader holds no sample")
        result = {name: total / count for name, total in sums.items()}
        if extra is not None and extra not in result:
            result[extra] = compute_metric(
                extra,
                torch.cat(outputs),
                torch.cat(targets),
                self._training_args["test_metric_args"],
            )
        return dict(sorted(result.items()))


def _canonical_names(plan_name: str, metrics: Mapping[Any, Any]) -> dict[str, Any]:
    """``metrics`` with the seed's metric names in any case renamed to their lower case."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        key = metric_name(name) or str(name)
        if key in out:
            raise TrainingError(
                f"{plan_name}.testing_step returned the metric {key!r} twice (names that differ "
                "only in case are the same seed metric)"
            )
        out[key] = value
    return out
