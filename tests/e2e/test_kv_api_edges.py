"""The real node's edges: /metrics after traffic, /health and /ready, and bad input of every
kind answered 4xx with the JSON error shape (never a 500, never HTML)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.kv_cluster import KVCluster, wait_for

pytestmark = pytest.mark.e2e


def test_metrics_health_and_ready_describe_the_node(shared_kv_cluster: KVCluster):
    for i in range(5):
        assert shared_kv_cluster.put(1, f"m/{i}", b"x").status == 200
        assert shared_kv_cluster.get(2, f"m/{i}").status == 200
    assert shared_kv_cluster.request(1, "GET", "/health").json() == {"status": "ok"}
    # Ready comes and goes for a moment while a leadership hand-off elects (the balancer moves
    # leaders to their preferred replicas after start): the answer's shape is what we check.
    ready = wait_for(
        "node 1 to be ready",
        lambda: (r := shared_kv_cluster.request(1, "GET", "/ready")).status == 200 and r,
    )
    assert ready.json() == {"ready": True}
    metrics = shared_kv_cluster.request(1, "GET", "/metrics").body.decode()
    for family in (
        'kv_http_requests_total{method="PUT",route="/v1/kv/{key}",status="200"}',
        "kv_http_request_duration_seconds_bucket",
        'kv_raft_term{shard="1"}',
        'kv_raft_commit_index{shard="0"}',  # the metadata group
        "kv_raft_applied_index",
        "kv_raft_is_leader",
        "kv_raft_proposals_total",
        'kv_raft_fsync_seconds_bucket{le="+Inf"}',
        'kv_peer_sent_bytes_total{peer="2"}',
    ):
        assert family in metrics, family


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("GET", "/v1/kv/", None, {}, 400),
        ("GET", "/v1/kv/%ff", None, {}, 400),
        ("PUT", "/v1/kv/" + "k" * 5000, b"v", {}, 413),
        ("PUT", "/v1/kv/big", b"x" * (1024 * 1024 + 1), {}, 413),
        ("PUT", "/v1/kv/k?if_version=abc", b"v", {}, 400),
        ("PUT", "/v1/kv/k?if_version=-1", b"v", {}, 400),
        ("PUT", "/v1/kv/k", b"v", {"Idempotency-Key": ""}, 400),
        ("GET", "/v1/kv/k?consistency=eventual", None, {}, 400),
        ("GET", "/v1/scan?limit=0", None, {}, 400),
        ("GET", "/v1/scan?limit=abc", None, {}, 400),
        ("GET", "/v1/scan?cursor=!!notours!!", None, {}, 400),
        ("POST", "/v1/txn", b"not json", {}, 400),
        ("POST", "/v1/txn", b"[]", {}, 400),
        ("POST", "/v1/txn", json.dumps({"success": [{"op": "fly", "key": "k"}]}).encode(), {}, 400),
        ("POST", "/v1/txn", json.dumps({"surprise": 1}).encode(), {}, 400),
        ("POST", "/v1/kv/k", b"v", {}, 405),
        ("GET", "/v2/nothing", None, {}, 404),
        ("POST", "/v1/internal/propose?shard=1", b"\xc1garbage", {}, 400),
        ("POST", "/v1/internal/propose?shard=x", b"", {}, 400),
        ("POST", "/v1/internal/read?shard=1&op=scan", b"\x93\x01\x02\x03", {}, 400),
        ("POST", "/v1/internal/read?shard=1&op=get&consistency=stale", b"\xff\xfe", {}, 400),
    ],
)
def test_bad_input_gets_a_4xx_json_error(
    shared_kv_cluster: KVCluster, method, path, body, headers, status
):
    response = shared_kv_cluster.request(1, method, path, body, headers)
    assert response.status == status, response.body[:300]
    error = response.json()["error"]
    assert error["code"]
    assert error["message"]


def test_a_peer_with_an_older_shard_map_is_told_to_refresh(shared_kv_cluster: KVCluster):
    query = b"key-1"  # an internal get carries the key's UTF-8 bytes
    path = "/v1/internal/read?shard=1&op=get"
    stale = shared_kv_cluster.request(1, "POST", path, query, {"X-KV-Map-Epoch": "0"})
    assert stale.status == 409
    assert stale.json()["error"]["code"] == "stale_shard_map"
    # A peer claiming a newer map makes this node look for it (none is newer), then serve.
    ahead = shared_kv_cluster.request(1, "POST", path, query, {"X-KV-Map-Epoch": "99"})
    assert ahead.status in (200, 503)
    current = shared_kv_cluster.request(1, "POST", path, query, {"X-KV-Map-Epoch": "1"})
    assert current.status in (200, 503)
