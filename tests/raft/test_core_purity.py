"""raft.core is I/O-free: no asyncio, sockets, clocks, threads or LMDB, directly or indirectly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import raft.core
from tests.import_scan import top_level_imports

FORBIDDEN = {"asyncio", "socket", "time", "threading", "lmdb", "select", "selectors", "os"}
CORE_DIR = Path(raft.core.__file__).parent


def test_no_core_module_imports_io_or_clock_modules():
    files = sorted(CORE_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        assert not (top_level_imports(path) & FORBIDDEN), path.name


def test_core_imports_only_itself_and_the_standard_library_it_needs():
    for path in CORE_DIR.glob("*.py"):
        for name in top_level_imports(path):
            assert name in {
                "__future__",
                "raft",
                "dataclasses",
                "enum",
                "random",
                "struct",
                "typing",
                "collections",
            }, f"{path.name} imports {name}"


def test_importing_the_core_loads_no_io_module():
    code = (
        "import sys; import raft.core.node, raft.core.storage; "
        "print(','.join(m for m in ('asyncio', 'socket', 'lmdb', 'threading', 'selectors') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
