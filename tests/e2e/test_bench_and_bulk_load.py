"""kvctl bench and kvctl load against a real 3-node cluster: the figures they print are
sane (requests really happened, latencies ordered), errors are counted, and bulk-loaded keys
are readable with the versions POST /v1/batch answered."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.__main__ import kvctl
from tests.e2e.kv_cluster import KVCluster, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def unused_tcp_url() -> Iterator[str]:
    """Bound but not listening: connecting is refused, and nobody else takes the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def run_kvctl(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(kvctl, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout


def endpoints(cluster: KVCluster) -> str:
    return ",".join(cluster.url(node_id) for node_id in cluster.node_ids)


def bench(cluster_endpoints: str, *args: str) -> dict:
    code, out = run_kvctl("--endpoints", cluster_endpoints, "--json", "bench", *args)
    assert code == 0, out
    return json.loads(out)


def test_bench_put_then_get_report_real_throughput_and_ordered_latencies(
    shared_kv_cluster: KVCluster,
):
    for workload in ("put", "get"):
        summary = bench(
            endpoints(shared_kv_cluster),
            workload,
            "--concurrency",
            "4",
            "--keys",
            "50",
            "--duration",
            "2",
        )
        assert summary["errors"] == 0, summary
        assert summary["ok"] >= 20, summary  # even a loaded CI machine commits 10 writes/s
        assert 1.5 <= summary["elapsed_s"] <= 30
        assert summary["throughput_per_s"] == pytest.approx(
            summary["ok"] / summary["elapsed_s"], rel=0.01
        )
        assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    # the puts really landed: a bench key is readable
    assert shared_kv_cluster.get(1, "bench/000000000007").status == 200


def test_bench_counts_every_failed_request_as_an_error_by_kind(shared_kv_cluster: KVCluster):
    absent = bench(
        endpoints(shared_kv_cluster),
        "get",
        "--no-fill",
        "--key-prefix",
        "never-written/",
        "--concurrency",
        "2",
        "--duration",
        "1",
    )
    assert absent["ok"] == 0
    assert absent["errors"] == absent["errors_by_kind"]["http 404"] > 0


def test_bench_counts_refused_connections(unused_tcp_url: str):
    summary = bench(unused_tcp_url, "put", "--concurrency", "2", "--duration", "1")
    assert summary["ok"] == 0
    assert summary["errors_by_kind"]["connection"] > 0


def test_load_writes_every_record_of_a_jsonl_and_a_csv_file(
    shared_kv_cluster: KVCluster, tmp_path: Path
):
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"key": f"load/j{i:04d}", "value": f"v{i}"}) + "\n" for i in range(2500))
        + json.dumps({"key": "load/binary", "value_b64": "AP8="})
        + "\n",
        encoding="utf-8",
    )
    code, out = run_kvctl(
        "--endpoints", endpoints(shared_kv_cluster), "--json", "load", str(jsonl), "-c", "3"
    )
    assert code == 0, out
    summary = json.loads(out)
    assert (summary["written"], summary["failed"], summary["batches"]) == (2501, 0, 3)

    csv_file = tmp_path / "records.csv"
    csv_file.write_text('load/c1,plain\n"load/c,2","has, comma"\n', encoding="utf-8")
    code, out = run_kvctl(
        "--endpoints", endpoints(shared_kv_cluster), "--json", "load", str(csv_file)
    )
    assert code == 0, out
    assert json.loads(out)["written"] == 2

    for key, value in [
        ("load/j0000", b"v0"),
        ("load/j2499", b"v2499"),
        ("load/binary", b"\x00\xff"),
        ("load/c,2", b"has, comma"),
    ]:
        got = shared_kv_cluster.get(2, key)
        assert (got.status, got.body) == (200, value)


def test_a_batch_answers_versions_that_reads_confirm(shared_kv_cluster: KVCluster):
    puts = [{"key": f"batch/{i}", "value": "eA=="} for i in range(40)]
    reply = shared_kv_cluster.request(3, "POST", "/v1/batch", json.dumps({"puts": puts}).encode())
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert (doc["written"], doc["failed"]) == (40, 0)
    for put, version in list(zip(puts, doc["versions"], strict=True))[:10]:
        got = shared_kv_cluster.get(1, put["key"])
        assert got.headers["X-KV-Version"] == str(version)
    bad = shared_kv_cluster.request(3, "POST", "/v1/batch", b'{"puts": [{"key": ""}]}')
    assert bad.status == 400
    assert bad.json()["error"]["code"] == "invalid_request"


def test_load_stops_with_a_clear_error_on_a_malformed_record(
    shared_kv_cluster: KVCluster, tmp_path: Path
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "ok", "value": "1"}\n{"nokey": 1}\n', encoding="utf-8")
    result = CliRunner().invoke(
        kvctl, ["--endpoints", endpoints(shared_kv_cluster), "load", str(bad)]
    )
    assert result.exit_code == 2
    assert "line 2" in result.stderr


def test_every_shard_is_led_by_its_preferred_replica_once_the_cluster_settles(
    shared_kv_cluster: KVCluster,
):
    def leaders_are_preferred() -> bool:
        shards = shared_kv_cluster.status(1)["shards"]
        return all(shard["leader"] == shard["replicas"][0] for shard in shards)

    wait_for("each shard's leader to be its replicas[0]", leaders_are_preferred)
    assert shared_kv_cluster.put(2, "after-balance", b"x").status == 200
