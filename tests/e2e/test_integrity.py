"""Integrity against real node processes: a byte flipped on disk in one replica's LMDB file is
caught and named there, `kvctl check` names the shard, and the other replicas keep serving."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
from pathlib import Path

import lmdb
import pytest

from tests.e2e.kv_cluster import KVCluster, wait_for

pytestmark = pytest.mark.e2e

KV_DATA_DB = b"kv.data"  # kvstore.state_machine's database of stored values
SHARD_PREFIX_BYTES = 8


def stop_node(cluster: KVCluster, node_id: int) -> None:
    """SIGTERM and wait: LMDB is closed cleanly before we touch its file."""
    pid = cluster.pid(node_id)
    os.kill(pid, signal.SIGTERM)
    wait_for(f"node {node_id} to exit", lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 30)


def flip_stored_value(lmdb_dir: Path, key: bytes) -> int:
    """Flip the last byte of `key`'s stored value in data.mdb itself (the record found through
    LMDB, then patched in the raw file, where bit rot would strike). Returns its shard id."""
    with lmdb.open(str(lmdb_dir), readonly=True, lock=False, max_dbs=64) as env:
        data_db = env.open_db(KV_DATA_DB, create=False)
        with env.begin(db=data_db) as txn:
            found = [
                (stored, bytes(record))
                for stored, record in txn.cursor()
                if stored[SHARD_PREFIX_BYTES:] == key
            ]
    assert len(found) == 1, found
    stored, record = found[0]
    path = lmdb_dir / "data.mdb"
    content = bytearray(path.read_bytes())
    # The record (version, checksum, value) is unique in the file: the Raft log holds the value
    # inside a msgpack command, never behind this record's checksum.
    offsets = [m.start() for m in re.finditer(re.escape(record), content)]
    assert offsets, "the stored record is not in data.mdb"
    for offset in offsets:  # old copies in free pages too, harmlessly
        content[offset + len(record) - 1] ^= 0x5A
    path.write_bytes(bytes(content))
    return int.from_bytes(stored[:SHARD_PREFIX_BYTES], "big")


def leader_of(cluster: KVCluster, shard: int) -> int | None:
    """The shard's leader, or None while a leadership change is under way."""
    try:
        return cluster.shard_leader(shard)
    except AssertionError:
        return None


def metric(cluster: KVCluster, node_id: int, name: str, shard: int) -> float | None:
    text = cluster.request(node_id, "GET", "/metrics").body.decode()
    found = re.search(rf'^{name}{{shard="{shard}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_a_flipped_byte_in_one_replica_is_named_there_while_the_others_serve_correct_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No periodic check at first: it would quarantine the victim before our first read of it,
    # which then goes to a healthy replica (right for clients; not what we test first).
    monkeypatch.setenv("KVSTORE_CHECK_INTERVAL_S", "0")
    cluster = KVCluster(tmp_path / "cluster", nodes=3, shards=2)
    try:
        expected = {
            f"integrity/{i}": f"value {i} {secrets.token_hex(8)}".encode() for i in range(20)
        }
        canary = "integrity/canary"
        expected[canary] = b"canary " + secrets.token_hex(32).encode()
        for key, value in expected.items():
            assert cluster.put(1, key, value).status == 200
        exit_code, output, errors = cluster.kvctl("check", "--json")
        assert exit_code == 0, output + errors
        assert all(s["status"] == "consistent" for s in json.loads(output)["shards"])

        victim = 2
        stop_node(cluster, victim)
        shard = flip_stored_value(tmp_path / "cluster" / f"node{victim}" / "lmdb", canary.encode())
        cluster.restart_dead()
        cluster.wait_ready()  # some node answers; the victim may still be starting
        wait_for("the victim to answer", lambda: cluster.request(victim, "GET", "/health").status)

        # Loud where the damage is: a JSON 503 naming the shard and the key, never the bytes.
        response = cluster.get(victim, canary, consistency="stale")
        assert response.status == 503, response.body
        error = response.json()["error"]
        assert error["code"] == "replica_corrupted"
        assert (error["shard"], error["key"]) == (shard, canary)
        assert f"shard {shard}" in error["message"]
        assert canary in error["message"]
        assert metric(cluster, victim, "kv_replica_corrupted", shard) == 1
        assert (metric(cluster, victim, "kv_checksum_failures_total", shard) or 0) >= 1

        # kvctl check names the shard, the node and the key, and exits 6.
        exit_code, output, errors = cluster.kvctl("check", "--json")
        assert exit_code == 6, output + errors
        report = json.loads(output)
        assert report["divergent"] == [shard]
        (checked,) = [s for s in report["shards"] if s["shard"] == shard]
        replicas = {r["node"]: r for r in checked["replicas"]}
        assert replicas[victim]["status"] == "corrupt"
        assert replicas[victim]["corrupt_key"] == canary
        healthy = [r for node, r in replicas.items() if node != victim]
        assert all(r["status"] == "ok" for r in healthy)
        assert len({r["digest"] for r in healthy}) == 1

        # The corrupt replica no longer leads; every node, the victim included (it forwards),
        # answers every key correctly, and the healthy replicas serve stale reads correctly.
        wait_for(
            f"shard {shard} led by a healthy replica",
            lambda: leader_of(cluster, shard) not in (None, victim),
        )
        for node in cluster.node_ids:
            for key, value in expected.items():
                response = wait_for(
                    f"a read of {key} on node {node}",
                    lambda node=node, key=key: (r := cluster.get(node, key)).status == 200 and r,
                )
                assert response.body == value, (node, key)
                if node != victim:
                    assert cluster.get(node, key, consistency="stale").body == value

        # The periodic check on the shard's leader sees it too, and says so in its metrics:
        # restart the healthy nodes one at a time with a fast periodic check.
        monkeypatch.setenv("KVSTORE_CHECK_INTERVAL_S", "1")
        for node in cluster.node_ids:
            if node != victim:
                cluster.restart(node)
                wait_for(
                    f"node {node} ready again",
                    lambda node=node: cluster.request(node, "GET", "/ready").status == 200,
                )

        def flagged_by_the_leader() -> bool:
            leader = leader_of(cluster, shard)
            divergent = "kv_consistency_check_divergent"
            return leader is not None and metric(cluster, leader, divergent, shard) == 1

        wait_for("the periodic check to flag the shard", flagged_by_the_leader)
    finally:
        cluster.stop()
