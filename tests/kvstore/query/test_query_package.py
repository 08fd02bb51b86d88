"""kvstore.query is pure (no asyncio, sockets, clocks, threads, LMDB or HTTP) and exports what
it says it does."""

from __future__ import annotations

import ast
from pathlib import Path

import kvstore.query

FORBIDDEN = {"asyncio", "socket", "time", "threading", "lmdb", "aiohttp", "os", "random"}
PACKAGE_DIR = Path(kvstore.query.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_query_module_imports_io_clock_or_randomness():
    files = sorted(PACKAGE_DIR.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        assert not (imported_modules(path) & FORBIDDEN), path.name


def test_every_public_name_is_exported_and_exists():
    assert len(set(kvstore.query.__all__)) == len(kvstore.query.__all__)
    for name in kvstore.query.__all__:
        assert hasattr(kvstore.query, name), name
