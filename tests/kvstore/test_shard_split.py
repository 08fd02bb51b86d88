"""SplitShard on real LMDB: the keys at or above the split token go to the child shard with
their versions, every replica computes the same two halves, and afterwards each half refuses
the other's keys as a stale map (the router refreshes it) rather than answering wrongly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest

from kvstore.balancer import founding_shard_map, plan_changes
from kvstore.commands import (
    FAILED_INVALID,
    FAILED_WRONG_SHARD,
    Failed,
    Put,
    PutBatch,
    SplitApplied,
    SplitShard,
    decode_command,
    encode_command,
)
from kvstore.encryption import ValueCipher
from kvstore.map_changes import (
    AddNode,
    ChangeRefused,
    FinishSplit,
    StartMove,
    StartSplit,
    apply_change,
    decode_change,
    encode_change,
)
from kvstore.reconciler import plan_splits
from kvstore.service import KeyVersion
from kvstore.sharding import TOKEN_SPACE, NodeInfo, ShardMap, ShardSpec, Split, key_token
from kvstore.state_machine import KVStateMachine, RangeMovedError
from raft.core.messages import Snapshot, SnapshotMeta
from raft.core.types import LogIndex, NodeId
from tests.kvstore.test_state_machine import Driver, open_env

PARENT = 3
CHILD = 9
SPLIT = TOKEN_SPACE // 2
KEYS = [f"split/{i}" for i in range(60)]


def written(env: lmdb.Environment, cipher: ValueCipher | None = None) -> Driver:
    driver = Driver(env, KVStateMachine(env, PARENT, cipher=cipher))
    driver.apply(*(Put(key, key.encode() * 2) for key in KEYS))
    driver.apply(Put(KEYS[0], b"rewritten", idempotency_key="retry-me"))
    return driver


def test_a_split_command_round_trips_and_refuses_bad_fields():
    command = SplitShard(CHILD, SPLIT)
    assert decode_command(encode_command(command)) == command
    for child, token in [(0, SPLIT), (CHILD, 0), (CHILD, TOKEN_SPACE), (True, SPLIT)]:
        with pytest.raises(ValueError, match="must be an integer"):
            SplitShard(child, token)


def test_the_upper_half_moves_with_its_versions_and_nothing_is_lost(tmp_path: Path):
    env = open_env(tmp_path / "replica")
    driver = written(env)
    before = {item.key: item for item in driver.machine.scan(limit=1000)}
    (outcome,) = driver.apply(SplitShard(CHILD, SPLIT))
    child = KVStateMachine(env, CHILD)
    kept = {item.key: item for item in driver.machine.scan(limit=1000)}
    moved = {item.key: item for item in child.scan(limit=1000)}
    assert all(key_token(key) < SPLIT for key in kept)
    assert all(key_token(key) >= SPLIT for key in moved)
    assert kept | moved == before  # every key, value and version
    assert moved
    assert kept
    assert outcome == SplitApplied(driver.next_index - 1, len(moved), len(kept))
    assert driver.machine.token_range() == (0, SPLIT)
    assert child.token_range() == (SPLIT, TOKEN_SPACE)
    assert child.applied_index() == 0  # its own log starts empty; its data came with the split


def test_every_replica_computes_the_same_halves(tmp_path: Path):
    snapshots = []
    for name in ("a", "b"):
        env = open_env(tmp_path / name)
        driver = written(env)
        driver.apply(SplitShard(CHILD, SPLIT))
        snapshots.append((driver.machine.snapshot(), KVStateMachine(env, CHILD).snapshot()))
    assert snapshots[0] == snapshots[1]


def test_after_a_split_each_half_refuses_the_others_keys_as_a_stale_map(tmp_path: Path):
    env = open_env(tmp_path / "replica")
    driver = written(env)
    driver.apply(SplitShard(CHILD, SPLIT))
    upper = next(key for key in KEYS if key_token(key) >= SPLIT)
    lower = next(key for key in KEYS if key_token(key) < SPLIT)
    refused, accepted, batch = driver.apply(
        Put(upper, b"x"), Put(lower, b"y"), PutBatch(((lower, b"z"), (upper, b"z")))
    )
    assert isinstance(refused, Failed)
    assert refused.code == FAILED_WRONG_SHARD
    assert refused.to_error().code == "stale_shard_map"
    assert isinstance(accepted, KeyVersion)
    assert isinstance(batch, Failed)  # all or nothing: one key of the batch left
    child = Driver(env, KVStateMachine(env, CHILD))
    (child_refused, child_accepted) = child.apply(Put(lower, b"x"), Put(upper, b"w"))
    assert isinstance(child_refused, Failed)
    assert child_refused.code == FAILED_WRONG_SHARD
    assert isinstance(child_accepted, KeyVersion)
    assert child.machine.get(upper).value == b"w"


def test_a_read_view_refuses_a_span_the_split_took_in_its_own_transaction(tmp_path: Path):
    """A query scan checks the range it was planned on inside the read transaction it scans:
    a split committing just before cannot hide the moved keys from it."""
    env = open_env(tmp_path / "replica")
    driver = written(env)
    with driver.machine.read_view(must_hold=(0, TOKEN_SPACE)) as view:
        assert sum(len(batch) for batch in view.row_batches(b"", True)) == len(KEYS)
    driver.apply(SplitShard(CHILD, SPLIT))
    with (
        pytest.raises(RangeMovedError) as moved,
        driver.machine.read_view(must_hold=(0, TOKEN_SPACE)),
    ):
        pass
    assert moved.value.held == (0, SPLIT)
    with driver.machine.read_view(must_hold=(0, SPLIT)) as view:
        kept = [key for batch in view.row_batches(b"", True) for key, _ in batch]
    assert kept
    assert all(key_token(key.decode()) < SPLIT for key in kept)


def test_a_parent_lagging_the_split_leaves_the_childs_keys_out_when_told(tmp_path: Path):
    """A stale scan or query may reach a replica of the parent that has not applied the split
    the map shows: it still holds the upper half, which the child serves too. Told that the
    map shows a split (drop_outside), it leaves those keys out rather than return them twice."""
    env = open_env(tmp_path / "replica")
    driver = written(env)  # the split is not applied here yet
    lower = (0, SPLIT)
    expected = sorted(key for key in KEYS if key_token(key) < SPLIT)
    assert len(expected) < len(KEYS)
    scanned = driver.machine.scan(limit=1000, must_hold=lower, drop_outside=True)
    assert [item.key for item in scanned] == expected
    assert len(driver.machine.scan(limit=1000, must_hold=lower)) == len(KEYS)
    with driver.machine.read_view(must_hold=lower, drop_outside=True) as view:
        rows = [key.decode() for batch in view.row_batches(b"", True) for key, _ in batch]
    assert rows == expected
    driver.apply(SplitShard(CHILD, SPLIT))  # applied: it holds just the span, nothing to drop
    scanned = driver.machine.scan(limit=1000, must_hold=lower, drop_outside=True)
    assert [item.key for item in scanned] == expected


def test_snapshots_carry_each_halfs_range_to_a_replica_restored_from_them(tmp_path: Path):
    env = open_env(tmp_path / "replica")
    driver = written(env)
    driver.apply(SplitShard(CHILD, SPLIT))
    child = KVStateMachine(env, CHILD)
    for machine, token_range in ((driver.machine, (0, SPLIT)), (child, (SPLIT, TOKEN_SPACE))):
        other = open_env(tmp_path / f"restored-{machine.shard_id}")
        restored = KVStateMachine(other, machine.shard_id)
        index = machine.applied_index()
        with other.begin(write=True) as txn:
            restored.restore(txn, Snapshot(SnapshotMeta(LogIndex(index)), machine.snapshot()))
        assert restored.token_range() == token_range
        assert restored.has_split_range()
        assert restored.data_hash() == machine.data_hash()


def test_a_lagging_parent_does_not_overwrite_a_child_that_got_its_own_snapshot(tmp_path: Path):
    source = open_env(tmp_path / "source")
    ahead = written(source)
    ahead.apply(SplitShard(CHILD, SPLIT))
    ahead_child = Driver(source, KVStateMachine(source, CHILD))
    (_, upper_key) = next((i, k) for i, k in enumerate(KEYS) if key_token(k) >= SPLIT)
    ahead_child.apply(Put(upper_key, b"newer, on the child"))
    lagging = open_env(tmp_path / "lagging")
    behind = written(lagging)
    child = KVStateMachine(lagging, CHILD)
    with lagging.begin(write=True) as txn:  # the child's leader gave it a snapshot first
        snapshot = ahead_child.machine.snapshot()
        meta = SnapshotMeta(LogIndex(ahead_child.machine.applied_index()))
        child.restore(txn, Snapshot(meta, snapshot))
    (outcome,) = behind.apply(SplitShard(CHILD, SPLIT))
    assert isinstance(outcome, SplitApplied)
    assert child.get(upper_key).value == b"newer, on the child"
    assert child.data_hash() == ahead_child.machine.data_hash()
    assert behind.machine.data_hash() == ahead.machine.data_hash()


def test_a_retried_write_finds_its_outcome_on_the_child_too(tmp_path: Path):
    env = open_env(tmp_path / "replica")
    driver = written(env)
    (recorded,) = driver.apply(Put(KEYS[0], b"rewritten", idempotency_key="retry-me"))
    driver.apply(SplitShard(CHILD, SPLIT))
    child = Driver(env, KVStateMachine(env, CHILD))
    if key_token(KEYS[0]) >= SPLIT:
        (retried,) = child.apply(Put(KEYS[0], b"rewritten", idempotency_key="retry-me"))
    else:
        (retried,) = driver.apply(Put(KEYS[0], b"rewritten", idempotency_key="retry-me"))
    assert retried == recorded


def test_a_split_outside_the_shards_range_is_refused(tmp_path: Path):
    env = open_env(tmp_path / "replica")
    driver = written(env)
    driver.apply(SplitShard(CHILD, SPLIT))
    (again,) = driver.apply(SplitShard(CHILD + 1, SPLIT + 1))
    assert isinstance(again, Failed)
    assert again.code == FAILED_INVALID
    assert driver.machine.token_range() == (0, SPLIT)


def test_encrypted_values_are_sealed_anew_for_the_child(tmp_path: Path):
    cipher = ValueCipher({"k1": os.urandom(32)}, "k1")
    env = open_env(tmp_path / "replica")
    driver = written(env, cipher)
    driver.apply(SplitShard(CHILD, SPLIT))
    child = KVStateMachine(env, CHILD, cipher=cipher)
    moved = child.scan(limit=1000)
    assert moved
    assert all(item.value in (item.key.encode() * 2, b"rewritten") for item in moved)


def test_clearing_the_child_forgets_its_range(tmp_path: Path):
    env = open_env(tmp_path / "replica")
    driver = written(env)
    driver.apply(SplitShard(CHILD, SPLIT))
    child = KVStateMachine(env, CHILD)
    child.clear()
    assert child.token_range() == (0, TOKEN_SPACE)
    assert child.scan(limit=10) == []


# --- the shard map's side: StartSplit records the split, FinishSplit puts the child in ---


def three_nodes() -> ShardMap:
    nodes = [NodeInfo(NodeId(i), f"http://n{i}", ("127.0.0.1", 7000 + i)) for i in (1, 2, 3)]
    return founding_shard_map(nodes, 4, 3)


def test_a_split_runs_from_start_to_finish_in_the_map():
    before = three_nodes()
    parent = before.shard(2)
    middle = (parent.start_token + parent.end_token) // 2
    started = apply_change(before, StartSplit(2, middle))
    (split,) = started.splits
    assert split == Split(2, 5, middle)  # the next unused shard id
    assert started.shards == before.shards  # routing is unchanged until the handover is done
    finished = apply_change(started, FinishSplit(split))
    assert finished.splits == ()
    assert finished.split_that_made(5) == split  # how a node knows shard 5 came by handover
    assert finished.split_that_made(2) is None
    assert finished.epoch == before.epoch + 2
    assert [s.id for s in finished.shards] == [1, 2, 5, 3, 4]  # the ring stays in token order
    assert finished.shard(2) == ShardSpec(2, parent.start_token, middle, parent.replicas)
    assert finished.shard(5) == ShardSpec(5, middle, parent.end_token, parent.replicas)
    for key in KEYS:
        old, new = before.shard_for_key(key), finished.shard_for_key(key)
        assert new.id == old.id or (old.id, new.id) == (2, 5)
    assert ShardMap.decode(finished.encode()) == finished
    assert ShardMap.decode(started.encode()) == started


@pytest.mark.parametrize(
    "change",
    [
        StartSplit(0, 5),  # the meta group
        StartSplit(2, 0),  # not inside the shard's range
        StartSplit(2, TOKEN_SPACE),
        FinishSplit(Split(2, 5, 7)),  # never started
    ],
)
def test_splits_that_cannot_be_are_refused(change):
    with pytest.raises((ChangeRefused, KeyError)):
        apply_change(three_nodes(), change)


def test_a_shard_splits_or_moves_but_never_both_at_once():
    shard_map = three_nodes()
    parent = shard_map.shard(1)
    middle = (parent.start_token + parent.end_token) // 2
    splitting = apply_change(shard_map, StartSplit(1, middle))
    with pytest.raises(ChangeRefused, match="being split"):
        apply_change(splitting, StartMove(1, parent.replicas[0], NodeId(3)))
    with pytest.raises(ChangeRefused, match="in progress"):
        apply_change(splitting, StartSplit(1, middle + 1))
    grown = apply_change(splitting, AddNode(NodeInfo(NodeId(4), "http://n4", ("127.0.0.1", 7004))))
    assert all(change.group != 1 for change in plan_changes(grown, max_moves=10))


def test_split_changes_round_trip_through_the_meta_log_codec():
    for change in (StartSplit(2, 12345), FinishSplit(Split(2, 5, 12345))):
        tag, *fields = msgpack.unpackb(encode_change(change))
        assert decode_change(tag, fields) == change


def statuses_with(key_counts: dict[int, int]) -> dict[NodeId, dict[str, Any] | None]:
    groups = {str(shard): {"key_count": count} for shard, count in key_counts.items()}
    return {NodeId(1): {"groups": groups}, NodeId(2): None}  # node 2 did not answer


def test_an_automatic_split_cuts_the_fullest_shard_over_the_threshold_at_its_middle():
    shard_map = three_nodes()
    fullest = shard_map.shard(3)
    middle = (fullest.start_token + fullest.end_token) // 2
    statuses = statuses_with({1: 150, 2: 90, 3: 400})
    assert plan_splits(shard_map, statuses, split_keys=100) == [StartSplit(3, middle)]
    assert plan_splits(shard_map, statuses, split_keys=0) == []  # off
    assert plan_splits(shard_map, statuses, split_keys=500) == []
    splitting = apply_change(shard_map, StartSplit(3, middle))
    assert plan_splits(splitting, statuses, split_keys=100) == []  # one at a time
