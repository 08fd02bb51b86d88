"""The user table in MetaStateMachine: applied from the log, kept on disk, carried in snapshots
(and older snapshots without users still restore), and never left without an admin."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from kvstore.auth import Grants, User, hash_token
from kvstore.meta import (
    LAST_ADMIN_REFUSED,
    MetaStateMachine,
    check_meta_command,
    encode_delete_user,
    encode_put_user,
)
from kvstore.sharding import NodeInfo, initial_shard_map
from raft.core.messages import Entry, Snapshot, SnapshotMeta
from raft.core.types import LogIndex, NodeId, Term

ADMIN = User("admin", Grants(admin=True), hash_token("kvt_admin"))
ALICE = User("alice", Grants(read=("a/",), write=("a/",)), hash_token("kvt_alice"))
NODES = [NodeInfo(NodeId(1), "http://127.0.0.1:1", ("127.0.0.1", 2))]


@pytest.fixture
def env(tmp_path: Path):
    environment = lmdb.open(str(tmp_path / "meta"), max_dbs=8, map_size=64 << 20)
    yield environment
    environment.close()


def apply(env: lmdb.Environment, meta: MetaStateMachine, *commands: bytes) -> list[object]:
    start = meta.applied_index() + 1
    entries = [Entry(Term(1), LogIndex(start + i), data) for i, data in enumerate(commands)]
    with env.begin(write=True) as txn:
        return meta.apply(txn, entries)


def test_users_are_applied_looked_up_by_token_hash_and_survive_reopening(env) -> None:
    meta = MetaStateMachine(env)
    meta.initialize(initial_shard_map(NODES, 1, 1), [ADMIN])
    assert meta.has_admin()
    apply(env, meta, encode_put_user(ALICE))
    assert meta.user_by_token_hash(hash_token("kvt_alice")) == ALICE
    reopened = MetaStateMachine(env)
    assert [user.name for user in reopened.users()] == ["admin", "alice"]
    rotated = User("alice", ALICE.grants, hash_token("kvt_alice_2"))
    apply(env, reopened, encode_put_user(rotated))
    assert reopened.user_by_token_hash(hash_token("kvt_alice")) is None  # the old token died
    assert reopened.user_by_token_hash(hash_token("kvt_alice_2")) == rotated


def test_the_last_admin_cannot_be_deleted(env) -> None:
    meta = MetaStateMachine(env)
    meta.initialize(initial_shard_map(NODES, 1, 1), [ADMIN])
    results = apply(
        env, meta, encode_delete_user("admin"), encode_delete_user("nobody"), encode_put_user(ALICE)
    )
    assert results == [LAST_ADMIN_REFUSED, "absent", "ok"]
    assert apply(env, meta, encode_delete_user("alice")) == ["deleted"]
    assert [user.name for user in meta.users()] == ["admin"]


def test_snapshots_carry_the_users_and_replace_the_old_ones(env, tmp_path: Path) -> None:
    source = MetaStateMachine(env)
    source.initialize(initial_shard_map(NODES, 1, 1), [ADMIN])
    apply(env, source, encode_put_user(ALICE))
    other_env = lmdb.open(str(tmp_path / "other"), max_dbs=8, map_size=64 << 20)
    try:
        target = MetaStateMachine(other_env)
        stale = User("stale", Grants(admin=True), hash_token("kvt_stale"))
        target.initialize(initial_shard_map(NODES, 1, 1), [stale])
        with other_env.begin(write=True) as txn:
            target.restore(txn, Snapshot(SnapshotMeta(index=LogIndex(9)), source.snapshot()))
        assert target.users() == source.users()
        assert target.user_by_token_hash(hash_token("kvt_stale")) is None
        old_format = source.shard_map.encode()  # type: ignore[union-attr]
        with other_env.begin(write=True) as txn:
            target.restore(txn, Snapshot(SnapshotMeta(index=LogIndex(10)), old_format))
        assert target.shard_map == source.shard_map
    finally:
        other_env.close()


@pytest.mark.parametrize("data", [b"", b"\x93\x01\x02\x03", b"\x92\x07\xa1x", b"\x92\x03\x05"])
def test_malformed_meta_commands_are_refused_before_they_reach_the_log(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed meta command"):
        check_meta_command(data)
