"""Shard split, with real processes: `kvctl shard split` cuts a shard in two under a running
writer and a polling reader, optionally with a random node killed (kill -9, then restarted) in
the middle. During the split every key stays readable; afterwards every key holds its value
and version, every acknowledged write reads back, and a scan and a query return each key once."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from kvstore.sharding import key_token
from tests.e2e.kv_cluster import KVCluster, LoadThread, wait_for
from tests.e2e.test_elastic import Writer, kill_and_restart_soon, status_of

pytestmark = pytest.mark.e2e

PREFIX = "split/"
KEYS = [f"{PREFIX}{i:04d}" for i in range(300)]
SPLIT_DEADLINE_S = 120.0  # generous: 2 cores shared with other engineers' tests


class Reader(LoadThread):
    """One thread reading random prefilled keys through random nodes, for as long as the split
    runs: each read must find the key with its prefilled value and version. A node that is
    down or a 503 is retried; a 404 or a wrong value is a failure."""

    def __init__(self, cluster: KVCluster, expected: dict[str, tuple[bytes, int]]) -> None:
        self.cluster = cluster
        self.expected = expected
        self.reads = 0
        self.unavailable = 0  # 503/504 answers: retried, counted
        self.failures: list[str] = []
        self._rng = random.Random(3)
        super().__init__()

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded, whatever happens
        while not self.stopping.is_set() and time.monotonic() < deadline:
            key = self._rng.choice(KEYS)
            try:
                response = self.cluster.get(self._rng.choice(self.cluster.node_ids), key)
            except OSError:
                continue  # a killed node: the next read asks another
            if response.status in (503, 504):
                self.unavailable += 1
                continue
            found = (response.body, int(response.headers.get("X-KV-Version", "0")))
            if response.status != 200 or found != self.expected[key]:
                self.failures.append(f"{key}: {response.status} {found} {response.body[:200]!r}")
            self.reads += 1


def prefill(cluster: KVCluster) -> dict[str, tuple[bytes, int]]:
    expected = {}
    for i, key in enumerate(KEYS):
        value = json.dumps({"i": i}).encode()
        response = cluster.put(1 + i % 3, key, value)
        assert response.status == 200, response.body
        expected[key] = (value, int(response.json()["version"]))
    return expected


def scanned_keys(cluster: KVCluster, node: int) -> list[str]:
    keys: list[str] = []
    cursor = ""
    for _ in range(100):  # bounded: 300 keys at 50 a page
        path = f"/v1/scan?prefix={quote(PREFIX, safe='')}&limit=50&cursor={quote(cursor)}"
        response = cluster.request(node, "GET", path)
        assert response.status == 200, response.body
        page = response.json()
        keys += [item["key"] for item in page["items"]]
        if not page["next_cursor"]:
            return keys
        cursor = page["next_cursor"]
    raise AssertionError("the scan did not end")


def queried_keys(cluster: KVCluster, node: int) -> list[str]:
    spec = {"prefix": PREFIX, "select": "*", "limit": 10_000}
    response = cluster.request(node, "POST", "/v1/query", json.dumps(spec).encode())
    assert response.status == 200, response.body
    result: dict[str, Any] = response.json()
    assert not result["partial"], result
    return [row["key"] for row in result["rows"]]


@pytest.mark.parametrize(
    "victim",
    [
        None,
        pytest.param("random_node", marks=pytest.mark.slow),
        # Its successor takes the split over, and the restarted node's parent replica lags
        # behind the handover (this variant found a child replica started without its data).
        pytest.param("parent_leader", marks=pytest.mark.slow),
    ],
)
def test_a_shard_split_under_writes_keeps_every_key_and_version(tmp_path: Path, victim: str | None):
    kill_mid_split = victim is not None
    rng = random.Random(int(os.environ.get("SPLIT_TEST_SEED", "17")))
    cluster = KVCluster(tmp_path / "cluster", shards=2)
    try:
        expected = prefill(cluster)
        before = status_of(cluster)
        parent = next(s for s in before["shards"] if s["start_token"] == 0)
        writer = Writer(cluster, seed=9)
        with writer.running(), Reader(cluster, expected).running() as reader:
            # With --wait kvctl returns once the map has the new shard; a kill -9 must land
            # mid-split, so that variant does not wait.
            wait = [] if kill_mid_split else ["--wait"]
            code, out, err = cluster.kvctl("--json", "shard", "split", str(parent["id"]), *wait)
            assert code == 0, (out, err)
            if not kill_mid_split:
                assert json.loads(out)["child"] == 3, out  # the next unused shard id
            if victim == "random_node":
                time.sleep(rng.uniform(0.0, 1.0))
                kill_and_restart_soon(cluster, rng, spare=set())
            elif victim == "parent_leader":
                time.sleep(rng.uniform(0.0, 0.6))
                others = {n for n in cluster.node_ids if n != parent["leader"]}
                kill_and_restart_soon(cluster, rng, spare=others)

            def split_done() -> dict[str, Any] | None:
                status = status_of(cluster)
                done = not status["splits"] and len(status["shards"]) == 3
                return status if done and all(s["leader"] for s in status["shards"]) else None

            after = wait_for("the split to finish", split_done, SPLIT_DEADLINE_S)
            time.sleep(1.0)  # the reader and writer go on past the new map, briefly
        print(
            f"reads {reader.reads}, unavailable {reader.unavailable}, writer retries "
            f"{writer.retries}, longest write gap {writer.longest_gap_s:.2f}s"
        )
        assert reader.failures == [], reader.failures[:10]
        assert reader.reads > 20, "the reader made no progress"
        halves = sorted(after["shards"], key=lambda s: s["start_token"])[:2]
        assert halves[0]["id"] == parent["id"]
        assert halves[0]["end_token"] == halves[1]["start_token"]
        assert halves[1]["end_token"] == parent["end_token"]
        assert set(halves[1]["replicas"]) == set(parent["replicas"])
        node = cluster.node_ids[0]
        for key, (value, version) in expected.items():
            response = cluster.get(node, key)
            assert response.status == 200, (key, response.status, response.body)
            assert (response.body, int(response.headers["X-KV-Version"])) == (value, version)
        writer.check_every_acknowledged_write(node)
        assert scanned_keys(cluster, node) == KEYS
        assert queried_keys(cluster, cluster.node_ids[1]) == KEYS
        # The cut is at the middle token, so each half holds a good part of the keys.
        upper_keys = [k for k in KEYS if key_token(k) >= halves[1]["start_token"]]
        lower_keys = [
            k for k in KEYS if parent["start_token"] <= key_token(k) < halves[0]["end_token"]
        ]
        assert len(upper_keys) > 30, len(upper_keys)
        assert len(lower_keys) > 30, len(lower_keys)
    finally:
        cluster.stop()


def test_shards_past_the_key_threshold_split_by_themselves(tmp_path: Path):
    split_keys = 100
    cluster = KVCluster(tmp_path / "cluster", shards=2, elastic={"split_keys": split_keys})
    try:
        expected = prefill(cluster)  # 300 keys: about 150 a shard, so both split

        def settled() -> dict[str, Any] | None:
            status = status_of(cluster)
            counts = [
                max(r.get("key_count", 0) for r in shard["replica_status"])
                for shard in status["shards"]
            ]
            done = not status["splits"] and all(shard["leader"] for shard in status["shards"])
            return status if done and max(counts) <= split_keys else None

        status = wait_for("every shard to be under the threshold", settled, SPLIT_DEADLINE_S)
        assert len(status["shards"]) >= 4
        node = cluster.node_ids[0]
        for key, (value, version) in expected.items():
            response = cluster.get(node, key)
            assert (response.body, int(response.headers["X-KV-Version"])) == (value, version)
        assert scanned_keys(cluster, node) == KEYS
    finally:
        cluster.stop()
