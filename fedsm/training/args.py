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
- ``test_metric`` (None): the metric to report first, one of :data:`TEST_METRICS`.
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

__all__ = ["TEST_METRICS", "TrainingArgs", "TrainingArgsError"]

log = logging.getLogger(__name__)

TEST_METRICS = ("accuracy", "loss")
"""Metric names ``test_metric`` may take."""


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
    if metric is not None and metric not in TEST_METRICS:
        raise TrainingArgsError(
            f"training arg 'test_metric' must be one of {list(TEST_METRICS)} or None, "
            f"got {metric!r}"
        )
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
