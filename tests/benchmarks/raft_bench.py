"""Raft throughput: committed entries per second of a 3-node group.

1. In the simulator (no I/O: the cost of the protocol code itself).
2. Over real loopback TCP + LMDB with fsync on, three processes, batching on (the runtime
   persists everything proposed during one fsync in the next), at several client windows.
3. A reference measured in the same run: bare LMDB commits with fsync, one entry per commit,
   i.e. what the same disk allows without batching.

    python tests/benchmarks/raft_bench.py [--entries 20000] [--size 100]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb

from cli.cluster_plan import free_ports
from raft.core.config import RaftConfig
from raft.core.messages import ConfState, Message
from raft.core.node import RaftNode
from raft.core.storage import MemoryStorage
from raft.core.types import NodeId
from raft.demo import node_argv, request


def simulated_entries_per_s(entries: int, size: int, batch: int) -> float:
    ids = [NodeId(i) for i in (1, 2, 3)]
    conf = ConfState(voters=frozenset(ids))
    storages = {i: MemoryStorage(conf) for i in ids}
    nodes = {
        i: RaftNode(RaftConfig(node_id=i), storages[i], random.Random(i), applied=0) for i in ids
    }
    inbox: list[Message] = []
    applied = 0

    def drain() -> None:
        nonlocal applied
        progress = True
        while progress:
            progress = False
            for node_id, node in nodes.items():
                while node.has_ready():
                    progress = True
                    ready = node.ready()
                    inbox.extend(ready.messages)
                    storage = storages[node_id]
                    storage.append(ready.entries_to_persist)
                    if ready.hard_state:
                        storage.set_hard_state(ready.hard_state)
                    inbox.extend(ready.messages_after_persist)
                    if node_id == leader_id:
                        applied += len(ready.entries_to_apply)
                    node.advance(ready)
            while inbox:
                progress = True
                message = inbox.pop()
                nodes[message.recipient].step(message)

    leader_id = NodeId(1)
    while not nodes[leader_id].is_leader:
        nodes[leader_id].tick()
        drain()
    payload = b"x" * size
    start_applied = applied
    started = time.perf_counter()
    proposed = 0
    while applied - start_applied < entries:
        for _ in range(min(batch, entries - proposed)):
            nodes[leader_id].propose(payload)
            proposed += 1
        drain()
    return entries / (time.perf_counter() - started)


def lmdb_fsync_commits_per_s(directory: Path, seconds: float = 2.0) -> float:
    env = lmdb.open(str(directory / "reference"), map_size=1 << 30, sync=True)
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        with env.begin(write=True) as txn:
            txn.put(count.to_bytes(8, "big"), b"x" * 100)
        count += 1
    elapsed = time.perf_counter() - started
    env.close()
    return count / elapsed


def loopback_runs(directory: Path, entries: int, size: int, windows: list[int]) -> list[dict]:
    ports = free_ports(6)
    peers = ",".join(f"{i + 1}=127.0.0.1:{ports[i]}" for i in range(3))
    processes = [
        subprocess.Popen(
            node_argv(i + 1, peers, directory, ports[3 + i]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(3)
    ]
    try:
        leader_port = None
        deadline = time.monotonic() + 30
        while leader_port is None and time.monotonic() < deadline:
            time.sleep(0.2)
            for port in ports[3:]:
                try:
                    if request(port, {"op": "status"})["role"] == "leader":
                        leader_port = port
                except OSError:
                    pass
        if leader_port is None:
            raise SystemExit("no leader elected within 30 s")
        results = []
        for window in windows:
            count = entries if window > 1 else min(entries, 2000)
            reply = request(
                leader_port,
                {"op": "bench", "count": count, "size": size, "window": window},
                timeout_s=600,
            )
            reply["window"] = window
            reply["count"] = count
            results.append(reply)
        return results
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100, help="bytes per entry")
    args = parser.parse_args()

    print(f"3-node Raft group, {args.size}-byte entries\n")
    print("simulator (protocol code only, no I/O):")
    for batch in (1, 64):
        rate = simulated_entries_per_s(args.entries, args.size, batch)
        print(f"  {batch:>3} proposals per round: {rate:>10,.0f} entries/s")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        reference = lmdb_fsync_commits_per_s(directory)
        print(f"\nreference: bare LMDB, one put per fsync'd commit: {reference:>8,.0f} commits/s")
        print("\nloopback TCP + LMDB, fsync on, 3 processes (client window = proposals in flight):")
        print(
            f"  {'window':>6} {'entries/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'entries/fsync':>13} {'x reference':>11}"
        )
        for run in loopback_runs(directory, args.entries, args.size, [1, 16, 64, 256]):
            per_fsync = run["count"] / max(run["fsyncs"], 1)
            print(
                f"  {run['window']:>6} {run['entries_per_s']:>10,.0f} {run['p50_ms']:>8.2f} "
                f"{run['p99_ms']:>8.2f} {per_fsync:>13.1f} "
                f"{run['entries_per_s'] / reference:>11.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
