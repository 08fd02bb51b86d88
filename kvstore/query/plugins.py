"""Server-side map/reduce plugins a query may name: {"fn": "plugin", "plugin": "histogram"}.

Code only ever comes from Python packages installed on the node (entry points of the group
`pyraftkv.query`) or from register() in tests, never from a request. Pure apart from reading
installed package metadata in from_entry_points(), which the node calls once at start-up.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kvstore.errors import InvalidRequest

ENTRY_POINT_GROUP: Final = "pyraftkv.query"
_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

MapFn = Callable[[str, Any], Any]  # (key, JSON document) -> a partial value, or None to skip
ReduceFn = Callable[[Any, Any], Any]  # associative and commutative: (partial, partial) -> partial


@dataclass(frozen=True, slots=True)
class Plugin:
    """map_fn runs on the shard for every matched row holding JSON; reduce_fn combines two
    partial values, on the shard and again on the coordinator, in any order and grouping. A
    partial must be msgpack-friendly (it crosses the wire) and the last one JSON-friendly (it
    is the answer)."""

    map_fn: MapFn
    reduce_fn: ReduceFn


class _PluginLike(Protocol):
    map_fn: MapFn
    reduce_fn: ReduceFn


class _EntryPointLike(Protocol):
    name: str

    def load(self) -> Any: ...


class PluginLoadError(Exception):
    """An installed entry point is not a usable plugin: the node refuses to start with it."""


class PluginRegistry:
    def __init__(self) -> None:
        self._plugins: dict[str, Plugin] = {}

    @classmethod
    def from_entry_points(
        cls, entry_points: Iterable[_EntryPointLike] | None = None
    ) -> PluginRegistry:
        """Load every entry point of group `pyraftkv.query`. Its name names the plugin; it must
        load to an object with callable `map_fn` and `reduce_fn` (e.g. a Plugin)."""
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        registry = cls()
        for entry_point in entry_points:
            try:
                loaded: _PluginLike = entry_point.load()
                map_fn, reduce_fn = loaded.map_fn, loaded.reduce_fn
            except Exception as error:
                raise PluginLoadError(
                    f"query plugin {entry_point.name!r} failed to load: {error!r}"
                ) from error
            try:
                registry.register(entry_point.name, map_fn, reduce_fn)
            except ValueError as error:
                raise PluginLoadError(str(error)) from error
        return registry

    def register(self, name: str, map_fn: MapFn, reduce_fn: ReduceFn) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"query plugin name {name!r}: use 1-64 of a-z 0-9 _ . - (starting alnum)"
            )
        if not callable(map_fn) or not callable(reduce_fn):
            raise ValueError(f"query plugin {name!r}: map_fn and reduce_fn must be callable")
        if name in self._plugins:
            raise ValueError(f"query plugin {name!r} is registered twice")
        self._plugins[name] = Plugin(map_fn, reduce_fn)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._plugins))

    def check_installed(self, name: str, where: str = "plugin") -> None:
        if name not in self._plugins:
            installed = ", ".join(self.names()) or "none are installed"
            raise InvalidRequest(f"{where}: unknown plugin {name!r}; installed: {installed}")

    def get(self, name: str) -> Plugin:
        self.check_installed(name)
        return self._plugins[name]


__all__ = [
    "ENTRY_POINT_GROUP",
    "MapFn",
    "Plugin",
    "PluginLoadError",
    "PluginRegistry",
    "ReduceFn",
]
