"""kvstore.query is pure (no asyncio, sockets, clocks, threads, LMDB or HTTP) and exports what
it says it does."""

from __future__ import annotations

from pathlib import Path

import kvstore.query
from tests.import_scan import top_level_imports

FORBIDDEN = {"asyncio", "socket", "time", "threading", "lmdb", "aiohttp", "os", "random"}
PACKAGE_DIR = Path(kvstore.query.__file__).parent


def test_no_query_module_imports_io_clock_or_randomness():
    files = sorted(PACKAGE_DIR.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        assert not (top_level_imports(path) & FORBIDDEN), path.name


def test_every_public_name_is_exported_and_exists():
    assert len(set(kvstore.query.__all__)) == len(kvstore.query.__all__)
    for name in kvstore.query.__all__:
        assert hasattr(kvstore.query, name), name
