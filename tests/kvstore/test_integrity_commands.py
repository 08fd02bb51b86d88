"""HashCheck and RestoreShard applied by KVStateMachine on real LMDB, and their codec: replicas
hash the same state at the same index, corruption is reported instead of stopping the apply,
a restore is verified, refuses to overwrite unless asked, and gives keys fresh versions."""

from __future__ import annotations

import lmdb
import pytest

from kvstore.commands import (
    FAILED_INVALID,
    FAILED_PRECONDITION,
    Failed,
    HashCheck,
    Put,
    ReplicaHash,
    Restored,
    RestoreShard,
    decode_command,
    decode_outcome,
    encode_command,
    encode_outcome,
)
from kvstore.service import KeyValue
from kvstore.shard_snapshot import backup_summary
from tests.kvstore.test_state_machine import (
    SHARD,
    driver,
    flip_last_byte,
    open_env,
    overwrite,
    stored_key,
)


@pytest.fixture
def env(tmp_path):
    environment = open_env(tmp_path / "env")
    yield environment
    environment.close()


@pytest.fixture
def other_env(tmp_path):
    environment = open_env(tmp_path / "other")
    yield environment
    environment.close()


@pytest.mark.parametrize(
    "item",
    [
        HashCheck(),
        RestoreShard(b"blob", replace=True),
        ReplicaHash(5, 3, 2**64 - 1),
        ReplicaHash(5, 0, 0, corrupt_key="k"),
        Restored(9, 2, 12345),
    ],
)
def test_the_integrity_commands_and_outcomes_survive_the_codec(item):
    if isinstance(item, HashCheck | RestoreShard):
        assert decode_command(encode_command(item)) == item
    else:
        assert decode_outcome(encode_outcome(item)) == item


def test_replicas_fed_the_same_entries_hash_the_same_and_keep_the_result(env, other_env):
    first, second = driver(env), driver(other_env)
    for d in (first, second):
        d.apply(Put("a", b"1"), Put("b", b"2"), HashCheck(), Put("c", b"3"))
    first_result, second_result = first.machine.check_result(3), second.machine.check_result(3)
    assert first_result == second_result == ReplicaHash(3, 2, first_result.digest)
    assert first.machine.check_result(4) is None  # a Put, not a check


def test_a_check_sees_the_writes_applied_before_it_in_the_same_batch(env):
    d = driver(env)
    before = d.one(HashCheck())
    after = d.apply(Put("a", b"1"), HashCheck())[1]
    assert isinstance(before, ReplicaHash)
    assert isinstance(after, ReplicaHash)
    assert (before.key_count, after.key_count) == (0, 1)
    assert before.digest != after.digest


def test_only_the_newest_sixteen_check_results_are_kept(env):
    d = driver(env)
    d.apply(*[HashCheck() for _ in range(20)])
    assert [d.machine.check_result(i) is not None for i in range(1, 21)] == [False] * 4 + [
        True
    ] * 16


def test_a_check_over_a_corrupt_record_reports_its_key_and_applies_on(env):
    d = driver(env)
    d.apply(Put("apple", b"red"), Put("banana", b"yellow"))
    overwrite(env, b"kv.data", stored_key(SHARD, "apple"), flip_last_byte)
    assert d.one(HashCheck()) == ReplicaHash(3, 0, 0, corrupt_key="apple")
    assert d.machine.applied_index() == 3


def test_a_backup_restores_into_an_empty_shard_with_fresh_versions(env, other_env):
    source, target = driver(env), driver(other_env)
    source.apply(Put("a", b"1"), Put("b", b"2"), Put("a", b"3"))
    blob = source.machine.snapshot()
    assert backup_summary(blob, SHARD)[:2] == (3, 2)
    target.apply(None, None, None, None)  # the new cluster's log is at another index
    restored = target.one(RestoreShard(blob))
    assert restored == Restored(5, 2, backup_summary(blob, SHARD)[2])
    assert target.machine.get("a") == KeyValue("a", b"3", 5)
    assert target.machine.get("b") == KeyValue("b", b"2", 5)
    assert target.machine.count() == 2
    assert source.machine.data_hash()[1] != target.machine.data_hash()[1]  # versions differ


def test_a_restore_refuses_a_shard_with_keys_unless_replace(env, other_env):
    source, target = driver(env), driver(other_env)
    source.apply(Put("a", b"1"))
    target.apply(Put("z", b"old"))
    refused = target.one(RestoreShard(source.machine.snapshot()))
    assert isinstance(refused, Failed)
    assert refused.code == FAILED_PRECONDITION
    assert target.machine.get("z") is not None
    target.one(RestoreShard(source.machine.snapshot(), replace=True))
    assert target.machine.get("z") is None
    assert target.machine.get("a") is not None


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),  # fails the checksum
        lambda blob: blob[:4],
        lambda blob: b"",
    ],
)
def test_a_damaged_backup_is_refused_deterministically(env, other_env, damage):
    source, target = driver(env), driver(other_env)
    source.apply(Put("a", b"1"))
    outcome = target.one(RestoreShard(damage(source.machine.snapshot())))
    assert isinstance(outcome, Failed)
    assert outcome.code == FAILED_INVALID
    with pytest.raises(ValueError, match="snapshot"):
        backup_summary(damage(source.machine.snapshot()), SHARD)


def test_a_backup_of_another_shard_is_refused(env, other_env):
    source = driver(env, shard=SHARD + 1)
    source.apply(Put("a", b"1"))
    outcome = driver(other_env).one(RestoreShard(source.machine.snapshot()))
    assert isinstance(outcome, Failed)
    assert "not 7" in outcome.message


def test_lmdb_is_untouched_by_a_refused_restore(env: lmdb.Environment, other_env):
    target = driver(other_env)
    target.apply(Put("k", b"v"))
    before = target.machine.data_hash()
    target.one(RestoreShard(b"garbage", replace=True))
    assert target.machine.data_hash()[1] == before[1]
