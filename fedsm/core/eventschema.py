"""How event fields are declared, checked and decoded fast: the schema machinery of
:mod:`fedsm.core.events`.

Pure core: no I/O. Every event field carries a wire "kind" (:func:`kind_field`); each kind
has one checker (fedsm.core.fields' set, plus the approval statuses). For every event class
:func:`spec_of` computes, once, the (field, checker) pairs construction and decoding use, and
generates two fast decoders: straight-line code that tests every field inline and returns
None whenever the slow path must decide, which then builds the precise error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import field
from typing import TYPE_CHECKING, Any

from fedsm.core.fields import HEX64_RE, INT_MAX, INT_MIN, make_checkers
from fedsm.core.fields import short as _short
from fedsm.errors import FedsmError

if TYPE_CHECKING:
    from fedsm.core.events import Event

__all__ = [
    "APPROVAL_STATUSES",
    "NODE_APPROVAL_STATUSES",
    "EventDecodeError",
    "kind_field",
    "spec_of",
]

#: What a node answers about a plan's approval (``TrainingPlanStatusReply.status``).
NODE_APPROVAL_STATUSES = frozenset({"approved", "rejected", "pending", "unknown"})
#: Values of ``ApprovalChecked.statuses``: a node's answer, or ``no-reply`` when none came.
APPROVAL_STATUSES = NODE_APPROVAL_STATUSES | {"no-reply"}

_MAX_STR = 4096
_MAX_TEXT = 64 * 1024
_MAX_ITEMS = 100_000
_MAX_DEPTH = 8


class EventDecodeError(FedsmError, ValueError):
    """Data that is not a valid event. ``field`` names the offending field, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message if field is None else f"field {field!r}: {message}")
        self.field = field


# --------------------------------------------------------------------------- field checks
# Each event field carries a "kind" in its metadata; one checker per kind. A checker returns
# the value to store (a list becomes a tuple, an int metric a float) or raises. The checkers
# are fedsm.core.fields' set; only the approval statuses are the catalogue's own.


_SHARED = make_checkers(
    EventDecodeError,
    max_str=_MAX_STR,
    max_text=_MAX_TEXT,
    max_items=_MAX_ITEMS,
    max_depth=_MAX_DEPTH,
)
_typed_map = _SHARED["typed_map"]


def _check_status(name: str, value: Any) -> str:
    if type(value) is not str or value not in APPROVAL_STATUSES:
        raise EventDecodeError(
            f"expected one of {sorted(APPROVAL_STATUSES)}, got {_short(value)}", name
        )
    return value


def _check_status_map(name: str, value: Any) -> dict[str, str]:
    return _typed_map(name, value, _check_status)


_CHECKERS: dict[str, Callable[[str, Any], Any]] = {
    **{
        kind: _SHARED[kind]
        for kind in (
            "str",
            "text",
            "sha256",
            "opt_sha256",
            "int",
            "nonneg_int",
            "float",
            "bool",
            "str_tuple",
            "str_map",
            "float_map",
            "bool_map",
            "plain_map",
        )
    },
    "status_map": _check_status_map,
}


def kind_field(kind: str, **kwargs: Any) -> Any:
    """A dataclass field with its wire kind (see ``_CHECKERS``); ``kwargs`` go to
    :func:`dataclasses.field` (a ``default`` for a field added by a later schema version)."""
    if kind not in _CHECKERS:  # pragma: no cover - programming error
        raise AssertionError(kind)
    return field(metadata={"kind": kind}, **kwargs)


# Inline validity tests of the scalar kinds, for the generated fast decoders below. Each is
# exactly the condition under which the kind's checker returns the value unchanged.
_FAST_TESTS = {
    "str": f"type({{v}}) is str and len({{v}}) <= {_MAX_STR}",
    "text": f"type({{v}}) is str and len({{v}}) <= {_MAX_TEXT}",
    "sha256": "type({v}) is str and _hex({v}) is not None",
    "opt_sha256": "{v} is None or (type({v}) is str and _hex({v}) is not None)",
    "int": f"type({{v}}) is int and {INT_MIN} <= {{v}} <= {INT_MAX}",
    "nonneg_int": f"type({{v}}) is int and 0 <= {{v}} <= {INT_MAX}",
    "float": "type({v}) is float and {v} - {v} == 0.0",
    "bool": "type({v}) is bool",
}

# The same for the collection kinds that every round's events carry, as statements: each
# returns None (the slow path) unless its checker would return the value (a list as a tuple).
_FAST_LOOPS = {
    "str_tuple": (
        f"    if type({{v}}) is not list or len({{v}}) > {_MAX_ITEMS}:",
        "        return None",
        "    for _item in {v}:",
        f"        if type(_item) is not str or len(_item) > {_MAX_STR}:",
        "            return None",
        "    {v} = tuple({v})",
    ),
    "str_map": (
        f"    if type({{v}}) is not dict or len({{v}}) > {_MAX_ITEMS}:",
        "        return None",
        "    for _key, _item in {v}.items():",
        "        if not (type(_key) is str and type(_item) is str",
        f"                and len(_key) <= {_MAX_STR} and len(_item) <= {_MAX_STR}):",
        "            return None",
    ),
    "float_map": (
        f"    if type({{v}}) is not dict or len({{v}}) > {_MAX_ITEMS}:",
        "        return None",
        "    for _key, _item in {v}.items():",
        "        if not (type(_key) is str and type(_item) is float and _item - _item == 0.0",
        f"                and len(_key) <= {_MAX_STR}):",
        "            return None",
    ),
}

#: Loop kinds that only test the value: the checked value is the object from the map.
_NO_COPY = frozenset({"str_map", "float_map"})


def _compile_fast_decoder(
    cls: type[Event], *, adopt: bool
) -> Callable[[dict[str, Any]], Event | None]:
    """Generate ``fast(data) -> event | None`` for one class: every field is tested inline
    or by its checker; None means "take the slow path" (which builds the precise error).
    Replay decodes every record, and one generated function is about twice as fast as a
    checker call per field.

    With ``adopt``, ``data`` itself becomes the event's ``__dict__`` when its keys are in
    field order (as the log writes them): one map less per record read, and the values come
    out of one ``data.values()`` unpacking instead of a lookup per field. Only for a map
    nobody else holds, such as one msgpack just built.
    """
    fields = dataclasses.fields(cls)
    pairs = [(f"v{i}", f) for i, f in enumerate(fields)]  # (local name, field)
    names = [v for v, _ in pairs]

    def checks(indent: str) -> list[str]:
        """Statements that return None unless every ``v<i>`` is valid (normalised in place)."""
        body = []
        tests = [
            _FAST_TESTS[f.metadata["kind"]].format(v=v)
            for v, f in pairs
            if f.metadata["kind"] in _FAST_TESTS
        ]
        if tests:
            body.append("if not (" + " and ".join(f"({t})" for t in tests) + "):")
            body.append("    return None")
        for v, f in pairs:
            kind = f.metadata["kind"]
            if kind in _FAST_LOOPS:
                body += [line.format(v=v)[4:] for line in _FAST_LOOPS[kind]]
            elif kind not in _FAST_TESTS:
                body.append(f"{v} = _check_{kind}({f.name!r}, {v})")
        return [indent + line for line in body]

    # Fields whose checked value may be another object than the one in data.
    changed = [
        (v, f.name)
        for v, f in pairs
        if f.metadata["kind"] not in _FAST_TESTS and f.metadata["kind"] not in _NO_COPY
    ]
    lines = ["def fast(data):"]
    if adopt:
        lines.append("    if _keys(data) == _names:")
        if names:
            lines.append(f"        {', '.join(names)}, = data.values()")
        lines += checks("        ")
        lines += [f"        data[{name!r}] = {v}" for v, name in changed]
        lines += ["        event = _new(_cls)", "        _set(event, '__dict__', data)"]
        lines.append("        return event")
    lines += [f"    if len(data) != {len(fields)}:", "        return None", "    try:"]
    lines += [f"        {v} = data[{f.name!r}]" for v, f in pairs]
    lines += ["    except KeyError:", "        return None"]
    lines += checks("    ")
    items = ", ".join(f"{f.name!r}: {v}" for v, f in pairs)
    lines += ["    event = _new(_cls)", "    _set(event, '__dict__', {" + items + "})"]
    lines.append("    return event")
    namespace: dict[str, Any] = {
        "_hex": HEX64_RE.fullmatch,
        **{f"_check_{kind}": check for kind, check in _CHECKERS.items()},
        "_new": object.__new__,
        "_set": object.__setattr__,
        "_cls": cls,
        "_keys": tuple,
        "_names": tuple(f.name for f in fields),
    }
    exec("\n".join(lines), namespace)  # noqa: S102 - code built above from field kinds only
    return namespace["fast"]


def spec_of(cls: type[Event]) -> tuple[tuple[str, Callable[[str, Any], Any]], ...]:
    """(field name, checker) pairs of an event class, computed once per class."""
    spec = cls.__dict__.get("_spec")
    if spec is None:
        spec = tuple((f.name, _CHECKERS[f.metadata["kind"]]) for f in dataclasses.fields(cls))
        cls._spec = spec
        cls._names = frozenset(name for name, _ in spec)
        cls._fast_decode = staticmethod(_compile_fast_decoder(cls, adopt=False))
        cls._fast_decode_owned = staticmethod(_compile_fast_decoder(cls, adopt=True))
    return spec
