"""Field checkers shared by the two wire codecs: protocol messages and log events.

Pure core: no I/O. Both codecs describe every field by a "kind" (``str``, ``sha256``,
``nonneg_int``, ``float_map``, ...) and check it with one function per kind that returns the
value to store or raises the codec's own typed error, naming the field. This module holds
those functions once; each codec builds its set with :func:`make_checkers`, giving the error
class to raise (called as ``error(message, field)``) and its limits.

The rules, the same for both: values are normalised to the exact built-in type (a ``str``
or ``int`` subclass becomes a plain ``str``/``int``), floats anywhere must be finite, maps
may be any ``Mapping``, map keys are bounded like strings, a valid map is returned as it is,
and a digest is exactly 64 lowercase hex digits (no trailing newline).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["INT_MAX", "INT_MIN", "HEX64_RE", "Checker", "make_checkers", "short"]

#: The 64-bit integer range both wire formats allow.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: 64 lowercase hex digits; use with ``fullmatch``.
HEX64_RE = re.compile(r"[0-9a-f]{64}")

#: ``check(field_name, value) -> value to store``; raises the codec's error.
Checker = Callable[[str, Any], Any]


def short(value: Any) -> str:
    """``repr(value)`` cut to 60 characters, for error messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def make_checkers(
    error: Callable[[str, str], Exception],
    *,
    max_str: int,
    max_text: int,
    max_items: int,
    max_depth: int,
) -> dict[str, Callable[..., Any]]:
    """The checkers of every shared kind, by kind name, raising ``error(message, field)``.

    Besides the kinds (``str``, ``text``, ``opt_str``, ``sha256``, ``opt_sha256``, ``int``,
    ``nonneg_int``, ``float``, ``bool``, ``str_tuple``, ``str_map``, ``float_map``,
    ``bool_map``, ``plain_map``, ``map_list``) the result holds two building blocks:
    ``plain(name, value, depth=0)`` for one JSON-like value and
    ``typed_map(name, value, check_item, what="a map")`` for a str-keyed map whose values
    ``check_item`` checks. ``str`` takes an optional ``limit`` (``text`` is ``str`` with
    ``max_text``). Closures, not methods: replay calls them once per field of every record.
    """

    def check_str(name: str, value: Any, limit: int = max_str) -> str:
        if type(value) is str and len(value) <= limit:
            return value
        if type(value) is not str:
            if not isinstance(value, str):
                raise error(f"expected a string, got {type(value).__name__}", name)
            value = str(value)
        if len(value) > limit:
            raise error(f"string longer than {limit} characters", name)
        return value

    def check_text(name: str, value: Any) -> str:
        return check_str(name, value, max_text)

    def check_opt_str(name: str, value: Any) -> str | None:
        return None if value is None else check_str(name, value)

    hex_full = HEX64_RE.fullmatch

    def check_sha256(name: str, value: Any) -> str:
        if type(value) is not str or hex_full(value) is None:
            raise error(f"expected 64 lowercase hex digits, got {short(value)}", name)
        return value

    def check_opt_sha256(name: str, value: Any) -> str | None:
        return None if value is None else check_sha256(name, value)

    def check_int(name: str, value: Any) -> int:
        if type(value) is int and INT_MIN <= value <= INT_MAX:
            return value
        if type(value) is not int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise error(f"expected an integer, got {type(value).__name__}", name)
            value = int(value)
        if not INT_MIN <= value <= INT_MAX:
            raise error("integer out of the 64-bit range", name)
        return value

    def check_nonneg_int(name: str, value: Any) -> int:
        value = check_int(name, value)
        if value < 0:
            raise error(f"expected an integer >= 0, got {value}", name)
        return value

    def check_float(name: str, value: Any) -> float:
        if type(value) is float and value - value == 0.0:  # false for inf and nan
            return value
        if type(value) is not float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise error(f"expected a number, got {type(value).__name__}", name)
            value = float(value)
        if not math.isfinite(value):
            raise error("expected a finite number", name)
        return value

    def check_bool(name: str, value: Any) -> bool:
        if type(value) is not bool:
            raise error(f"expected a boolean, got {type(value).__name__}", name)
        return value

    def check_str_tuple(name: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            raise error(f"expected a list of strings, got {type(value).__name__}", name)
        if len(value) > max_items:
            raise error(f"more than {max_items} items", name)
        for i, item in enumerate(value):
            if type(item) is not str:
                check_str(f"{name}[{i}]", item)
            elif len(item) > max_str:
                raise error(f"string longer than {max_str} characters", f"{name}[{i}]")
        return value if type(value) is tuple else tuple(value)

    def typed_map(
        name: str, value: Any, check_item: Checker, what: str = "a map"
    ) -> dict[str, Any]:
        if type(value) is not dict:
            if not isinstance(value, Mapping):
                raise error(f"expected {what}, got {type(value).__name__}", name)
            value = dict(value)
        if len(value) > max_items:
            raise error(f"more than {max_items} entries", name)
        changed = False
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise error(f"map key {short(key)} is not a string", name)
            if len(key) > max_str:
                raise error(f"map key longer than {max_str} characters", name)
            checked = check_item(f"{name}.{key}", item)
            changed = changed or checked is not item
            out[key] = checked
        return out if changed else value

    def check_str_map(name: str, value: Any) -> dict[str, str]:
        if type(value) is dict and len(value) <= max_items:  # fast path: already valid
            for key, item in value.items():
                if (
                    type(key) is not str
                    or type(item) is not str
                    or len(key) > max_str
                    or len(item) > max_str
                ):
                    break
            else:
                return value
        return typed_map(name, value, check_str)

    def check_float_map(name: str, value: Any) -> dict[str, float]:
        if type(value) is dict and len(value) <= max_items:  # fast path: already valid
            for key, item in value.items():
                if (
                    type(key) is not str
                    or type(item) is not float
                    or item - item != 0.0
                    or len(key) > max_str
                ):
                    break
            else:
                return value
        return typed_map(name, value, check_float)

    def check_bool_map(name: str, value: Any) -> dict[str, bool]:
        return typed_map(name, value, check_bool)

    def check_plain(name: str, value: Any, depth: int = 0) -> Any:
        """A JSON-like value: None, bool, int, float, str, lists and str-keyed maps."""
        if depth > max_depth:
            raise error(f"nested deeper than {max_depth} levels", name)
        if value is None or type(value) is bool:
            return value
        if isinstance(value, str):
            return check_str(name, value, max_text)
        if isinstance(value, int):
            return check_int(name, value)
        if isinstance(value, float):
            return check_float(name, value)
        if isinstance(value, (list, tuple)):
            if len(value) > max_items:
                raise error(f"more than {max_items} items", name)
            # Lists, not tuples, inside plain values: that is what msgpack gives back.
            return [check_plain(f"{name}[{i}]", v, depth + 1) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return check_plain_map(name, value, depth)
        raise error(f"unsupported value of type {type(value).__name__}", name)

    def check_plain_map(name: str, value: Any, depth: int = 0) -> dict[str, Any]:
        return typed_map(name, value, lambda n, v: check_plain(n, v, depth + 1))

    def check_map_list(name: str, value: Any) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, (list, tuple)):
            raise error(f"expected a list of maps, got {type(value).__name__}", name)
        if len(value) > max_items:
            raise error(f"more than {max_items} items", name)
        return tuple(check_plain_map(f"{name}[{i}]", v) for i, v in enumerate(value))

    return {
        "str": check_str,
        "text": check_text,
        "opt_str": check_opt_str,
        "sha256": check_sha256,
        "opt_sha256": check_opt_sha256,
        "int": check_int,
        "nonneg_int": check_nonneg_int,
        "float": check_float,
        "bool": check_bool,
        "str_tuple": check_str_tuple,
        "str_map": check_str_map,
        "float_map": check_float_map,
        "bool_map": check_bool_map,
        "plain_map": check_plain_map,
        "map_list": check_map_list,
        "plain": check_plain,
        "typed_map": typed_map,
    }
