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


@pytest.fixture(scope="module")
def shared_kv_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KVCluster]:
    """One cluster for a module of read-mostly tests that do not kill nodes."""
    cluster = KVCluster(tmp_path_factory.mktemp("shared") / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()
