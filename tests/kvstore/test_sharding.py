"""Pure sharding: the ring is covered, placement is deterministic and spread, maps round-trip."""

from __future__ import annotations

from collections import Counter

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.meta import MetaStateMachine
from kvstore.sharding import TOKEN_SPACE, NodeInfo, ShardMap, initial_shard_map, key_token
from raft.core.types import NodeId


def nodes(count: int) -> list[NodeInfo]:
    return [
        NodeInfo(NodeId(i), f"http://127.0.0.1:{7000 + i}", ("127.0.0.1", 7100 + i))
        for i in range(1, count + 1)
    ]


@settings(max_examples=60, deadline=None)
@given(
    node_count=st.integers(1, 9),
    shard_count=st.integers(1, 64),
    replication=st.integers(1, 5),
    keys=st.lists(st.text(min_size=1, max_size=40), max_size=30),
)
def test_every_key_has_exactly_one_shard_with_distinct_replicas(
    node_count, shard_count, replication, keys
):
    replication = min(replication, node_count)
    shard_map = initial_shard_map(nodes(node_count), shard_count, replication)
    assert shard_map.shards[0].start_token == 0
    assert shard_map.shards[-1].end_token == TOKEN_SPACE
    for shard in shard_map.shards:
        assert len(set(shard.replicas)) == replication
    for key in keys:
        owners = [s for s in shard_map.shards if s.owns(key_token(key))]
        assert owners == [shard_map.shard_for_key(key)]
    assert ShardMap.decode(shard_map.encode()) == shard_map


def test_placement_is_deterministic_and_spreads_leaders_and_replicas():
    first = initial_shard_map(nodes(5), 40, 3)
    assert first == initial_shard_map(list(reversed(nodes(5))), 40, 3)
    preferred = Counter(shard.replicas[0] for shard in first.shards)
    assert max(preferred.values()) - min(preferred.values()) <= 2  # the balancer evens the rest
    replicas = Counter(node for shard in first.shards for node in shard.replicas)
    assert set(replicas.values()) == {24}  # 120 replicas, 5 nodes


def test_the_key_hash_is_stable_across_processes_and_versions():
    assert key_token("hello") == 0x26C7827D889F6DA3  # xxh64, seed 0: never Python's hash()


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="replication"):
        initial_shard_map(nodes(2), 4, 3)
    with pytest.raises(ValueError, match="shards"):
        initial_shard_map(nodes(3), 0, 1)


def test_a_node_adopts_only_a_newer_shard_map(tmp_path):
    env = lmdb.open(str(tmp_path), max_dbs=8, map_size=1 << 24)
    meta = MetaStateMachine(env)
    first = initial_shard_map(nodes(3), 4, 3)
    meta.initialize(first)
    newer = ShardMap(epoch=2, shards=first.shards, nodes=first.nodes, meta_voters=first.meta_voters)
    assert meta.adopt(newer) is True
    assert meta.adopt(first) is False
    assert MetaStateMachine(env).shard_map == newer  # survives a restart
    env.close()
