"""The KV service through real node processes: every operation through any node, retries
that apply once, and a shard leader killed with SIGKILL during writes."""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.e2e.kv_cluster import KVCluster, wait_for

pytestmark = pytest.mark.e2e


def test_put_get_delete_and_cas_work_through_every_node(kv_cluster: KVCluster):
    for writer in kv_cluster.node_ids:
        key = f"user/{writer}"
        put = kv_cluster.put(writer, key, f"v{writer}".encode())
        assert put.status == 200, put.body
        version = put.json()["version"]
        for reader in kv_cluster.node_ids:
            got = kv_cluster.get(reader, key)
            assert got.status == 200
            assert got.body == f"v{writer}".encode()
            assert int(got.headers["X-KV-Version"]) == version

        stale_cas = kv_cluster.put(writer, key, b"lost", if_version=version + 1000)
        assert stale_cas.status == 412
        assert stale_cas.json()["error"]["current_version"] == version
        cas = kv_cluster.put(writer, key, b"won", if_version=version)
        assert cas.status == 200
        assert cas.json()["version"] > version
        create_only = kv_cluster.put(writer, key, b"again", if_version=0)
        assert create_only.status == 412

        deleted = kv_cluster.request(writer, "DELETE", f"/v1/kv/{key.replace('/', '%2F')}")
        assert deleted.status == 200
        assert kv_cluster.get(writer, key).status == 404
        assert kv_cluster.request(writer, "DELETE", "/v1/kv/user%2F0").status == 404


def test_scan_returns_keys_of_every_shard_in_order_with_pagination(kv_cluster: KVCluster):
    keys = [f"scan/{i:03d}" for i in range(45)]
    for i, key in enumerate(keys):
        assert kv_cluster.put(kv_cluster.node_ids[i % 3], key, key.encode()).status == 200
    kv_cluster.put(1, "other/x", b"x")
    seen: list[str] = []
    cursor = ""
    for _ in range(10):
        page = kv_cluster.request(2, "GET", f"/v1/scan?prefix=scan/&limit=10{cursor}").json()
        for item in page["items"]:
            assert base64.b64decode(item["value"]).decode() == item["key"]
        seen += [item["key"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == keys
    ranged = kv_cluster.request(3, "GET", "/v1/scan?start=scan/010&end=scan/013").json()
    assert [item["key"] for item in ranged["items"]] == ["scan/010", "scan/011", "scan/012"]


def test_a_transaction_commits_atomically_and_refuses_keys_of_two_shards(kv_cluster: KVCluster):
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    kv_cluster.put(1, "acct", b"100")
    txn = {
        "compare": [{"key": "acct", "target": "value", "op": "==", "value": b64(b"100")}],
        "success": [
            {"op": "put", "key": "acct", "value": b64(b"70")},
            {"op": "get", "key": "acct"},
        ],
        "failure": [{"op": "get", "key": "acct"}],
    }
    first = kv_cluster.request(2, "POST", "/v1/txn", json.dumps(txn).encode()).json()
    assert first["succeeded"] is True
    assert base64.b64decode(first["results"][1]["value"]) == b"70"
    second = kv_cluster.request(3, "POST", "/v1/txn", json.dumps(txn).encode()).json()
    assert second["succeeded"] is False
    assert base64.b64decode(second["results"][0]["value"]) == b"70"

    # Find two keys in different shards, then ask for both in one transaction.
    status = kv_cluster.status(1)
    assert len(status["shards"]) > 1
    spanning = {
        "success": [{"op": "put", "key": f"span/{i}", "value": b64(b"x")} for i in range(20)]
    }
    refused = kv_cluster.request(1, "POST", "/v1/txn", json.dumps(spanning).encode())
    assert refused.status == 400
    assert refused.json()["error"]["code"] == "cross_shard_txn"


def test_a_retried_write_with_the_same_idempotency_key_applies_once(kv_cluster: KVCluster):
    first = kv_cluster.put(1, "counter", b"1", idempotency_key="req-42")
    assert first.status == 200
    other = kv_cluster.put(2, "counter", b"2")  # someone else writes in between
    assert other.status == 200
    retry = kv_cluster.put(3, "counter", b"1", idempotency_key="req-42")
    assert retry.status == 200
    assert retry.json() == first.json()  # the original answer, not a second write
    got = kv_cluster.get(1, "counter")
    assert got.body == b"2"
    assert int(got.headers["X-KV-Version"]) == other.json()["version"]


def test_writes_recover_within_seconds_when_a_shard_leader_is_killed(kv_cluster: KVCluster):
    key = "hot-key"
    assert kv_cluster.put(1, key, b"before").status == 200
    shard = next(
        s["id"]
        for s in kv_cluster.status(1)["shards"]
        if s["start_token"] <= _token(key) < s["end_token"]
    )
    leader = kv_cluster.shard_leader(shard)
    survivor = next(n for n in kv_cluster.node_ids if n != leader)
    kv_cluster.kill(leader)
    killed_at = time.monotonic()

    def write_succeeds() -> bool:
        try:
            return kv_cluster.put(survivor, key, b"after", timeout_s=10).status == 200
        except OSError:
            return False

    wait_for("a write after the leader died", write_succeeds, deadline_s=20)
    recovery_s = time.monotonic() - killed_at
    assert recovery_s < 10, f"took {recovery_s:.1f}s"
    assert kv_cluster.get(survivor, key).body == b"after"
    kv_cluster.restart_dead()
    kv_cluster.wait_ready()
    restarted_read = wait_for(
        "the restarted node to serve reads", lambda: kv_cluster.get(leader, key).body
    )
    assert restarted_read == b"after"


def _token(key: str) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(key.encode())
