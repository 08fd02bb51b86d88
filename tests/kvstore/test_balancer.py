"""Pure placement: map changes apply or are refused deterministically, and the balancer, run to
completion, reaches even replicas and leaders with about the minimum number of moves."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import lmdb
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.balancer import founding_shard_map, plan_changes
from kvstore.map_changes import (
    AbortMove,
    AddNode,
    ChangeRefused,
    DrainNode,
    FinishMove,
    MapChange,
    RemoveNode,
    SetNodeDown,
    SetPreferredLeader,
    StartMove,
    apply_change,
    decode_change,
    encode_change,
)
from kvstore.meta import MetaStateMachine
from kvstore.sharding import META_GROUP_ID, Move, NodeInfo, ShardMap, initial_shard_map
from raft.core.types import NodeId, make_replica_id, node_of


def node_info(node_id: int) -> NodeInfo:
    return NodeInfo(NodeId(node_id), f"http://127.0.0.1:{7000 + node_id}", ("127.0.0.1", 7100))


def founded(node_count: int, shards: int, replication: int = 3) -> ShardMap:
    return initial_shard_map([node_info(i) for i in range(1, node_count + 1)], shards, replication)


@given(node_count=st.integers(1, 9), shards=st.integers(1, 40), replication=st.integers(1, 5))
def test_a_founding_map_is_already_balanced_so_a_new_cluster_moves_nothing(
    node_count, shards, replication
):
    nodes = [node_info(i) for i in range(1, node_count + 1)]
    founding = founding_shard_map(nodes, shards, min(replication, node_count))
    assert founding.epoch == 1
    assert plan_changes(founding, max_moves=100) == []


def settle(shard_map: ShardMap, max_rounds: int = 500) -> tuple[ShardMap, int]:
    """Runs the balancer and completes its moves at once, as the movers would; returns the
    settled map and how many replica moves it took."""
    moves = 0
    for _ in range(max_rounds):
        changes = plan_changes(shard_map, max_moves=2)
        if not changes and not shard_map.moves:
            return shard_map, moves
        for change in changes:
            shard_map = apply_change(shard_map, change)
        for move in shard_map.moves:
            shard_map = apply_change(shard_map, FinishMove(move))
            moves += 1
    raise AssertionError("the balancer did not settle")


def replica_counts(shard_map: ShardMap) -> Counter[NodeId]:
    counts: Counter[NodeId] = Counter({node.id: 0 for node in shard_map.nodes if node.is_active})
    for shard in shard_map.shards:
        counts.update(node_of(replica) for replica in shard.replicas)
    return counts


def leader_counts(shard_map: ShardMap) -> Counter[NodeId]:
    counts: Counter[NodeId] = Counter({node.id: 0 for node in shard_map.nodes if node.is_active})
    counts.update(node_of(shard.replicas[0]) for shard in shard_map.shards)
    return counts


def spread(counts: Counter[NodeId]) -> int:
    return max(counts.values()) - min(counts.values())


@settings(max_examples=40, deadline=None)
@given(start_nodes=st.integers(3, 6), added=st.integers(1, 3), shards=st.integers(1, 24))
def test_adding_nodes_evens_replicas_and_leaders_with_the_fewest_moves(start_nodes, added, shards):
    shard_map, _ = settle(founded(start_nodes, shards))  # rendezvous alone is not exactly even
    for node_id in range(start_nodes + 1, start_nodes + added + 1):
        shard_map = apply_change(shard_map, AddNode(node_info(node_id)))
    settled, moves = settle(shard_map)
    assert spread(replica_counts(settled)) <= 1
    assert spread(leader_counts(settled)) <= 1
    # The minimum: every new node must receive its even share, floor(total / nodes).
    total = 3 * shards
    minimum = added * (total // (start_nodes + added))
    assert moves <= minimum + added  # + at most one per new node for rounding
    for shard in settled.shards:
        assert len({node_of(replica) for replica in shard.replicas}) == 3


def test_adding_one_node_to_three_moves_a_quarter_of_the_replicas():
    shard_map = apply_change(settle(founded(3, 8))[0], AddNode(node_info(4)))
    settled, moves = settle(shard_map)
    assert moves == 6  # 24 replicas / 4 nodes
    assert replica_counts(settled) == Counter({1: 6, 2: 6, 3: 6, 4: 6})


def test_a_draining_node_is_emptied_then_removable_and_its_meta_replica_moves():
    shard_map = founded(4, 8)
    shard_map = apply_change(shard_map, DrainNode(NodeId(1)))
    with pytest.raises(ChangeRefused):
        apply_change(shard_map, RemoveNode(NodeId(1)))
    settled, _ = settle(shard_map)
    assert not settled.replicas_on(NodeId(1))
    assert NodeId(1) not in {node_of(r) for r in settled.meta_voters}
    removed = apply_change(settled, RemoveNode(NodeId(1)))
    assert not removed.has_node(NodeId(1))


def test_a_down_node_has_its_replicas_recreated_on_live_nodes():
    shard_map = apply_change(founded(5, 6), SetNodeDown(NodeId(2), down=True))
    assert shard_map.meta_voters == (1, 2, 3, 4, 5)
    settled, moves = settle(shard_map)
    # Every node holds meta, so its replica on node 2 stays (shrinking the meta group would
    # cost fault tolerance); only the shard replicas move.
    assert moves == len(shard_map.shards_on(NodeId(2)))
    for shard in settled.shards:
        assert NodeId(2) not in {node_of(r) for r in shard.replicas}
        assert len(shard.replicas) == 3


def test_with_too_few_live_nodes_nothing_is_moved():
    shard_map = apply_change(founded(3, 4), SetNodeDown(NodeId(3), down=True))
    assert [c for c in plan_changes(shard_map, max_moves=4) if isinstance(c, StartMove)] == []


def test_a_move_gets_a_replica_id_never_used_before():
    shard_map = apply_change(founded(4, 1), AddNode(node_info(5)))
    leaving = shard_map.shards[0].replicas[0]
    first = apply_change(shard_map, StartMove(1, leaving, NodeId(5)))
    (move,) = first.moves
    assert node_of(move.joining) == 5
    assert move.joining != 5
    back = apply_change(apply_change(first, FinishMove(move)), StartMove(1, move.joining, leaving))
    assert back.moves[0].joining not in (leaving, move.joining)
    assert node_of(back.moves[0].joining) == node_of(leaving)


@pytest.mark.parametrize(
    "change",
    [
        StartMove(1, NodeId(99), NodeId(4)),  # not a replica
        StartMove(1, NodeId(1), NodeId(9)),  # no such node
        FinishMove(Move(1, NodeId(1), make_replica_id(NodeId(4), 7))),  # no such move
        AbortMove(Move(1, NodeId(1), make_replica_id(NodeId(4), 7))),
        AddNode(node_info(1)),  # already there
        DrainNode(NodeId(9)),
        SetPreferredLeader(META_GROUP_ID, NodeId(1)),
    ],
)
def test_changes_whose_precondition_fails_are_refused(change: MapChange):
    shard_map = founded(4, 2, replication=3)
    with pytest.raises(ChangeRefused):
        apply_change(shard_map, change)


def test_only_one_move_per_group():
    shard_map = founded(5, 1)
    replicas = shard_map.shards[0].replicas
    spare = next(n.id for n in shard_map.nodes if n.id not in {node_of(r) for r in replicas})
    moving = apply_change(shard_map, StartMove(1, replicas[0], spare))
    with pytest.raises(ChangeRefused):
        apply_change(moving, StartMove(1, replicas[1], spare))


@pytest.mark.parametrize(
    "change",
    [
        AddNode(node_info(7)),
        DrainNode(NodeId(2)),
        SetNodeDown(NodeId(3), down=True),
        RemoveNode(NodeId(2)),
        StartMove(1, NodeId(2), NodeId(4)),
        FinishMove(Move(1, NodeId(2), make_replica_id(NodeId(4), 3))),
        AbortMove(Move(0, NodeId(2), make_replica_id(NodeId(4), 3))),
        SetPreferredLeader(2, NodeId(3)),
    ],
)
def test_changes_round_trip_through_their_encoding(change: MapChange):
    tag, *fields = msgpack.unpackb(encode_change(change))
    assert decode_change(tag, fields) == change


@pytest.mark.parametrize(
    ("tag", "fields"), [(3, ["x"]), (6, [1, 2]), (99, [1]), (2, [1, "u", ["h"]]), (2, [1, 2, 3])]
)
def test_malformed_changes_are_value_errors(tag, fields):
    with pytest.raises(ValueError, match="map change"):
        decode_change(tag, fields)


def test_a_learned_map_never_becomes_the_applied_state(tmp_path):
    env = lmdb.open(str(tmp_path / "meta"), max_dbs=4)
    untouched_env = lmdb.open(str(tmp_path / "untouched"), max_dbs=4)
    try:
        machine = MetaStateMachine(env)
        founding = founded(3, 2)
        machine.initialize(founding)
        untouched = MetaStateMachine(untouched_env)
        untouched.initialize(founding)
        learned = replace(founding, epoch=9)
        assert machine.adopt(learned)
        assert machine.shard_map == learned  # routing uses the newest it knows
        assert machine.snapshot() == untouched.snapshot()  # Raft state is unchanged
        assert MetaStateMachine(env).shard_map == learned  # and both survive a restart
    finally:
        env.close()
        untouched_env.close()
