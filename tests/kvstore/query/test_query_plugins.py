"""Plugins come from installed entry points or register(), never from a request."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidRequest
from kvstore.query.plugins import ENTRY_POINT_GROUP, Plugin, PluginLoadError, PluginRegistry


class FakeEntryPoint:
    def __init__(self, name, loaded):
        self.name = name
        self._loaded = loaded

    def load(self):
        if isinstance(self._loaded, Exception):
            raise self._loaded
        return self._loaded


def square(key, doc):
    return doc.get("x", 0) ** 2 if isinstance(doc, dict) else None


def add(a, b):
    return a + b


def test_register_and_get():
    registry = PluginRegistry()
    registry.register("squares", square, add)
    assert registry.names() == ("squares",)
    assert registry.get("squares") == Plugin(square, add)
    registry.check_installed("squares")


def test_an_unknown_plugin_is_a_caller_error_listing_the_installed_ones():
    registry = PluginRegistry()
    with pytest.raises(InvalidRequest, match="unknown plugin 'x'; installed: none are installed"):
        registry.get("x")
    registry.register("b.two", square, add)
    registry.register("a-one", square, add)
    with pytest.raises(InvalidRequest) as raised:
        registry.get("x")
    assert raised.value.message == "plugin: unknown plugin 'x'; installed: a-one, b.two"


@pytest.mark.parametrize("name", ["", "Upper", "-lead", "a b", "x" * 65, "é"])
def test_plugin_names_are_plain(name):
    with pytest.raises(ValueError, match="use 1-64 of"):
        PluginRegistry().register(name, square, add)


def test_a_plugin_registers_once_with_callables():
    registry = PluginRegistry()
    registry.register("p", square, add)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("p", square, add)
    with pytest.raises(ValueError, match="must be callable"):
        registry.register("q", square, 3)  # type: ignore[arg-type]


def test_entry_points_load_objects_with_map_fn_and_reduce_fn():
    class Duck:
        map_fn = staticmethod(square)
        reduce_fn = staticmethod(add)

    registry = PluginRegistry.from_entry_points(
        [FakeEntryPoint("squares", Plugin(square, add)), FakeEntryPoint("duck", Duck)]
    )
    assert registry.names() == ("duck", "squares")
    assert registry.get("duck").map_fn("k", {"x": 3}) == 9


def test_the_entry_point_group_is_read_from_installed_metadata(monkeypatch):
    seen = {}

    def entry_points(*, group):
        seen["group"] = group
        return [FakeEntryPoint("squares", Plugin(square, add))]

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    assert PluginRegistry.from_entry_points().names() == ("squares",)
    assert seen["group"] == ENTRY_POINT_GROUP == "pyraftkv.query"


def test_no_installed_plugins_is_an_empty_registry():
    assert PluginRegistry.from_entry_points([]).names() == ()
    assert isinstance(PluginRegistry.from_entry_points(), PluginRegistry)


@pytest.mark.parametrize(
    ("entry_point", "message"),
    [
        (FakeEntryPoint("broken", ImportError("no module")), "'broken' failed to load"),
        (FakeEntryPoint("bare", object()), "'bare' failed to load"),
        (FakeEntryPoint("Bad Name", Plugin(square, add)), "use 1-64 of"),
    ],
)
def test_a_broken_entry_point_stops_start_up(entry_point, message):
    with pytest.raises(PluginLoadError, match=message):
        PluginRegistry.from_entry_points([entry_point])
