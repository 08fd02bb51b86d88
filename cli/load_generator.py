"""The engine behind `kvctl bench`: N connections, each sending one request after another
until the duration ends, recording every latency and every failure by kind.

Pure asyncio on cli.raw_http connections (uvloop when installed): measured against a bare
aiohttp server it generates several times what one node process can serve (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import quote

from cli.raw_http import HttpConnection, HttpConnectionError
from cli.shard_routes import LeaderRoutes

PROGRESS_INTERVAL_S = 0.5


class Workload(Enum):
    PUT = "put"
    GET = "get"
    MIXED = "mixed"  # --read-percent gets, the rest puts
    SCAN = "scan"  # one page of --scan-limit keys from a random start key

    @property
    def needs_data(self) -> bool:
        return self is not Workload.PUT


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    workload: Workload
    endpoints: Sequence[str]
    concurrency: int = 16
    value_size: int = 100
    keys: int = 1000
    duration_s: float = 10.0
    key_prefix: str = "bench/"
    read_percent: int = 50
    scan_limit: int = 100
    stale: bool = False
    timeout_s: float = 10.0
    seed: int = 1
    # Send gets and puts straight to the key's shard leader (scans go anywhere).
    routes: LeaderRoutes | None = None

    def key(self, index: int) -> str:
        return f"{self.key_prefix}{index:012d}"


@dataclass(slots=True)
class BenchResult:
    workload: Workload
    concurrency: int
    elapsed_s: float
    latencies_s: list[float] = field(default_factory=list)  # successful requests only
    errors: Counter[str] = field(default_factory=Counter)  # by kind: "http 503", "timeout", ...

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float:
        """Nearest-rank percentile of successful latencies, in ms (0 when none succeeded)."""
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        rank = min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.5) - 1))
        return ordered[rank] * 1000

    def summary(self) -> dict[str, Any]:
        return {
            "workload": self.workload.value,
            "concurrency": self.concurrency,
            "elapsed_s": round(self.elapsed_s, 3),
            "ok": self.ok,
            "errors": self.error_count,
            "errors_by_kind": dict(self.errors),
            "throughput_per_s": round(self.throughput_per_s, 1),
            "p50_ms": round(self.percentile_ms(0.50), 3),
            "p90_ms": round(self.percentile_ms(0.90), 3),
            "p99_ms": round(self.percentile_ms(0.99), 3),
            "max_ms": round(self.percentile_ms(1.0), 3),
        }


# on_progress(elapsed_s, ok, errors): called about every PROGRESS_INTERVAL_S while it runs.
ProgressCallback = Callable[[float, int, int], None]


class _Requests:
    """Builds the request a worker sends next, from the workload and a per-worker RNG."""

    def __init__(self, config: BenchConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        self._value = os.urandom(config.value_size)
        self._read_suffix = "?consistency=stale" if config.stale else ""

    def next(self) -> tuple[str, str, bytes, str]:
        """(method, path, body, key)"""
        config = self._config
        workload = config.workload
        if workload is Workload.MIXED:
            is_read = self._rng.randrange(100) < config.read_percent
            workload = Workload.GET if is_read else Workload.PUT
        key = config.key(self._rng.randrange(config.keys))
        quoted = quote(key, safe="")
        if workload is Workload.PUT:
            return "PUT", f"/v1/kv/{quoted}", self._value, key
        if workload is Workload.GET:
            return "GET", f"/v1/kv/{quoted}{self._read_suffix}", b"", key
        scan = f"/v1/scan?start={quoted}&limit={config.scan_limit}"
        return "GET", scan + ("&consistency=stale" if config.stale else ""), b"", key


async def fill(config: BenchConfig) -> int:
    """Write every key of the key space once (so gets and scans find data); returns how many
    writes failed."""
    indexes = iter(range(config.keys))
    value = os.urandom(config.value_size)
    failures = 0

    async def writer(endpoint: str) -> None:
        nonlocal failures
        connection = HttpConnection(endpoint, config.timeout_s)
        try:
            for index in indexes:
                path = "/v1/kv/" + quote(config.key(index), safe="")
                try:
                    status, _ = await connection.request("PUT", path, value)
                except (HttpConnectionError, TimeoutError):
                    status = 0
                failures += status != 200
        finally:
            connection.close()

    endpoints = config.endpoints
    await asyncio.gather(
        *(writer(endpoints[i % len(endpoints)]) for i in range(config.concurrency))
    )
    return failures


async def run(config: BenchConfig, on_progress: ProgressCallback | None = None) -> BenchResult:
    """Drive the workload for config.duration_s with config.concurrency connections spread
    round-robin over the endpoints."""
    result = BenchResult(config.workload, config.concurrency, elapsed_s=0.0)
    latencies, errors = result.latencies_s, result.errors
    started = time.perf_counter()
    deadline = started + config.duration_s

    async def worker(number: int) -> None:
        home = config.endpoints[number % len(config.endpoints)]
        connections = {home: HttpConnection(home, config.timeout_s)}
        requests = _Requests(config, random.Random(config.seed * 1_000_003 + number))
        clock = time.perf_counter
        routes = config.routes
        try:
            while (sent := clock()) < deadline:
                method, path, body, key = requests.next()
                url = (routes.leader_url(key) if routes else None) or home
                connection = connections.get(url)
                if connection is None:
                    connection = connections[url] = HttpConnection(url, config.timeout_s)
                try:
                    status, _ = await connection.request(method, path, body)
                except HttpConnectionError:
                    errors["connection"] += 1
                    await asyncio.sleep(0.01)  # a refused connection must not spin the loop
                    continue
                except TimeoutError:
                    errors["timeout"] += 1
                    continue
                if 200 <= status < 300:
                    latencies.append(clock() - sent)
                else:
                    errors[f"http {status}"] += 1
        finally:
            for connection in connections.values():
                connection.close()

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            if on_progress is not None:
                on_progress(time.perf_counter() - started, len(latencies), sum(errors.values()))

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(worker(n) for n in range(config.concurrency)))
    finally:
        reporter.cancel()
    result.elapsed_s = time.perf_counter() - started
    return result


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it roughly doubles what one process can generate)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
