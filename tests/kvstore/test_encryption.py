"""Encryption at rest: KVStateMachine with a ValueCipher on a real LMDB environment. Values never
reach the file in the clear, old keys keep working after a rotation, and tampering or a missing
key stops reads loudly (CorruptValueError) instead of answering wrongly."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import lmdb
import pytest
import xxhash

from kvstore.commands import Put
from kvstore.encryption import KeyFileError, ValueCipher, load_key_file
from kvstore.state_machine import CorruptValueError, KVStateMachine
from raft.core.messages import Snapshot, SnapshotMeta
from raft.core.types import LogIndex
from tests.kvstore.test_state_machine import Driver, open_env, stored_key

SHARD = 3
SECRET = b"the plaintext nobody may find on disk"
KEY_1 = os.urandom(32)
KEY_2 = os.urandom(32)


@pytest.fixture
def env(tmp_path: Path):
    environment = open_env(tmp_path / "env")
    yield environment
    environment.close()


def raw_record(env: lmdb.Environment, key: str) -> bytes:
    with env.begin(db=env.open_db(b"kv.data")) as txn:
        raw = txn.get(stored_key(SHARD, key))
    assert raw is not None
    return bytes(raw)


def test_values_are_sealed_on_disk_and_read_back_in_the_clear(env: lmdb.Environment) -> None:
    driver = Driver(env, KVStateMachine(env, SHARD, cipher=ValueCipher({"k1": KEY_1}, "k1")))
    driver.apply(Put("secret", SECRET, None, "idem-1"))
    assert SECRET not in raw_record(env, "secret")
    assert b"k1" in raw_record(env, "secret")
    assert driver.machine.get("secret").value == SECRET  # type: ignore[union-attr]
    assert [item.value for item in driver.machine.scan()] == [SECRET]


def test_after_a_rotation_old_values_stay_readable_and_new_writes_use_the_new_key(
    env: lmdb.Environment,
) -> None:
    Driver(env, KVStateMachine(env, SHARD, cipher=ValueCipher({"k1": KEY_1}, "k1"))).apply(
        Put("old", b"written under k1")
    )
    rotated = ValueCipher({"k1": KEY_1, "k2": KEY_2}, "k2")
    driver = Driver(env, KVStateMachine(env, SHARD, cipher=rotated))
    driver.apply(Put("new", b"written under k2"))
    assert driver.machine.get("old").value == b"written under k1"  # type: ignore[union-attr]
    assert driver.machine.get("new").value == b"written under k2"  # type: ignore[union-attr]
    assert b"k2" in raw_record(env, "new")
    assert b"k1" in raw_record(env, "old")


def test_a_replica_without_keys_or_with_the_wrong_ones_refuses_to_read(
    env: lmdb.Environment,
) -> None:
    Driver(env, KVStateMachine(env, SHARD, cipher=ValueCipher({"k1": KEY_1}, "k1"))).apply(
        Put("secret", SECRET)
    )
    with pytest.raises(CorruptValueError, match="no \\[encryption\\] key_file"):
        KVStateMachine(env, SHARD).get("secret")
    with pytest.raises(CorruptValueError, match="key id 'k1'"):
        KVStateMachine(env, SHARD, cipher=ValueCipher({"k2": KEY_2}, "k2")).get("secret")
    with pytest.raises(CorruptValueError, match="failed authentication"):
        KVStateMachine(env, SHARD, cipher=ValueCipher({"k1": KEY_2}, "k1")).get("secret")


def test_a_sealed_value_moved_onto_another_key_fails_authentication(
    env: lmdb.Environment,
) -> None:
    cipher = ValueCipher({"k1": KEY_1}, "k1")
    machine = KVStateMachine(env, SHARD, cipher=cipher)
    Driver(env, machine).apply(Put("mine", SECRET), Put("other", b"x"))
    # Re-checksum a copy of "mine"'s sealed bytes under "other": only AES-GCM can catch it.
    sealed = raw_record(env, "mine")[16:]
    version = int.from_bytes(raw_record(env, "other")[:8], "big")
    header = version.to_bytes(8, "big") + xxhash.xxh64_intdigest(
        b"other" + sealed, version
    ).to_bytes(8, "big")
    with env.begin(write=True, db=env.open_db(b"kv.data")) as txn:
        txn.put(stored_key(SHARD, "other"), header + sealed)
    with pytest.raises(CorruptValueError, match="failed authentication"):
        machine.get("other")


def test_snapshots_carry_plaintext_so_data_hashes_match_across_keys(
    env: lmdb.Environment, tmp_path: Path
) -> None:
    source = Driver(env, KVStateMachine(env, SHARD, cipher=ValueCipher({"k1": KEY_1}, "k1")))
    source.apply(Put("a", b"1"), Put("b", SECRET))
    other_env = open_env(tmp_path / "other")
    try:
        plain = KVStateMachine(other_env, SHARD)  # a replica without encryption
        with other_env.begin(write=True) as txn:
            plain.restore(txn, Snapshot(SnapshotMeta(index=LogIndex(2)), source.machine.snapshot()))
        assert plain.data_hash() == source.machine.data_hash()
        assert plain.get("b").value == SECRET  # type: ignore[union-attr]
    finally:
        other_env.close()


def test_key_files_are_checked_when_loaded(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    good = {
        "active": "k2",
        "keys": {"k1": base64.b64encode(KEY_1).decode(), "k2": base64.b64encode(KEY_2).decode()},
    }
    path.write_text(json.dumps(good))
    assert load_key_file(path).active_key_id == "k2"
    for bad in (
        {"active": "k3", "keys": good["keys"]},
        {"active": "k1", "keys": {"k1": base64.b64encode(b"short").decode()}},
        {"active": "k1", "keys": {"k1": "not base64!"}},
        {"active": "bad id", "keys": {"bad id": base64.b64encode(KEY_1).decode()}},
        ["not", "an", "object"],
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(KeyFileError):
            load_key_file(path)
