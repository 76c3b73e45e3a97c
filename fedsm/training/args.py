"""Validated training arguments, as the seed's ``TrainingArgs`` but strict.

Training arguments travel in every ``train`` message and are recorded in the job's log, so
they are plain values only (numbers, strings, booleans, a small dict). Every key is checked
when the object is built: an unknown key lists the valid ones, a wrong type or an
out-of-range value names the key and what was expected. ``dict()`` returns the full plain
mapping (defaults filled in), which is what goes on the wire.

Keys (default):

- ``lr`` (0.01): learning rate, float > 0.
- ``epochs`` (1 when ``num_updates`` is not given): int >= 1.
- ``num_updates`` (None): int >= 1, number of optimiser steps instead of epochs. Giving both
  ``epochs`` and ``num_updates`` is an error: the two would disagree about when to stop.
- ``batch_size`` (48): int >= 1.
- ``optimizer_args`` ({}): extra keyword arguments of the optimiser (e.g. ``momentum``); a
  dict with string keys and plain values. An ``lr`` here overrides the top-level ``lr``.
- ``test_ratio`` (0.0): fraction of the node's samples held out for validation, in [0, 1).
- ``test_on_local_updates`` (False), ``test_on_global_updates`` (False): validate after local
  training / before it (on the received global parameters). Both need ``test_ratio`` > 0.
- ``test_metric`` (None): a metric computed over the validation predictions besides the
  plan's own metrics, one of :data:`TEST_METRICS` in any case (the seed's ``ACCURACY``,
  ``F1_SCORE``, ``PRECISION``, ``RECALL``, ``MEAN_SQUARE_ERROR``, ``MEAN_ABSOLUTE_ERROR``,
  ``EXPLAINED_VARIANCE``; plus ``loss``); stored and reported in lower case, e.g.
  ``global_val_f1_score``. How it is computed: :mod:`fedsm.training.metrics`. A plan that
  defines its own ``testing_step`` reports what that returns, as the seed does.
- ``test_metric_args`` ({}): keyword arguments of ``test_metric``: ``average`` (``binary``,
  ``micro``, ``macro``, ``weighted``), ``pos_label`` (0 or 1) and ``zero_division`` (0 or 1)
  for precision, recall and F1; ``multioutput`` (``uniform_average``, and for explained
  variance ``variance_weighted``) for the regression metrics. Needs ``test_metric``.
- ``random_seed`` (None): int >= 0; when set, it fixes the node's train/test split across
  rounds (otherwise the split follows the round seed).
- ``dry_run`` (False): stop after one optimiser step.
- ``log_interval`` (10): int >= 1, steps between progress log lines.
- ``use_gpu`` (False): accepted for compatibility; fedsm trains on CPU (bit-reproducible).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

from fedsm.errors import FedsmError

__all__ = [
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "TEST_METRICS",
    "TrainingArgs",
    "TrainingArgsError",
    "metric_name",
]

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("accuracy", "f1_score", "precision", "recall")
"""The seed's classification test metrics (lower case)."""
REGRESSION_METRICS = ("mean_square_error", "mean_absolute_error", "explained_variance")
"""The seed's regression test metrics (lower case)."""
TEST_METRICS = (*CLASSIFICATION_METRICS, *REGRESSION_METRICS, "loss")
"""Metric names ``test_metric`` may take (in any case); ``loss`` is the plan's own loss."""

_BY_FOLDED = {name.casefold(): name for name in TEST_METRICS}

# test_metric_args each metric accepts, with the values each may take.
_AVERAGES = ("binary", "micro", "macro", "weighted")
_CLASSIFICATION_ARGS: dict[str, tuple[Any, ...]] = {
    "average": _AVERAGES,
    "pos_label": (0, 1),
    "zero_division": (0, 1),
}
_METRIC_ARGS: dict[str, dict[str, tuple[Any, ...]]] = {
    "accuracy": {},
    "loss": {},
    "f1_score": _CLASSIFICATION_ARGS,
    "precision": _CLASSIFICATION_ARGS,
    "recall": _CLASSIFICATION_ARGS,
    "mean_square_error": {"multioutput": ("uniform_average",)},
    "mean_absolute_error": {"multioutput": ("uniform_average",)},
    "explained_variance": {"multioutput": ("uniform_average", "variance_weighted")},
}


def metric_name(name: Any) -> str | None:
    """The canonical (lower-case) name of a seed test metric given in any case, else None.

    ``metric_name("F1_SCORE") == "f1_score"``; ``metric_name("dice") is None``.
    """
    if not isinstance(name, str):
        return None
    return _BY_FOLDED.get(name.casefold())


class TrainingArgsError(FedsmError, ValueError):
    """A training argument is unknown, of the wrong type or out of range."""


_DEFAULTS: dict[str, Any] = {
    "lr": 0.01,
    "epochs": None,
    "num_updates": None,
    "batch_size": 48,
    "optimizer_args": {},
    "test_ratio": 0.0,
    "test_on_local_updates": False,
    "test_on_global_updates": False,
    "test_metric": None,
    "test_metric_args": {},
    "random_seed": None,
    "dry_run": False,
    "log_interval": 10,
    "use_gpu": False,
}

VALID_KEYS = tuple(sorted(_DEFAULTS))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(key: str, value: Any, minimum: int, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if not _is_int(value):
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise TrainingArgsError(
            f"training arg {key!r} must be {expected}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise TrainingArgsError(f"training arg {key!r} must be >= {minimum}, got {value}")
    return int(value)


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TrainingArgsError(
            f"training arg {key!r} must be a bool, got {type(value).__name__} {value!r}"
        )
    return value


def _check_plain(key: str, value: Any) -> None:
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TrainingArgsError(f"training arg {key!r} must be finite, got {value!r}")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(key, item)
        return
    raise TrainingArgsError(
        f"training arg {key!r} must hold plain values (numbers, strings, booleans, lists), "
        f"got {type(value).__name__}"
    )


def _validate(args: dict[str, Any]) -> dict[str, Any]:
    out = dict(_DEFAULTS)
    out["optimizer_args"] = {}
    out["test_metric_args"] = {}
    out.update(args)

    lr = out["lr"]
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise TrainingArgsError(f"training arg 'lr' must be a finite number > 0, got {lr!r}")
    out["lr"] = float(lr)

    out["epochs"] = _check_int("epochs", out["epochs"], 1, allow_none=True)
    out["num_updates"] = _check_int("num_updates", out["num_updates"], 1, allow_none=True)
    if out["epochs"] is not None and out["num_updates"] is not None:
        raise TrainingArgsError(
            "give either 'epochs' or 'num_updates', not both "
            f"(got epochs={out['epochs']}, num_updates={out['num_updates']})"
        )
    if out["epochs"] is None and out["num_updates"] is None:
        out["epochs"] = 1
    out["batch_size"] = _check_int("batch_size", out["batch_size"], 1, allow_none=False)
    out["log_interval"] = _check_int("log_interval", out["log_interval"], 1, allow_none=False)
    out["random_seed"] = _check_int("random_seed", out["random_seed"], 0, allow_none=True)

    opt = out["optimizer_args"]
    if opt is None:
        opt = {}
    if not isinstance(opt, Mapping) or not all(isinstance(k, str) for k in opt):
        raise TrainingArgsError(
            f"training arg 'optimizer_args' must be a dict with str keys, got {opt!r}"
        )
    for name, value in opt.items():
        _check_plain(f"optimizer_args.{name}", value)
    out["optimizer_args"] = dict(opt)

    ratio = out["test_ratio"]
    if not _is_number(ratio) or not 0.0 <= ratio < 1.0:
        raise TrainingArgsError(
            f"training arg 'test_ratio' must be a number in [0, 1), got {ratio!r}"
        )
    out["test_ratio"] = float(ratio)

    for key in ("test_on_local_updates", "test_on_global_updates", "dry_run", "use_gpu"):
        out[key] = _check_bool(key, out[key])
    if out["use_gpu"]:
        log.warning(
            "training arg use_gpu=True is ignored: fedsm trains on the CPU so that every node "
            "and every replay computes the same bytes"
        )
    if (out["test_on_local_updates"] or out["test_on_global_updates"]) and ratio == 0.0:
        raise TrainingArgsError(
            "test_on_local_updates / test_on_global_updates need 'test_ratio' > 0 "
            "(there is nothing to validate on otherwise)"
        )

    metric = out["test_metric"]
    if metric is not None:
        canonical = metric_name(metric)
        if canonical is None:
            raise TrainingArgsError(
                f"training arg 'test_metric' must be one of {list(TEST_METRICS)} (in any "
                f"case, e.g. 'F1_SCORE') or None, got {metric!r}"
            )
        out["test_metric"] = canonical
    out["test_metric_args"] = _check_metric_args(out["test_metric"], out["test_metric_args"])
    return out


def _check_metric_args(metric: str | None, given: Any) -> dict[str, Any]:
    if given is None:
        given = {}
    if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
        raise TrainingArgsError(
            f"training arg 'test_metric_args' must be a dict with str keys, got {given!r}"
        )
    if not given:
        return {}
    if metric is None:
        raise TrainingArgsError(
            "training arg 'test_metric_args' needs 'test_metric' (the metric they configure)"
        )
    allowed = _METRIC_ARGS[metric]
    unknown = sorted(k for k in given if k not in allowed)
    if unknown:
        raise TrainingArgsError(
            f"test_metric_args {unknown} do not apply to {metric!r}; it accepts "
            f"{sorted(allowed) or 'none'}"
        )
    out: dict[str, Any] = {}
    for key, value in given.items():
        choices = allowed[key]
        if isinstance(choices[0], str):
            ok = isinstance(value, str) and value in choices
        else:
            ok = _is_number(value) and value in choices
        if not ok:
            raise TrainingArgsError(
                f"test_metric_args.{key} of {metric!r} must be one of {list(choices)}, "
                f"got {value!r}"
            )
        out[key] = int(value) if isinstance(value, (int, float)) else value
    return out


class TrainingArgs(Mapping[str, Any]):
    """Training arguments, validated on construction; read-only mapping.

    Parameters
    ----------
    mapping
        A dict (or another ``TrainingArgs``) of arguments; keys not given take defaults.
    **kwargs
        More arguments; they override ``mapping``.

    Raises
    ------
    TrainingArgsError
        Unknown key (the message lists the valid keys), wrong type, or value out of range.
    """

    def __init__(self, mapping: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        given: dict[str, Any] = {}
        if mapping is not None:
            if not isinstance(mapping, Mapping):
                raise TrainingArgsError(
                    f"training args must be a mapping, got {type(mapping).__name__}"
                )
            given.update(mapping)
        given.update(kwargs)
        unknown = sorted(str(k) for k in given if k not in _DEFAULTS)
        if unknown:
            raise TrainingArgsError(
                f"unknown training arg(s) {unknown}; valid keys are {list(VALID_KEYS)}"
            )
        self._args = _validate(given)

    def dict(self) -> dict[str, Any]:
        """Return the full plain mapping (defaults filled in), safe to put in a message."""
        out = dict(self._args)
        out["optimizer_args"] = dict(out["optimizer_args"])
        out["test_metric_args"] = dict(out["test_metric_args"])
        return out

    def optimizer_arguments(self) -> dict[str, Any]:
        """Keyword arguments for the optimiser: ``lr`` then ``optimizer_args`` (which win)."""
        return {"lr": self._args["lr"], **self._args["optimizer_args"]}

    def __getitem__(self, key: str) -> Any:
        return self._args[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._args)

    def __len__(self) -> int:
        return len(self._args)

    def __repr__(self) -> str:
        return f"TrainingArgs({self._args!r})"
