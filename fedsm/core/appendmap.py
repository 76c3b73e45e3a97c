"""Append-only mappings that share storage, for the event-sourced job state.

Pure core: no I/O. Folding a reply into a :class:`~fedsm.core.jobstate.JobState` must not copy
the round's mapping (a 1,000-node round would cost O(n^2)): :class:`AppendMap` extends in
O(1) by sharing its dict with the map it came from, and :class:`RoundsView` shows the past
rounds plus the current one as one mapping without copying either.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["EMPTY", "AppendMap", "RoundsView", "empty", "keys_of"]

K = TypeVar("K")
V = TypeVar("V")


class AppendMap(Mapping[K, V]):
    """An immutable mapping whose :meth:`plus` is O(1) by sharing storage.

    ``plus`` of a new key on the newest map of a line appends to the shared dict; the older
    maps keep seeing only their first ``n`` entries (the dict keeps insertion order and each
    entry carries its index). Extending an older map again (a branch) copies its entries
    first, so every map ever returned keeps its contents. Not for concurrent ``plus`` calls
    on the same map from several threads.
    """

    __slots__ = ("_store", "_n")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._store: dict[K, tuple[int, V]] = {}
        for key, value in pairs:
            if key in self._store:
                self._store[key] = (self._store[key][0], value)
            else:
                self._store[key] = (len(self._store), value)
        self._n = len(self._store)

    def __getitem__(self, key: K) -> V:
        index, value = self._store[key]
        if index >= self._n:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        entry = self._store.get(key)  # type: ignore[call-overload]
        return entry is not None and entry[0] < self._n

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[K]:
        return itertools.islice(iter(self._store), self._n)

    def __repr__(self) -> str:
        return f"AppendMap({dict(self.items())!r})"

    def plus(self, key: K, value: V) -> AppendMap[K, V]:
        """A map with ``key`` set to ``value`` (O(1) when ``key`` is new and this map is the
        newest of its line)."""
        if key in self:
            return AppendMap([*((k, v) for k, v in self.items() if k != key), (key, value)])
        return self.plus_new(key, value)

    def plus_new(self, key: K, value: V) -> AppendMap[K, V]:
        """:meth:`plus` for a ``key`` the caller knows is not in this map."""
        store, n = self._store, self._n
        if n == 0:  # never grow a shared empty map (the default of every JobState)
            store = {}
        elif len(store) != n:  # someone extended this map already: branch off a copy
            store = dict(itertools.islice(store.items(), n))
        store[key] = (n, value)
        new = _new_append_map(AppendMap)
        new._store, new._n = store, n + 1
        return new


_new_append_map = object.__new__


def keys_of(amap: AppendMap[K, V]) -> Any:
    """Something that answers ``key in amap`` fast: the shared dict itself when ``amap`` is
    the newest map of its line (the case in every fold), else a set of its keys."""
    store = amap._store
    return store if len(store) == amap._n else set(amap)


EMPTY: AppendMap[Any, Any] = AppendMap()


def empty() -> AppendMap[Any, Any]:
    return EMPTY


class RoundsView(Mapping[int, Mapping[str, Any]]):
    """Per round -> per node: the finished rounds plus the current one, without copying."""

    __slots__ = ("_past", "_round", "_current")

    def __init__(self, past: Mapping[int, Any], round_: int, current: Mapping[str, Any]) -> None:
        self._past, self._round, self._current = past, round_, current

    def __getitem__(self, key: int) -> Mapping[str, Any]:
        if key == self._round and self._round > 0:
            return self._current
        return self._past[key]

    def __iter__(self) -> Iterator[int]:
        yield from self._past
        if self._round > 0:
            yield self._round

    def __len__(self) -> int:
        return len(self._past) + (self._round > 0)
