"""The seed's test metrics, computed over a whole validation set (not averaged per batch).

Fed-BioMed lets a researcher pick the validation metric with the ``test_metric`` training
argument (``ACCURACY``, ``F1_SCORE``, ``PRECISION``, ``RECALL``, ``MEAN_SQUARE_ERROR``,
``MEAN_ABSOLUTE_ERROR``, ``EXPLAINED_VARIANCE``) and tune it with ``test_metric_args``.
fedsm accepts those names in any case and reports them in lower case (``f1_score``...), next
to the default ``loss``/``accuracy`` of :meth:`TorchTrainingPlan.testing_step`.

How model outputs are read (the same rule as the default ``accuracy``):

- classification: outputs are logits. Several outputs per sample: ``C`` classes, the
  prediction is the argmax (one-hot targets are read with argmax too). One output per sample:
  two classes, the prediction is ``output > 0``. Targets must be whole numbers in
  ``[0, C)``. Precision, recall and F1 average as the seed does: ``binary`` (of
  ``pos_label``, default 1) when there are two classes, ``weighted`` (by each class's number
  of true samples) otherwise; ``test_metric_args`` may ask for ``binary``, ``micro``,
  ``macro`` or ``weighted`` and set ``zero_division`` (0 or 1: the value of a ratio whose
  denominator is 0, e.g. the precision of a class never predicted). ``macro`` and
  ``weighted`` run over the classes present in the targets or the predictions, as
  scikit-learn does.
- regression: outputs are the predictions, reshaped to the targets' shape. With several
  target columns a metric is the mean over columns (``multioutput="uniform_average"``);
  explained variance may instead weight columns by their variance
  (``multioutput="variance_weighted"``). Explained variance of a constant target is 1.0 if
  the residual is constant too (explained variance ignores a bias) and 0.0 otherwise
  (scikit-learn's ``force_finite``).

Everything is computed in float64 from the concatenated outputs and targets, so the result is
one deterministic function of the validation set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsm.errors import FedsmError
from fedsm.training.args import CLASSIFICATION_METRICS, REGRESSION_METRICS

__all__ = [
    "MetricError",
    "accuracy",
    "classification_labels",
    "compute_metric",
    "explained_variance",
    "f1_score",
    "mean_absolute_error",
    "mean_square_error",
    "precision",
    "recall",
]


class MetricError(FedsmError):
    """A metric cannot be computed on these outputs/targets (e.g. F1 of a regression)."""


# --------------------------------------------------------------------------- classification


def classification_labels(
    output: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(y_true, y_pred, n_classes)`` as 1-D int64 labels from logits and targets."""
    if output.dim() >= 2 and output.shape[-1] > 1:
        n_classes = int(output.shape[-1])
        predicted = output.argmax(dim=-1).reshape(-1)
        if target.shape == output.shape:  # one-hot (or probability) targets
            target = target.argmax(dim=-1)
    else:
        n_classes = 2
        predicted = (output.reshape(-1) > 0).long()
    truth = target.reshape(-1)
    if truth.numel() != predicted.numel():
        raise MetricError(
            f"{truth.numel()} targets for {predicted.numel()} predictions: the model's output "
            f"shape {tuple(output.shape)} does not match the target shape {tuple(target.shape)}"
        )
    if truth.is_floating_point():
        if not bool(torch.all(truth == torch.round(truth))):
            raise MetricError(
                "a classification metric needs whole-number class targets; these are "
                "continuous (use mean_square_error, mean_absolute_error or explained_variance)"
            )
    truth = truth.long()
    if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= n_classes):
        raise MetricError(
            f"class targets must lie in [0, {n_classes}) for a model with "
            f"{'one output (two classes)' if n_classes == 2 else f'{n_classes} outputs'}, "
            f"got values in [{int(truth.min())}, {int(truth.max())}]"
        )
    return truth, predicted.long(), n_classes


def accuracy(y_true: torch.Tensor, y_pred: torch.Tensor) -> float:
    """Fraction of labels predicted exactly."""
    if y_true.numel() == 0:
        raise MetricError("no sample to compute accuracy on")
    return float((y_true == y_pred).double().mean())


def _ratio(num: float, den: float, zero_division: float) -> float:
    return num / den if den else float(zero_division)


def _counts(y_true: torch.Tensor, y_pred: torch.Tensor, label: int) -> tuple[float, float, float]:
    """(true positives, times predicted, times true: the support) of one label."""
    is_true, is_pred = y_true == label, y_pred == label
    return float((is_true & is_pred).sum()), float(is_pred.sum()), float(is_true.sum())


def _per_label(kind: str, tp: float, predicted: float, actual: float, zero: float) -> float:
    if kind == "precision":
        return _ratio(tp, predicted, zero)
    if kind == "recall":
        return _ratio(tp, actual, zero)
    return _ratio(2.0 * tp, predicted + actual, zero)  # f1 = 2TP / (2TP + FP + FN)


def _classification_score(
    kind: str,
    y_true: torch.Tensor,
    y_pred: torch.Tensor,
    *,
    n_classes: int = 2,
    average: str | None = None,
    pos_label: int = 1,
    zero_division: float = 0.0,
) -> float:
    if y_true.numel() == 0:
        raise MetricError(f"no sample to compute {kind} on")
    if average is None:
        average = "binary" if n_classes == 2 else "weighted"
    if average == "binary":
        if n_classes != 2:
            raise MetricError(
                f"average='binary' needs two classes, the model has {n_classes} "
                "(use 'micro', 'macro' or 'weighted')"
            )
        if pos_label not in (0, 1):
            raise MetricError(f"pos_label must be 0 or 1 for two classes, got {pos_label}")
        tp, predicted, actual = _counts(y_true, y_pred, pos_label)
        return _per_label(kind, tp, predicted, actual, zero_division)
    labels = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    counts = [_counts(y_true, y_pred, label) for label in labels]
    if average == "micro":
        tp = sum(c[0] for c in counts)
        predicted = sum(c[1] for c in counts)
        actual = sum(c[2] for c in counts)
        return _per_label(kind, tp, predicted, actual, zero_division)
    scores = [_per_label(kind, c[0], c[1], c[2], zero_division) for c in counts]
    if average == "macro":
        return sum(scores) / len(scores)
    if average == "weighted":
        support = [c[2] for c in counts]
        return sum(s * w for s, w in zip(scores, support, strict=True)) / sum(support)
    raise MetricError(f"average must be binary, micro, macro or weighted, got {average!r}")


def precision(y_true: torch.Tensor, y_pred: torch.Tensor, **kwargs: Any) -> float:
    """TP / (TP + FP); see the module doc for ``average``, ``pos_label``, ``zero_division``."""
    return _classification_score("precision", y_true, y_pred, **kwargs)


def recall(y_true: torch.Tensor, y_pred: torch.Tensor, **kwargs: Any) -> float:
    """TP / (TP + FN); see the module doc for ``average``, ``pos_label``, ``zero_division``."""
    return _classification_score("recall", y_true, y_pred, **kwargs)


def f1_score(y_true: torch.Tensor, y_pred: torch.Tensor, **kwargs: Any) -> float:
    """2TP / (2TP + FP + FN) (harmonic mean of precision and recall), averaged as asked."""
    return _classification_score("f1_score", y_true, y_pred, **kwargs)


# --------------------------------------------------------------------------- regression


def _columns(y_true: torch.Tensor, y_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if y_true.numel() == 0:
        raise MetricError("no sample to compute a regression metric on")
    if y_pred.numel() != y_true.numel():
        raise MetricError(
            f"{y_pred.numel()} predictions for {y_true.numel()} targets: the model's output "
            f"shape {tuple(y_pred.shape)} does not match the target shape {tuple(y_true.shape)}"
        )
    truth = y_true.double().reshape(y_true.shape[0] if y_true.dim() else 1, -1)
    pred = y_pred.double().reshape(truth.shape)
    return truth, pred


def _check_multioutput(multioutput: str, allowed: tuple[str, ...]) -> None:
    if multioutput not in allowed:
        raise MetricError(f"multioutput must be one of {list(allowed)}, got {multioutput!r}")


def mean_square_error(
    y_true: torch.Tensor, y_pred: torch.Tensor, *, multioutput: str = "uniform_average"
) -> float:
    """Mean of squared errors, per column then averaged over columns."""
    _check_multioutput(multioutput, ("uniform_average",))
    truth, pred = _columns(y_true, y_pred)
    return float(((truth - pred) ** 2).mean(dim=0).mean())


def mean_absolute_error(
    y_true: torch.Tensor, y_pred: torch.Tensor, *, multioutput: str = "uniform_average"
) -> float:
    """Mean of absolute errors, per column then averaged over columns."""
    _check_multioutput(multioutput, ("uniform_average",))
    truth, pred = _columns(y_true, y_pred)
    return float((truth - pred).abs().mean(dim=0).mean())


def explained_variance(
    y_true: torch.Tensor, y_pred: torch.Tensor, *, multioutput: str = "uniform_average"
) -> float:
    """``1 - Var(y - y_pred) / Var(y)`` (population variances), per column then averaged."""
    _check_multioutput(multioutput, ("uniform_average", "variance_weighted"))
    truth, pred = _columns(y_true, y_pred)
    residual = truth - pred
    num = ((residual - residual.mean(dim=0)) ** 2).mean(dim=0)
    den = ((truth - truth.mean(dim=0)) ** 2).mean(dim=0)
    scores = []
    for n, d in zip(num.tolist(), den.tolist(), strict=True):
        if d == 0.0:
            scores.append(1.0 if n == 0.0 else 0.0)
        else:
            scores.append(1.0 - n / d)
    if multioutput == "variance_weighted":
        weights = den.tolist()
        if sum(weights) == 0.0:
            return sum(scores) / len(scores)
        return sum(s * w for s, w in zip(scores, weights, strict=True)) / sum(weights)
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------- dispatch

_REGRESSION = {
    "mean_square_error": mean_square_error,
    "mean_absolute_error": mean_absolute_error,
    "explained_variance": explained_variance,
}
_CLASSIFICATION = {"precision": precision, "recall": recall, "f1_score": f1_score}


def compute_metric(
    name: str,
    output: torch.Tensor,
    target: torch.Tensor,
    metric_args: Mapping[str, Any] | None = None,
) -> float:
    """The metric ``name`` (canonical, lower case) of model ``output`` against ``target``.

    ``metric_args`` are the (already validated) ``test_metric_args``.

    Raises
    ------
    MetricError
        The metric does not apply to these outputs/targets, or an argument does not fit.
    """
    kwargs = dict(metric_args or {})
    if name in CLASSIFICATION_METRICS:
        y_true, y_pred, n_classes = classification_labels(output, target)
        if name == "accuracy":
            return accuracy(y_true, y_pred)
        if "zero_division" in kwargs:
            kwargs["zero_division"] = float(kwargs["zero_division"])
        return _CLASSIFICATION[name](y_true, y_pred, n_classes=n_classes, **kwargs)
    if name in REGRESSION_METRICS:
        return _REGRESSION[name](target, output, **kwargs)
    raise MetricError(f"{name!r} is not a metric fedsm computes from predictions")
