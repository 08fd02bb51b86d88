"""One test run: start a real cluster, run clients and the nemesis for a while, heal, read the
final state, check the history, write the report, and say VERDICT valid|invalid|unknown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from jepsen_like.checker import check_history, verdict, verdict_line
from jepsen_like.cluster import TestCluster
from jepsen_like.history import History, Op
from jepsen_like.nemesis import Nemesis, plan_faults
from jepsen_like.result import CheckResult
from jepsen_like.workloads import WORKLOADS, HttpClient, Invocation, Workload, new_session

FINAL_READ_DEADLINE_S = 60.0


@dataclass(frozen=True, slots=True)
class RunConfig:
    workload: str
    nemeses: frozenset[str]
    time_s: float
    nodes: int
    shards: int
    concurrency: int
    seed: int
    out: Path
    replication: int = 3
    broken: str | None = None  # "stale-reads": the node's test-only unsafe mode


@dataclass(slots=True)
class RunResult:
    verdict: str  # valid | invalid | unknown
    summary: dict[str, Any] = field(default_factory=dict)
    results: list[CheckResult] = field(default_factory=list)


class _Clients:
    """Client processes: each does one operation at a time; one whose operation ends `info`
    is retired for a fresh process id (its operation may still be in flight, as in Jepsen)."""

    def __init__(self, history: History, workload: Workload, cluster: TestCluster, seed: int):
        self.history = history
        self.workload = workload
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.next_process = 0
        self.lock = asyncio.Lock()

    def _record(
        self,
        process: int,
        kind: str,
        op: Invocation,
        value: Any,
        node: int,
        error: str | None = None,
    ) -> None:
        self.history.append(
            Op(
                process=process,
                kind=kind,
                f=op.f,
                key=op.key,
                value=value,
                time_ns=time.monotonic_ns(),
                node=node,
                index=len(self.history),
                error=error,
            )
        )

    async def one(self, session: aiohttp.ClientSession, process: int, op: Invocation) -> str:
        node = self.rng.choice(self.cluster.node_ids)
        client = HttpClient(session, self.cluster.client_url(node))
        self._record(process, "invoke", op, op.value, node)
        completion = await self.workload.invoke(client, op)
        self._record(process, completion.kind, op, completion.value, node, completion.error)
        return completion.kind

    async def worker(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        process = self._new_process()
        while not stop.is_set():
            op = self.workload.next_invocation(self.rng)
            if await self.one(session, process, op) == "info":
                process = self._new_process()

    def _new_process(self) -> int:
        self.next_process += 1
        return self.next_process


async def _progress(history: History, started: float, stop: asyncio.Event, time_s: float) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5.0)
        counts = history.counts()
        print(
            f"  {time.monotonic() - started:5.0f}/{time_s:.0f}s  ops: "
            + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())),
            flush=True,
        )


async def _final_reads(clients: _Clients, session: aiohttp.ClientSession) -> None:
    """After healing, read the final state; retry each read until it is ok or time runs out."""
    deadline = time.monotonic() + FINAL_READ_DEADLINE_S
    for op in clients.workload.final_invocations():
        while time.monotonic() < deadline:
            process = clients._new_process()
            if await clients.one(session, process, op) == "ok":
                break
            await asyncio.sleep(0.5)


def fresh_cluster_dir(out: Path) -> Path:
    """The run's cluster directory, emptied: the checkers assume every key starts absent, so
    nodes must not start on a previous run's data (its values read as impossible ones)."""
    cluster_dir = out / "cluster"
    if cluster_dir.exists():
        print(f"jepsen_like: removing the previous run's cluster data in {cluster_dir}", flush=True)
        shutil.rmtree(cluster_dir)
    return cluster_dir


async def run_test(config: RunConfig) -> RunResult:
    from jepsen_like.report import write_report  # matplotlib: only when a run reports

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    workload: Workload = WORKLOADS[config.workload]()
    history = History()
    print(
        f"jepsen_like: workload {config.workload}, nemesis {','.join(sorted(config.nemeses))}, "
        f"{config.time_s:.0f}s, {config.nodes} nodes, {config.shards} shards, "
        f"concurrency {config.concurrency}, seed {config.seed}"
        + (f", BROKEN MODE {config.broken}" if config.broken else ""),
        flush=True,
    )
    with TestCluster(
        fresh_cluster_dir(out),
        nodes=config.nodes,
        shards=config.shards,
        replication=min(config.replication, config.nodes),
        unsafe_stale_reads=config.broken == "stale-reads",
    ) as cluster:
        cluster.start()
        async with new_session() as session:
            status = await HttpClient(session, cluster.client_url(cluster.node_ids[0]))._call(
                "GET", "/v1/cluster"
            )
            workload.setup(json.loads(status[2]))
            events = plan_faults(rng, config.time_s, set(config.nemeses), cluster.node_ids)
            nemesis = Nemesis(cluster, events)
            clients = _Clients(history, workload, cluster, config.seed + 1)
            stop = asyncio.Event()
            started = time.monotonic()
            tasks = [
                asyncio.create_task(clients.worker(session, stop))
                for _ in range(config.concurrency)
            ]
            nemesis_task = asyncio.create_task(nemesis.run(stop))
            progress = asyncio.create_task(_progress(history, started, stop, config.time_s))
            try:
                await asyncio.sleep(config.time_s)
            finally:
                stop.set()
                client_errors = await asyncio.gather(*tasks, return_exceptions=True)
                nemesis_error, _ = await asyncio.gather(
                    nemesis_task, progress, return_exceptions=True
                )
                await asyncio.to_thread(nemesis.heal_all)
            for error in [*client_errors, nemesis_error]:
                if isinstance(error, BaseException):
                    # The harness broke, not the store: say so instead of giving a verdict.
                    raise RuntimeError(f"harness failure: {error!r}") from error
            print("  healed; waiting for the cluster to recover", flush=True)
            await asyncio.to_thread(cluster.wait_healthy, FINAL_READ_DEADLINE_S)
            await _final_reads(clients, session)
        history.save(out / "history.jsonl")
        results = check_history(history, workload.checkers)
        faults = nemesis.applied
        summary = {
            "workload": config.workload,
            "nemeses": sorted(config.nemeses),
            "seed": config.seed,
            "time_s": config.time_s,
            "nodes": config.nodes,
            "shards": config.shards,
            "concurrency": config.concurrency,
            "broken": config.broken,
            "ops": history.counts(),
            "faults": [
                {
                    "kind": f.kind,
                    "detail": f.detail,
                    "started_ns": f.started_ns,
                    "ended_ns": f.ended_ns,
                }
                for f in faults
            ],
            "checkers": {r.checker: {"valid": r.valid, "details": r.details} for r in results},
            "logs": [str(path) for path in cluster.log_paths()],
        }
    overall = verdict(results)
    summary["verdict"] = overall
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(out, history, summary)
    return RunResult(overall, summary, results)


def main_run(config: RunConfig) -> int:
    result = asyncio.run(run_test(config))
    summary = result.summary
    print(f"report: {config.out / 'index.html'}")
    print(
        f"{verdict_line(result.results)} (ops {sum(summary['ops'].values())}, "
        f"faults {len(summary['faults'])}, seed {config.seed})",
        flush=True,
    )
    return {"valid": 0, "invalid": 1}.get(result.verdict, 2)
