"""LocalReplicas hosts exactly what the shard map names, and never lets a new replica id start
on the state of an older one (real LMDB and a real RaftHost, not started: no I/O needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.commands import Put, SplitShard, encode_command
from kvstore.local_replicas import LocalReplicas
from kvstore.map_changes import (
    AddNode,
    FinishMove,
    FinishSplit,
    StartMove,
    StartSplit,
    apply_change,
)
from kvstore.meta import MetaStateMachine
from kvstore.sharding import META_GROUP_ID, NodeInfo, ShardMap, initial_shard_map, key_token
from kvstore.state_machine import KVStateMachine
from raft.core.messages import Entry
from raft.core.types import LogIndex, NodeId, Term, node_of
from raft.runtime.host import HostConfig, RaftHost
from raft.storage.lmdb_log import GroupId, LmdbLogStore

NODE = NodeId(1)


def node_info(node_id: int) -> NodeInfo:
    return NodeInfo(NodeId(node_id), f"http://127.0.0.1:{7000 + node_id}", ("127.0.0.1", 7100))


class Node:
    def __init__(self, path: Path) -> None:
        self.store = LmdbLogStore(path, sync=False)
        self.host = RaftHost(HostConfig(node_id=NODE), self.store)
        self.meta = MetaStateMachine(self.store.env)
        self.shards: dict[int, KVStateMachine] = {}
        self.replicas = LocalReplicas(NODE, self.host, self.store, self.meta, self.shards)

    def write_key(self, shard_id: int, key: str) -> None:
        machine = self.shards[shard_id]
        entry = Entry(
            Term(1), LogIndex(machine.applied_index() + 1), encode_command(Put(key, b"v"))
        )
        with self.store.env.begin(write=True) as txn:
            machine.apply(txn, [entry])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    made = Node(tmp_path / "lmdb")
    try:
        yield made
    finally:
        made.store.close()


def founding() -> ShardMap:
    shard_map = initial_shard_map([node_info(i) for i in (1, 2, 3)], 2, 3)
    return apply_change(shard_map, AddNode(node_info(4)))


def test_a_founding_node_hosts_the_meta_group_and_its_shards(node: Node):
    node.replicas.sync(founding())
    assert sorted(node.host.group_ids()) == [META_GROUP_ID, 1, 2]
    assert all(node.host.replica_id(group) == NODE for group in node.host.group_ids())


def test_a_replica_moved_away_is_removed_with_its_data_and_a_later_one_starts_empty(node: Node):
    shard_map = founding()
    node.replicas.sync(shard_map)
    node.write_key(1, "k")
    assert node.shards[1].get("k") is not None

    away = apply_change(shard_map, StartMove(1, NodeId(1), NodeId(4)))
    node.replicas.sync(away)  # still a member while the move runs
    assert node.host.replica_id(1) == NODE
    finished = apply_change(away, FinishMove(away.moves[0]))
    node.replicas.sync(finished)
    assert not node.host.has_group(1)
    assert KVStateMachine(node.store.env, 1).get("k") is None
    assert GroupId(1) not in node.store.group_ids()

    leaving = finished.shard(1).replicas[0]
    back = apply_change(finished, StartMove(1, leaving, NODE))
    node.replicas.sync(back)
    joining = back.moves[0].joining
    assert node.host.replica_id(1) == joining
    assert joining != NODE
    assert node_of(joining) == NODE
    assert node.shards[1].applied_index() == 0
    assert node.host.status(1).voters == ()  # no bootstrap: it learns the group from its leader


def test_state_left_by_a_crash_before_the_wipe_is_wiped_before_a_new_replica_starts(node: Node):
    shard_map = founding()
    node.replicas.sync(shard_map)
    node.write_key(2, "stale")
    # The crash: the map moved shard 2 away, but the node never removed its replica.
    node.host.remove_group(2)  # what a restart without the group amounts to, minus the wipe
    node.shards.pop(2)
    away = apply_change(shard_map, StartMove(2, NodeId(1), NodeId(4)))
    gone = apply_change(away, FinishMove(away.moves[0]))
    back = apply_change(gone, StartMove(2, gone.shard(2).replicas[0], NODE))
    node.replicas.sync(back)
    assert node.shards[2].get("stale") is None
    assert node.shards[2].applied_index() == 0


def split_shard_one(shard_map: ShardMap) -> tuple[ShardMap, int]:
    """The map after shard 1 split at its middle (FinishSplit), and the new shard's id."""
    parent = shard_map.shard(1)
    middle = (parent.start_token + parent.end_token) // 2
    started = apply_change(shard_map, StartSplit(1, middle))
    (split,) = started.splits
    return apply_change(started, FinishSplit(split)), split.child_id


def apply_to(node: Node, shard_id: int, command: SplitShard) -> None:
    machine = node.shards[shard_id]
    entry = Entry(Term(1), LogIndex(machine.applied_index() + 1), encode_command(command))
    with node.store.env.begin(write=True) as txn:
        machine.apply(txn, [entry])


def test_a_split_half_starts_from_the_handover_waits_for_it_or_starts_empty(node: Node):
    shard_map = founding()
    node.replicas.sync(shard_map)
    keys = [f"k{i}" for i in range(40)]
    for key in keys:
        node.write_key(1, key)
    finished, child = split_shard_one(shard_map)
    node.replicas.sync(finished)
    assert not node.host.has_group(child)  # the local parent has not handed over yet: wait
    split_token = finished.shard(child).start_token
    apply_to(node, 1, SplitShard(child, split_token))
    node.replicas.sync(finished)
    assert node.host.has_group(child)  # from the handed-over data, with the parent's voters
    assert node.host.status(child).voters == tuple(sorted(finished.shard(child).replicas))
    moved = [key for key in keys if key_token(key) >= split_token]
    assert moved
    assert all(node.shards[child].get(key) is not None for key in moved)


def test_a_split_half_whose_local_parent_skipped_the_split_starts_empty(node: Node):
    shard_map = founding()
    finished, child = split_shard_one(shard_map)
    node.replicas.sync(finished)  # a parent that is past the split: it holds only its half
    with node.store.env.begin(write=True) as txn:
        node.shards[1]._write_range(txn, 0, finished.shard(child).start_token)
    node.replicas.sync(finished)
    assert node.host.has_group(child)
    assert node.host.status(child).voters == ()  # a joiner: it learns the group by snapshot


def test_a_split_half_started_from_the_handover_compacts_its_log_at_once(node: Node):
    """Its data did not come through its log: an empty replica must get a snapshot of it."""
    shard_map = founding()
    node.replicas.sync(shard_map)
    for key in ("a", "b", "c"):
        node.write_key(1, key)
    finished, child = split_shard_one(shard_map)
    apply_to(node, 1, SplitShard(child, finished.shard(child).start_token))
    node.replicas.sync(finished)
    assert node.host.has_group(child)
    assert node.host._group(child).snapshot_wanted
