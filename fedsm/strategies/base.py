"""The strategy interface: what each node receives for a round, and how replies become the
next global parameters. One strategy is one file (a subclass of :class:`Strategy` decorated
with :func:`register`) plus its test.

A strategy is a **pure function of recorded inputs**. Its object holds only its configuration
(hyper-parameters, plain data recorded in the job's opening event); whatever it remembers
between rounds (a server optimiser's moments, Scaffold's control variates) is its *state*: a
mapping of tensors returned by :meth:`Strategy.aggregate`, saved as a file whose digest the
``Aggregated`` event records, and handed back to it next round. So a restored job and the
audit (``fedsm replay --verify --repo``) rebuild the same strategy from the log, fetch the same
state by digest, and get the same bytes: nothing is restored from memory.

The two halves, in the style of Flower's strategies:

- :meth:`Strategy.node_args` (``configure_fit``): per node, small values that travel inside
  the train request (numbers, strings) and tensors that travel as files through the
  repository (the seed's ``aggregator_args_thr_msg`` / ``aggregator_args_thr_files``). On the
  node they reach the training plan as ``plan.aggregator_args`` (files loaded as tensors).
- :meth:`Strategy.aggregate` (``aggregate_fit``): the replies of a round, **in sorted node
  order** (the canonical order: floating-point sums are not associative), each with its
  weight (training samples), its ``extras`` (numbers the node sent beside its parameters,
  e.g. ``num_updates`` and ``lr`` for Scaffold) and its parameters loaded on demand, so that
  a streaming strategy holds one reply at a time.

Names: a strategy registered here is recorded by its :attr:`Strategy.name`; one a user writes
in their experiment code is recorded by its import path ``module:Qualname`` and imported by
a restore or an audit (which say clearly when that code is not importable).
"""

from __future__ import annotations

import abc
import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedsm.errors import FedsmError
from fedsm.training.params import load_params, save_params

__all__ = [
    "AggregateContext",
    "AggregationError",
    "AggregateResult",
    "MissingReplyData",
    "NodeArgsContext",
    "NodeUpdate",
    "Strategy",
    "StrategyError",
    "StrategyNotImportable",
    "UnknownStrategy",
    "aggregate_files",
    "as_strategy",
    "check_number",
    "register",
    "registered",
    "resolve",
    "strategy_name",
]


class StrategyError(FedsmError, ValueError):
    """A strategy can not be built or run: bad hyper-parameters, bad inputs."""


class AggregationError(StrategyError):
    """Updates cannot be aggregated: none, all-zero weights, mismatched tensors, bad order."""


class UnknownStrategy(StrategyError):
    """No strategy of this name (neither registered nor an import path)."""


class StrategyNotImportable(StrategyError):
    """A strategy recorded by import path whose code this Python can not import."""


class MissingReplyData(StrategyError):
    """A node's reply lacks what the strategy needs (e.g. Scaffold's ``num_updates``): that
    node fails the round, the job goes on."""


@dataclass(frozen=True)
class NodeArgsContext:
    """What :meth:`Strategy.node_args` may look at for a round."""

    round: int
    #: The nodes this round is sent to, sorted.
    node_ids: tuple[str, ...]
    #: Every node of the job (the N of Scaffold's averages), sorted.
    all_nodes: tuple[str, ...]
    #: The round's global parameters.
    global_params: Mapping[str, torch.Tensor]
    #: The strategy's state after the previous round (None before the first aggregation).
    state: Mapping[str, torch.Tensor] | None


@dataclass(frozen=True)
class NodeUpdate:
    """One node's reply to a round, its parameters loaded on demand."""

    node_id: str
    #: Training samples (the FedAvg weight).
    weight: float
    #: Numbers the node sent beside its parameters (``num_updates``, ``lr``...).
    extras: Mapping[str, float]
    _load: Callable[[], dict[str, torch.Tensor]] = field(repr=False, compare=False)

    def params(self) -> dict[str, torch.Tensor]:
        """The node's parameters (loaded now; not cached, so a stream holds one at a time)."""
        return self._load()

    @classmethod
    def of(
        cls,
        node_id: str,
        params: Mapping[str, torch.Tensor],
        weight: float,
        extras: Mapping[str, float] | None = None,
    ) -> NodeUpdate:
        """An update whose parameters are already in memory (tests, in-memory callers)."""
        held = dict(params)
        return cls(node_id, float(weight), dict(extras or {}), lambda: dict(held))


@dataclass(frozen=True)
class AggregateContext:
    """What :meth:`Strategy.aggregate` gets for a round."""

    round: int
    global_params: Mapping[str, torch.Tensor]
    #: The replies, sorted by node id (each node once).
    updates: Sequence[NodeUpdate]
    #: Every node of the job, sorted.
    all_nodes: tuple[str, ...]
    #: The strategy's state after the previous round (None before the first aggregation).
    state: Mapping[str, torch.Tensor] | None


@dataclass(frozen=True)
class AggregateResult:
    """The next global parameters, and the strategy's state to keep (None: stateless)."""

    params: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor] | None = None


class Strategy(abc.ABC):
    """An aggregation strategy. Subclasses set :attr:`name`, take their hyper-parameters as
    keyword arguments (checked in ``__init__``, raising :class:`StrategyError`), return them
    from :meth:`config`, and implement :meth:`aggregate` (and :meth:`node_args` if nodes need
    anything). Everything must be deterministic: the same inputs, the same bits.
    """

    #: The registry name, recorded in the job's opening event.
    name: ClassVar[str] = ""
    #: Reply extras the strategy needs; a reply without one fails its node.
    required_extras: ClassVar[tuple[str, ...]] = ()
    #: False when relabelling nodes changes the result (per-node memory, as Scaffold's).
    node_symmetric: ClassVar[bool] = True

    def config(self) -> dict[str, Any]:
        """The hyper-parameters as plain data: ``type(self)(**config())`` is this strategy."""
        return {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Strategy:
        """Rebuild from :meth:`config` (a restore, an audit)."""
        try:
            return cls(**dict(config))
        except TypeError as exc:
            raise StrategyError(
                f"{cls.__name__} can not be built from {dict(config)!r}: {exc}"
            ) from None

    def node_args(self, ctx: NodeArgsContext) -> dict[str, dict[str, Any]]:
        """Per node of ``ctx.node_ids``: ``{arg: value}``. A value that is a mapping of
        tensors travels as a file through the repository; anything else (JSON-like) inside
        the train request. Default: nothing."""
        return {}

    def check_update(self, update: NodeUpdate) -> None:
        """Refuse a reply lacking :attr:`required_extras` (raises :class:`MissingReplyData`)."""
        for key in self.required_extras:
            value = update.extras.get(key)
            if value is None or not math.isfinite(float(value)):
                raise MissingReplyData(
                    f"{self.name or type(self).__name__} needs {key!r} in the reply of "
                    f"{update.node_id}, which has {sorted(update.extras)}"
                )

    @abc.abstractmethod
    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        """The round's replies (sorted by node id) -> the next global parameters and state."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config() == self.config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))


def check_number(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the bounds, else :class:`StrategyError` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StrategyError(f"{owner}: {name} must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise StrategyError(f"{owner}: {name} must be finite, got {value!r}")
    if low is not None and (out < low or (low_open and out == low)):
        sign = ">" if low_open else ">="
        raise StrategyError(f"{owner}: {name} must be {sign} {low}, got {value!r}")
    if high is not None and (out > high or (high_open and out == high)):
        sign = "<" if high_open else "<="
        raise StrategyError(f"{owner}: {name} must be {sign} {high}, got {value!r}")
    return out


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` known by ``cls.name`` (lower-case, unique)."""
    if not cls.name or cls.name != cls.name.lower() or ":" in cls.name:
        raise StrategyError(f"{cls.__name__}.name must be a lower-case name, got {cls.name!r}")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise StrategyError(f"strategy name {cls.name!r} is taken by {other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Strategy]]:
    """Name -> class of every registered strategy (the built-in ones once
    :mod:`fedsm.strategies` is imported)."""
    import fedsm.strategies  # noqa: F401  (registers the built-in strategies)

    return dict(sorted(_REGISTRY.items()))


def strategy_name(strategy: Strategy) -> str:
    """What the log records: the registry name, or ``module:Qualname`` of a user's class."""
    cls = type(strategy)
    if cls.name and registered().get(cls.name) is cls:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve(name: str, config: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy a log names: a registered name, or an import path ``module:Qualname``.

    Raises
    ------
    UnknownStrategy
        Neither a registered name nor an import path.
    StrategyNotImportable
        An import path whose module or class this Python can not import.
    StrategyError
        The configuration does not build the strategy.
    """
    known = registered()
    cls: Any = known.get(name)
    if cls is None:
        if ":" not in name:
            raise UnknownStrategy(
                f"unknown strategy {name!r}; known: {', '.join(known)} (or a user's class as "
                "'module:Class')"
            )
        module_name, _, qualname = name.partition(":")
        try:
            cls = importlib.import_module(module_name)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except Exception as exc:  # any failure of someone else's code is "not importable"
            raise StrategyNotImportable(
                f"the strategy {name!r} recorded in the log is user code this Python can not "
                f"import ({type(exc).__name__}: {exc}); put its module on PYTHONPATH to "
                "restore or audit this job"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise StrategyNotImportable(f"{name!r} is not a fedsm Strategy subclass")
    return cls.from_config(config or {})


def as_strategy(value: Strategy | type[Strategy] | str | None) -> Strategy:
    """What a researcher may pass as ``aggregator=``: a strategy, its class (the seed's
    ``aggregator=FedAverage``), a registered name, or None (FedAvg)."""
    if value is None:
        return registered()["fedavg"]()
    if isinstance(value, str):
        return resolve(value.strip().lower() if ":" not in value else value)
    if isinstance(value, type) and issubclass(value, Strategy):
        return value()
    if isinstance(value, Strategy):
        return value
    raise StrategyError(
        f"aggregator must be a fedsm Strategy (e.g. FedProx(mu=0.01)), its class or its name, "
        f"got {type(value).__name__}"
    )


# ---------------------------------------------------------------------------- files


def _iter_sorted(items: Sequence[tuple[str, Path, float, Mapping[str, float]]]) -> Iterator[Any]:
    ids = [item[0] for item in items]
    if len(set(ids)) != len(ids):
        raise AggregationError(f"duplicate node ids among updates: {sorted(ids)}")
    return iter(sorted(items, key=lambda item: item[0]))


def aggregate_files(
    strategy: Strategy,
    *,
    round: int,
    global_params_path: Path,
    replies: Sequence[tuple[str, Path, float, Mapping[str, float]]],
    all_nodes: Sequence[str],
    state_path: Path | None,
    out_path: Path,
    state_out_path: Path,
    durable: bool = True,
) -> tuple[str, str | None]:
    """The one way a round is aggregated from files, by the Job and by the audit alike.

    ``replies`` are ``(node_id, params_path, weight, extras)`` in any order (sorted here);
    each reply's parameters are loaded when the strategy asks and checked against the
    global parameters' names, shapes and dtypes. Writes the new parameters to ``out_path``
    and the new state (if any) to ``state_out_path`` (fsynced unless ``durable`` is False);
    returns their digests.
    """
    global_params = load_params(global_params_path)
    state = load_params(state_path) if state_path is not None else None

    def loader(path: Path) -> Callable[[], dict[str, torch.Tensor]]:
        return lambda: load_params(path, like=global_params)

    updates = [
        NodeUpdate(node, float(weight), dict(extras), loader(Path(path)))
        for node, path, weight, extras in _iter_sorted(replies)
    ]
    if not updates:
        raise AggregationError("no update to aggregate (the set of replies is empty)")
    for update in updates:
        strategy.check_update(update)
    result = strategy.aggregate(
        AggregateContext(
            round=round,
            global_params=global_params,
            updates=tuple(updates),
            all_nodes=tuple(sorted(all_nodes)),
            state=state,
        )
    )
    digest = save_params(Path(out_path), result.params, durable=durable)
    state_digest = None
    if result.state is not None:
        state_digest = save_params(Path(state_out_path), result.state, durable=durable)
    return digest, state_digest
