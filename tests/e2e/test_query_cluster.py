"""POST /v1/query on real clusters: every aggregate and the ordered select against the same
computation done naively over the documents the test wrote; writes during queries (each shard
answers at one read point); a killed node (the query fails by name, or answers partially)."""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli.__main__ import kvctl
from cli.client import KVClient
from kvstore.sharding import key_token
from tests.e2e.kv_cluster import KVCluster, Response, wait_for

CITIES = ["lyon", "paris", "nice", "lille", "brest", "nantes", "metz", "pau", "caen"]
PREFIX = "d/"
Doc = dict[str, Any]


def make_docs(seed: int, count: int) -> dict[str, Any]:
    """JSON documents (some fields missing, mixed int/float) plus a few non-JSON values."""
    rng = random.Random(seed)
    docs: dict[str, Any] = {}
    for i in range(count):
        doc: Doc = {"age": rng.randrange(0, 90), "n": i, "spent": rng.randrange(0, 400) / 4}
        if rng.random() < 0.9:
            doc["city"] = rng.choice(CITIES)
        if rng.random() < 0.5:
            doc["address"] = {"zip": f"{rng.randrange(10):05d}"}
        if i % 7 == 0:
            doc["spent"] = rng.randrange(0, 100)  # an int among floats
        docs[f"{PREFIX}{rng.randrange(1 << 30):09x}-{i}"] = doc
    for i in range(5):
        docs[f"{PREFIX}raw-{i}"] = b"\xff\x00 not json"
    docs["other/x"] = {"age": 1, "city": "lyon", "n": -1, "spent": 1.0}  # outside the prefix
    return docs


def encoded(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def load(cluster: KVCluster, docs: dict[str, Any]) -> None:
    nodes = cluster.node_ids

    def put(item: tuple[int, tuple[str, Any]]) -> None:
        index, (key, value) = item
        response = cluster.put(nodes[index % len(nodes)], key, encoded(value))
        assert response.status == 200, response.body

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, enumerate(docs.items())))


def query(cluster: KVCluster, node: int, spec: dict[str, Any], timeout_s: float = 60) -> Response:
    body = json.dumps(spec).encode()
    headers = {"Content-Type": "application/json"}
    return cluster.request(node, "POST", "/v1/query", body, headers, timeout_s=timeout_s)


def answer(cluster: KVCluster, node: int, spec: dict[str, Any]) -> dict[str, Any]:
    response = query(cluster, node, spec)
    assert response.status == 200, response.body
    result: dict[str, Any] = response.json()
    return result


# ---- the naive computation -------------------------------------------------------------------


def json_docs(docs: dict[str, Any], test: Callable[[Doc], bool] = lambda d: True) -> list[Doc]:
    return [
        d
        for k, d in sorted(docs.items())
        if k.startswith(PREFIX) and not isinstance(d, bytes) and test(d)
    ]


def naive_aggregates(rows: list[Doc], not_json_rows: int = 0) -> dict[str, Any]:
    """As AGGREGATES computes them; count() also counts matched rows that are not JSON."""
    ages = [d["age"] for d in rows]
    spent = [d["spent"] for d in rows]
    cities = [d["city"] for d in rows if "city" in d]
    counts = Counter(cities)
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:3]
    return {
        "rows": len(rows) + not_json_rows,
        "with_zip": sum(1 for d in rows if "address" in d),
        "spent": sum(spent),
        "mean_age": sum(ages) / len(ages) if ages else None,
        "youngest": min(ages, default=None),
        "oldest": max(ages, default=None),
        "cities": {"value": len(counts), "approximate": False, "relative_error": 0.0},
        "top_cities": {
            "items": [{"value": v, "count": c} for v, c in top],
            "approximate": False,
            "max_error": 0,
        },
    }


AGGREGATES = {
    "rows": {"fn": "count"},
    "with_zip": {"fn": "count", "field": "address.zip"},
    "spent": {"fn": "sum", "field": "spent"},
    "mean_age": {"fn": "avg", "field": "age"},
    "youngest": {"fn": "min", "field": "age"},
    "oldest": {"fn": "max", "field": "age"},
    "cities": {"fn": "count_distinct", "field": "city"},
    "top_cities": {"fn": "top_k", "field": "city", "k": 3},
}


def assert_same_aggregates(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-12), name
        else:
            assert got[name] == value, name


# ---- one cluster for the read-only comparisons -------------------------------------------------


@pytest.fixture(scope="module")
def loaded(shared_kv_cluster: KVCluster) -> tuple[KVCluster, dict[str, Any]]:
    docs = make_docs(seed=5, count=400)
    load(shared_kv_cluster, docs)
    return shared_kv_cluster, docs


def test_every_aggregate_matches_the_naive_computation(loaded) -> None:
    cluster, docs = loaded
    spec = {"prefix": PREFIX, "aggregates": AGGREGATES}
    for node in cluster.node_ids:  # any node coordinates
        result = answer(cluster, node, spec)
        assert len(result["groups"]) == 1
        want = naive_aggregates(json_docs(docs), not_json_rows=5)
        assert_same_aggregates(result["groups"][0]["aggregates"], want)
        stats = result["stats"]
        assert stats["shards"] == 4
        assert stats["rows_not_json"] == 5  # the query read documents: raw values counted
        assert stats["rows_matched"] == len(json_docs(docs)) + 5
        assert result["partial"] is False


def test_group_by_with_a_filter_matches_the_naive_computation(loaded) -> None:
    cluster, docs = loaded
    spec = {
        "prefix": PREFIX,
        "where": [{"field": "age", "op": ">=", "value": 18}],
        "group_by": ["city"],
        "aggregates": AGGREGATES,
    }
    result = answer(cluster, cluster.node_ids[1], spec)
    adults = json_docs(docs, lambda d: d["age"] >= 18)
    want = {"": naive_aggregates([d for d in adults if "city" not in d])}
    for city in CITIES:
        want[city] = naive_aggregates([d for d in adults if d.get("city") == city])
    got = {group["group"].get("city", ""): group["aggregates"] for group in result["groups"]}
    assert set(got) == {key for key, value in want.items() if value["rows"]}
    for city, aggregates in got.items():
        assert_same_aggregates(aggregates, want[city])
    # Groups come in value order: the missing city first, then the strings in order.
    assert list(got) == ["", *sorted(c for c in CITIES if c in got)]


TWO = ("pau", "metz")


@pytest.mark.parametrize(
    ("predicate", "test"),
    [
        ({"field": "age", "op": "==", "value": 30}, lambda d: d["age"] == 30),
        ({"field": "age", "op": "!=", "value": 30}, lambda d: d["age"] != 30),
        ({"field": "age", "op": "<", "value": 30}, lambda d: d["age"] < 30),
        ({"field": "age", "op": "<=", "value": 30}, lambda d: d["age"] <= 30),
        ({"field": "age", "op": ">", "value": 30}, lambda d: d["age"] > 30),
        ({"field": "age", "op": ">=", "value": 30}, lambda d: d["age"] >= 30),
        ({"field": "city", "op": "in", "value": list(TWO)}, lambda d: d.get("city") in TWO),
        ({"field": "address", "op": "exists", "value": True}, lambda d: "address" in d),
        ({"field": "address.zip", "op": "exists", "value": False}, lambda d: "address" not in d),
        ({"field": "city", "op": "prefix", "value": "n"}, lambda d: d.get("city", "")[:1] == "n"),
    ],
)  # fmt: skip
def test_each_predicate_matches_the_naive_filter(loaded, predicate, test) -> None:
    cluster, docs = loaded
    spec = {"prefix": PREFIX, "where": [predicate], "aggregates": {"n": {"fn": "count"}}}
    result = answer(cluster, cluster.node_ids[2], spec)
    assert result["groups"][0]["aggregates"]["n"] == len(json_docs(docs, test))


def test_an_approximate_count_distinct_says_so_and_stays_within_its_error(loaded) -> None:
    cluster, docs = loaded
    spec = {
        "prefix": PREFIX,
        "aggregates": {"ns": {"fn": "count_distinct", "field": "n"}},
        "approximate_distinct_threshold": 50,
    }
    result = answer(cluster, cluster.node_ids[0], spec)["groups"][0]["aggregates"]["ns"]
    truth = len(json_docs(docs))
    assert result["approximate"] is True
    assert abs(result["value"] - truth) <= 3 * result["relative_error"] * truth


def test_select_pages_through_every_row_in_key_order(loaded) -> None:
    cluster, docs = loaded
    spec: dict[str, Any] = {
        "prefix": PREFIX,
        "where": [{"field": "age", "op": "<", "value": 45}],
        "select": ["age", "address.zip"],
        "limit": 37,
    }
    rows: list[dict[str, Any]] = []
    pages = 0
    while True:
        result = answer(cluster, cluster.node_ids[pages % 3], spec)
        assert len(result["rows"]) <= 37
        rows += result["rows"]
        pages += 1
        if result["next_cursor"] is None:
            break
        spec["cursor"] = result["next_cursor"]
    want = []
    for key, doc in sorted(docs.items()):
        if key.startswith(PREFIX) and not isinstance(doc, bytes) and doc["age"] < 45:
            value = {"age": doc["age"]}
            if "address" in doc:
                value["address.zip"] = doc["address"]["zip"]
            want.append({"key": key, "value": value})
    assert rows == want
    assert pages == len(want) // 37 + 1


def test_select_star_returns_whole_values_and_marks_non_json(loaded) -> None:
    cluster, docs = loaded
    result = answer(cluster, cluster.node_ids[0], {"prefix": PREFIX, "select": "*", "limit": 10000})
    want = [
        {"key": k, "not_json": True} if isinstance(v, bytes) else {"key": k, "value": v}
        for k, v in sorted(docs.items())
        if k.startswith(PREFIX)
    ]
    assert result["rows"] == want
    assert result["next_cursor"] is None
    per_shard = result["stats"]["per_shard"]
    assert sorted(s["shard"] for s in per_shard) == [1, 2, 3, 4]
    assert all(s["applied_index"] > 0 for s in per_shard)


def test_a_stale_query_answers_from_any_replica(loaded) -> None:
    cluster, docs = loaded
    spec = {"prefix": PREFIX, "aggregates": {"n": {"fn": "count"}}, "consistency": "stale"}
    want = len(json_docs(docs)) + 5
    for node in cluster.node_ids:  # replicas catch up; a stale read may lag, never invent
        wait_for(
            "a stale query to see every write",
            lambda node=node: answer(cluster, node, spec)["groups"][0]["aggregates"]["n"] == want,
        )


def test_a_query_sees_every_write_acknowledged_before_it(loaded) -> None:
    """Linearizable, also when a follower scans: it first waits for the leader's read point."""
    cluster, _ = loaded
    spec = {"prefix": "fresh/", "select": "*", "limit": 10_000}
    for i in range(40):
        nodes = cluster.node_ids
        assert cluster.put(nodes[i % 3], f"fresh/{i:03d}", b"{}").status == 200
        result = answer(cluster, nodes[(i + 1) % 3], spec)
        assert len(result["rows"]) == i + 1, f"write {i} not seen by the query after it"


@pytest.mark.parametrize("consistency", ["linearizable", "stale"])
def test_scans_are_spread_over_the_replicas(loaded, consistency) -> None:
    """4 shards, 3 nodes holding all of them: no node scans more than 2, whoever leads."""
    cluster, docs = loaded
    spec = {"prefix": PREFIX, "aggregates": {"n": {"fn": "count"}}, "consistency": consistency}
    for node in cluster.node_ids:
        result = answer(cluster, node, spec)
        assert result["groups"][0]["aggregates"]["n"] == len(json_docs(docs)) + 5
        scans = Counter(s["node"] for s in result["stats"]["per_shard"])
        assert len(scans) == 3
        assert max(scans.values()) == 2


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "invalid_request"),
        (b'{"prefix": "a", "select": "*", "bogus": 1}', 400, "invalid_request"),
        (b'{"aggregates": {"x": {"fn": "median", "field": "a"}}}', 400, "invalid_request"),
        (b'{"aggregates": {"x": {"fn": "plugin", "plugin": "nope"}}}', 400, "invalid_request"),
        (b'{"select": "*", "cursor": "q1.not-ours"}', 400, "invalid_request"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_request"),
        (b" " * (2 << 20), 413, "payload_too_large"),
    ],
)
def test_bad_queries_are_refused_with_a_clear_error(loaded, body, status, code) -> None:
    cluster, _ = loaded
    response = cluster.request(cluster.node_ids[0], "POST", "/v1/query", body)
    assert response.status == status, response.body
    assert response.json()["error"]["code"] == code


def test_internal_query_route_refuses_garbage(loaded) -> None:
    cluster, _ = loaded
    response = cluster.request(
        cluster.node_ids[0], "POST", "/v1/internal/query?shard=1&budget=100", b"\xc1garbage"
    )
    assert response.status in (400, 503), response.body  # 503: not the leader of shard 1
    assert "error" in response.json()


# ---- writes while querying ---------------------------------------------------------------------


def same_shard_pairs(cluster: KVCluster, count: int) -> list[tuple[str, str]]:
    shards = cluster.status(cluster.node_ids[0])["shards"]

    def shard_of(key: str) -> int:
        token = key_token(key)
        return next(s["id"] for s in shards if s["start_token"] <= token < s["end_token"])

    by_shard: dict[int, list[str]] = {}
    pairs = []
    for i in range(10_000):
        key = f"bank/{i}"
        waiting = by_shard.setdefault(shard_of(key), [])
        waiting.append(key)
        if len(waiting) == 2:
            pairs.append((waiting.pop(), waiting.pop()))
            if len(pairs) == count:
                return pairs
    raise AssertionError("not enough same-shard pairs")


def transfer(cluster: KVCluster, node: int, pair: tuple[str, str], rng: random.Random) -> bool:
    """Move money inside a pair with one compare-and-set transaction (both keys, one shard)."""
    a, b = pair
    got = [cluster.get(node, key) for key in (a, b)]
    if any(r.status != 200 for r in got):
        return False
    balances = [json.loads(r.body)["balance"] for r in got]
    amount = rng.randrange(1, 20)
    new = [balances[0] - amount, balances[1] + amount]
    body = {
        "compare": [
            {"key": key, "target": "version", "op": "==", "version": int(r.headers["X-KV-Version"])}
            for key, r in zip((a, b), got, strict=True)
        ],
        "success": [
            {"op": "put", "key": key, "value": base64.b64encode(encoded({"balance": v})).decode()}
            for key, v in zip((a, b), new, strict=True)
        ],
    }
    response = cluster.request(node, "POST", "/v1/txn", json.dumps(body).encode())
    return response.status == 200 and response.json()["succeeded"]


def test_queries_during_writes_see_each_shard_at_one_read_point(loaded) -> None:
    cluster, _ = loaded
    pairs = same_shard_pairs(cluster, 12)
    accounts = [key for pair in pairs for key in pair]
    load(cluster, {key: {"balance": 100} for key in accounts})
    total = 100 * len(accounts)
    stop = threading.Event()
    transfers = Counter[str]()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            node = cluster.node_ids[rng.randrange(3)]
            if transfer(cluster, node, rng.choice(pairs), rng):
                transfers["done"] += 1

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for("the first transfers", lambda: transfers["done"] >= 5)
        spec = {
            "prefix": "bank/",
            "aggregates": {"sum": {"fn": "sum", "field": "balance"}, "n": {"fn": "count"}},
        }
        before = transfers["done"]
        sums = []
        for i in range(15):
            result = answer(cluster, cluster.node_ids[i % 3], spec)
            sums.append(result["groups"][0]["aggregates"])
        during = transfers["done"] - before
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert during > 0, "no transfer committed while the queries ran: the test proved nothing"
    assert sums == [{"sum": total, "n": len(accounts)}] * 15


# ---- a node killed -----------------------------------------------------------------------------


@pytest.fixture
def single_replica_cluster(tmp_path: Path) -> Iterator[KVCluster]:
    cluster = KVCluster(tmp_path / "cluster", nodes=3, shards=6, replication=1)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_dead_shard_fails_the_query_by_name_or_is_listed_as_missing(
    single_replica_cluster: KVCluster,
) -> None:
    cluster = single_replica_cluster
    docs = {key: doc for key, doc in make_docs(seed=9, count=150).items() if key.startswith("d/")}
    load(cluster, docs)
    status = cluster.status(1)
    victim = 3
    dead_shards = sorted(s["id"] for s in status["shards"] if s["replicas"] == [victim])
    assert dead_shards, "rendezvous placement gave node 3 no shard; pick another node"
    live = [s for s in status["shards"] if s["replicas"] != [victim]]
    cluster.kill(victim)

    spec: dict[str, Any] = {"prefix": PREFIX, "aggregates": {"n": {"fn": "count"}}}
    refused = query(cluster, 1, spec)
    assert refused.status == 503, refused.body
    message = refused.json()["error"]["message"]
    assert all(f"shard {shard}" in message for shard in dead_shards), message
    assert "allow_partial" in message

    result = answer(cluster, 2, {**spec, "allow_partial": True})
    assert result["partial"] is True
    assert result["missing_shards"] == dead_shards
    assert [e["shard"] for e in result["shard_errors"]] == dead_shards

    def on_live_shard(key: str) -> bool:
        token = key_token(key)
        return any(s["start_token"] <= token < s["end_token"] for s in live)

    assert result["groups"][0]["aggregates"]["n"] == sum(1 for k in docs if on_live_shard(k))


def test_a_query_survives_a_killed_replica_node(kv_cluster: KVCluster) -> None:
    """Replication 3: the dead node's leaderships move and the answer is complete and right."""
    docs = {key: doc for key, doc in make_docs(seed=11, count=150).items() if key.startswith("d/")}
    load(kv_cluster, docs)
    leaders = Counter(s["leader"] for s in kv_cluster.status(1)["shards"])
    victim = leaders.most_common(1)[0][0]
    kv_cluster.kill(victim)
    alive = next(node for node in kv_cluster.node_ids if node != victim)
    result = answer(kv_cluster, alive, {"prefix": PREFIX, "aggregates": AGGREGATES})
    assert result["partial"] is False
    want = naive_aggregates(json_docs(docs), not_json_rows=5)
    assert_same_aggregates(result["groups"][0]["aggregates"], want)
    assert victim not in {s["node"] for s in result["stats"]["per_shard"]}


# ---- kvctl query and the Python client ---------------------------------------------------------


def kvctl_json(cluster: KVCluster, *args: str) -> Any:
    result = CliRunner().invoke(kvctl, ["--endpoints", cluster.url(1), "--json", "query", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_kvctl_query_flags_give_the_same_answer_as_the_naive_computation(loaded) -> None:
    cluster, docs = loaded
    found = kvctl_json(
        cluster, "-p", PREFIX, "-w", "age >= 18", "-g", "city", "-a", "rows=count",
        "-a", "spent=sum(spent)", "-a", "top_cities=top_k(city,3)",
    )  # fmt: skip
    adults = json_docs(docs, lambda d: d["age"] >= 18)
    by_city = {group["group"].get("city"): group["aggregates"] for group in found["groups"]}
    for city in CITIES:
        rows = [d for d in adults if d.get("city") == city]
        want = naive_aggregates(rows)
        assert by_city[city]["rows"] == want["rows"]
        assert by_city[city]["spent"] == pytest.approx(want["spent"], rel=1e-12)
        assert by_city[city]["top_cities"] == want["top_cities"]


def test_kvctl_query_all_pages_and_the_client_agree(loaded) -> None:
    cluster, docs = loaded
    found = kvctl_json(cluster, "-p", PREFIX, "-w", "city == pau", "-s", "n", "-n", "7", "--all")
    want = [
        {"key": k, "value": {"n": d["n"]}}
        for k, d in sorted(docs.items())
        if k.startswith(PREFIX) and not isinstance(d, bytes) and d.get("city") == "pau"
    ]
    assert found["rows"] == want
    assert found["next_cursor"] is None
    client = KVClient([cluster.url(2)], timeout_s=60)
    spec = {"prefix": PREFIX, "where": [{"field": "city", "op": "==", "value": "pau"}]}
    pages = list(client.query_pages({**spec, "select": ["n"], "limit": 7}))
    assert len(pages) == len(want) // 7 + 1
    assert [row for page in pages for row in page["rows"]] == want


def test_kvctl_query_prints_a_table(loaded) -> None:
    cluster, _ = loaded
    args = ["--endpoints", cluster.url(3), "query", "-p", PREFIX, "-g", "city", "-a", "n=count"]
    result = CliRunner().invoke(kvctl, args)
    assert result.exit_code == 0, result.output
    assert "CITY" in result.stdout
    assert all(city in result.stdout for city in CITIES)
    assert "4 shards" in result.stdout


# ---- a server-side plugin, installed as a real entry point ------------------------------------

PLUGIN_MODULE = """
from kvstore.query.plugins import Plugin


def square(key, document):
    n = document.get("n") if isinstance(document, dict) else None
    return n * n if type(n) is int else None


SUM_OF_SQUARES = Plugin(map_fn=square, reduce_fn=lambda a, b: a + b)
"""


def test_an_installed_plugin_runs_on_every_shard(tmp_path: Path, monkeypatch) -> None:
    """The plugin is a real installed distribution (a dist-info with an entry point) on the
    nodes' PYTHONPATH; code never comes from the request."""
    site = tmp_path / "site"
    info = site / "kv_test_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kv-test-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[pyraftkv.query]\nsum_of_squares = kv_test_plugin:SUM_OF_SQUARES\n"
    )
    (site / "kv_test_plugin.py").write_text(PLUGIN_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(site))
    cluster = KVCluster(tmp_path / "cluster", nodes=3, shards=3, replication=2)
    try:
        docs = {f"p/{i:03d}": {"n": i, "odd": i % 2 == 1} for i in range(60)}
        load(cluster, docs)
        spec = {
            "prefix": "p/",
            "group_by": ["odd"],
            "aggregates": {"ssq": {"fn": "plugin", "plugin": "sum_of_squares"}},
        }
        groups = answer(cluster, 2, spec)["groups"]
        assert groups == [
            {"group": {"odd": False}, "aggregates": {"ssq": sum(i * i for i in range(0, 60, 2))}},
            {"group": {"odd": True}, "aggregates": {"ssq": sum(i * i for i in range(1, 60, 2))}},
        ]
        unknown = query(cluster, 1, {"aggregates": {"x": {"fn": "plugin", "plugin": "nope"}}})
        assert unknown.status == 400
        assert "sum_of_squares" in unknown.json()["error"]["message"]  # lists what is installed
    finally:
        cluster.stop()
