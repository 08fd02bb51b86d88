"""kvctl's leader routing hashes keys exactly as the nodes do, and picks each shard's leader."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cli import shard_routes
from kvstore import sharding
from tests.cli.conftest import cluster_status_payload


@given(st.text())
def test_kvctl_hashes_keys_onto_the_ring_exactly_as_the_nodes_do(key: str) -> None:
    assert shard_routes.key_token(key) == sharding.key_token(key)


def test_a_key_routes_to_the_leader_of_the_shard_owning_its_token() -> None:
    status = cluster_status_payload(url="http://127.0.0.1:1", leader=1)
    routes = shard_routes.LeaderRoutes(status)  # type: ignore[arg-type]
    half = 1 << 63
    low = next(f"k{i}" for i in range(1000) if sharding.key_token(f"k{i}") < half)
    assert routes.leader_url(low) == "http://127.0.0.1:1"
    assert routes.leader_urls() == {"http://127.0.0.1:1"}


def test_a_shard_without_a_leader_routes_nowhere_in_particular() -> None:
    status = cluster_status_payload(leader=0)
    routes = shard_routes.LeaderRoutes(status)  # type: ignore[arg-type]
    assert routes.leader_url("anything") is None
