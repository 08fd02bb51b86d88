"""Query throughput: documents scanned per second by count, group-by-sum and top_k.

Loads N JSON documents (default 1,000,000) into a real 3-node, 8-shard, replication-3 cluster,
then times each query over all of them, side by side in the same run with the floor for this
machine: one Python process computing the same answers from one local LMDB file holding the
same documents (a cursor over every value, orjson.loads as the nodes use, a dict of sums or a
Counter). Both answers must agree. On 2 cores shared by 3 node processes the cluster beats
the floor by little (each node also verifies checksums and runs Raft): docs/query.md,
Performance, has the figures and what bounds them.

    python tests/benchmarks/query_bench.py [--docs 1000000] [--runs 3] [--keep DIR]

With --keep DIR the cluster's data stays in DIR; a later run given the same DIR starts that
cluster again and skips loading (the answers are still checked against the local scan).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import lmdb
import orjson

from cli import launcher
from kvstore.sharding import key_token

CITIES = [f"city-{i:02d}" for i in range(50)]
PREFIX = "doc/"
TXN_OPS = 128  # the API's max_txn_ops: one transaction puts this many documents of one shard


def documents(count: int, seed: int = 1) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    for i in range(count):
        doc = {
            "user": i,
            "city": rng.choice(CITIES),
            "amount": rng.randrange(1, 1000),
            "tags": ["a", "b"] if i % 3 else ["c"],
        }
        yield f"{PREFIX}{i:08d}", json.dumps(doc, separators=(",", ":")).encode()


QUERIES: dict[str, dict[str, Any]] = {
    "count": {"prefix": PREFIX, "aggregates": {"n": {"fn": "count"}}},
    "group-by-sum": {
        "prefix": PREFIX,
        "group_by": ["city"],
        "aggregates": {"total": {"fn": "sum", "field": "amount"}},
    },
    "top_k": {"prefix": PREFIX, "aggregates": {"top": {"fn": "top_k", "field": "city", "k": 5}}},
}


# ---- the floor: one process, one LMDB file -----------------------------------------------------


def local_lmdb(path: Path, count: int) -> lmdb.Environment:
    env = lmdb.open(str(path), map_size=8 << 30, sync=False, writemap=True)
    batch: list[tuple[bytes, bytes]] = []
    for key, value in documents(count):
        batch.append((key.encode(), value))
        if len(batch) == 10_000:
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(batch)
            batch = []
    with env.begin(write=True) as txn:
        txn.cursor().putmulti(batch)
    env.sync(True)
    return env


def _values(env: lmdb.Environment) -> Iterator[bytes]:
    with env.begin(buffers=False) as txn:
        cursor = txn.cursor()
        if cursor.set_range(PREFIX.encode()):
            for key, value in cursor.iternext():
                if not key.startswith(PREFIX.encode()):
                    break
                yield value


def local_count(env: lmdb.Environment) -> Any:
    return sum(1 for _ in _values(env))


def local_group_sum(env: lmdb.Environment) -> Any:
    totals: dict[str, int] = defaultdict(int)
    for value in _values(env):
        doc = orjson.loads(value)
        totals[doc["city"]] += doc["amount"]
    return dict(totals)


def local_top_k(env: lmdb.Environment) -> Any:
    counts = Counter(orjson.loads(value)["city"] for value in _values(env))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:5]


LOCAL: dict[str, Callable[[lmdb.Environment], Any]] = {
    "count": local_count,
    "group-by-sum": local_group_sum,
    "top_k": local_top_k,
}


def cluster_answer(name: str, answer: dict[str, Any]) -> Any:
    """The cluster's answer in the local function's shape, to check both agree."""
    groups = answer["groups"]
    if name == "count":
        return groups[0]["aggregates"]["n"]
    if name == "group-by-sum":
        return {g["group"]["city"]: g["aggregates"]["total"] for g in groups}
    items = groups[0]["aggregates"]["top"]["items"]
    return [(item["value"], item["count"]) for item in items]


# ---- the cluster -------------------------------------------------------------------------------


async def load_cluster(urls: list[str], count: int, concurrency: int = 16) -> float:
    """Put every document with single-shard transactions of TXN_OPS puts; returns seconds."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{urls[0]}/v1/cluster") as response:
            shards = (await response.json())["shards"]

        def shard_of(key: str) -> int:
            token = key_token(key)
            return next(s["id"] for s in shards if s["start_token"] <= token < s["end_token"])

        queue: asyncio.Queue[list[tuple[str, bytes]] | None] = asyncio.Queue(concurrency * 2)

        async def sender(worker: int) -> None:
            url = urls[worker % len(urls)]
            while (batch := await queue.get()) is not None:
                body = {
                    "success": [
                        {"op": "put", "key": key, "value": base64.b64encode(value).decode()}
                        for key, value in batch
                    ]
                }
                for _attempt in range(20):
                    async with session.post(f"{url}/v1/txn", json=body) as response:
                        if response.status == 200:
                            break
                        await asyncio.sleep(0.5)
                else:
                    raise RuntimeError(f"loading failed: {response.status} {await response.text()}")

        started = time.perf_counter()
        senders = [asyncio.create_task(sender(i)) for i in range(concurrency)]
        pending: dict[int, list[tuple[str, bytes]]] = defaultdict(list)
        for loaded, (key, value) in enumerate(documents(count), start=1):
            batch = pending[shard_of(key)]
            batch.append((key, value))
            if len(batch) == TXN_OPS:
                await queue.put(batch)
                pending[shard_of(key)] = []
            if loaded % 100_000 == 0:
                print(f"  loaded {loaded:,} documents", flush=True)
        for batch in pending.values():
            if batch:
                await queue.put(batch)
        for _ in senders:
            await queue.put(None)
        await asyncio.gather(*senders)
        return time.perf_counter() - started


async def run_query(url: str, spec: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        async with session.post(f"{url}/v1/query", json=spec) as response:
            answer = await response.json()
            if response.status != 200:
                raise RuntimeError(f"query failed: {answer}")
        return time.perf_counter() - started, answer


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each query")
    parser.add_argument("--keep", type=Path, help="put the cluster's data here and keep it")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="query-bench-"))
    data_dir = args.keep or work / "cluster"
    print(f"{args.docs:,} documents; cluster data in {data_dir}; load average {os.getloadavg()}")

    started = time.perf_counter()
    env = local_lmdb(work / "local", args.docs)
    print(f"local LMDB file written in {time.perf_counter() - started:.1f}s")

    up = launcher.start_cluster(launcher.UpRequest(data_dir, 3, 8, 3, base_port=None))
    record = up.record
    try:
        launcher.wait_until_ready(record, timeout_s=60, on_progress=lambda _: None)
        urls = record.endpoints
        if up.created:
            seconds = asyncio.run(load_cluster(urls, args.docs))
            print(
                f"cluster loaded in {seconds:.1f}s: {args.docs / seconds:,.0f} docs/s (txn batches)"
            )
        else:
            print(f"cluster reused from {data_dir}: not loaded again")
        leaders = Counter(s["leader"] for s in asyncio.run(run_query_status(urls[0]))["shards"])
        print(f"shard leaders per node: {dict(sorted(leaders.items()))}")

        rows = []
        for name, spec in QUERIES.items():
            local_times, cluster_times = [], []
            for _ in range(args.runs):
                began = time.perf_counter()
                local_result = LOCAL[name](env)
                local_times.append(time.perf_counter() - began)
                elapsed, answer = asyncio.run(run_query(urls[0], spec))
                cluster_times.append(elapsed)
                if cluster_answer(name, answer) != local_result:
                    raise AssertionError(f"{name}: the cluster and the local scan disagree")
            local_s, cluster_s = statistics.median(local_times), statistics.median(cluster_times)
            rows.append((name, args.docs / local_s, args.docs / cluster_s, local_s / cluster_s))
        print()
        print(f"{'query':<14}{'local docs/s':>16}{'cluster docs/s':>16}{'ratio':>8}")
        for name, local_rate, cluster_rate, ratio in rows:
            print(f"{name:<14}{local_rate:>16,.0f}{cluster_rate:>16,.0f}{ratio:>7.2f}x")
        print(f"(median of {args.runs} runs; ratio = cluster / single-process floor)")
        print("node RSS MB:", [round(rss_mb(n.pid), 1) for n in record.nodes if n.pid])
        print(f"load average after: {os.getloadavg()}")
    finally:
        launcher.stop_cluster(data_dir)
        env.close()


async def run_query_status(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/cluster") as response:
        status: dict[str, Any] = await response.json()
        return status


if __name__ == "__main__":
    main()
