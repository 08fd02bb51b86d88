from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.kv_cluster import KVCluster


@pytest.fixture
def kv_cluster(tmp_path: Path) -> Iterator[KVCluster]:
    cluster = KVCluster(tmp_path / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()
