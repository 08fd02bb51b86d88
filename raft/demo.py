"""A replicated log over real TCP and LMDB: the raft package running on its own, for `make run`,
the multi-process tests and the loopback benchmark, until the KV service takes over.

    python -m raft.demo                  # start 3 node processes here and show them committing
    python -m raft.demo node --id 1 ...  # one node process (what the launcher starts)

Each node answers JSON lines on its control port: {"op": "propose", "data": "..."},
{"op": "status"}, {"op": "entries"} (the applied log), {"op": "bench", "count": N, "size": B}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raft.core.errors import NotLeader, RaftError
from raft.core.messages import ConfState, Entry, EntryKind, Snapshot
from raft.core.types import LogIndex, NodeId
from raft.runtime.host import HostConfig, RaftHost
from raft.runtime.transport import TcpTransport
from raft.storage.lmdb_log import LmdbLogStore

GROUP_ID = 1
_INDEX = struct.Struct(">Q")
_APPLIED_KEY = b"applied"


class LogStateMachine:
    """Keeps every applied command in LMDB, keyed by index: easy to compare across nodes."""

    def __init__(self, store: LmdbLogStore) -> None:
        self._env = store.env
        self._data = self._env.open_db(b"demo.data")
        self._meta = self._env.open_db(b"demo.meta")

    def applied_index(self) -> LogIndex:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(_APPLIED_KEY)
        return LogIndex(_INDEX.unpack(raw)[0] if raw else 0)

    def apply(self, txn: Any, entries: Sequence[Entry]) -> list[object]:
        for entry in entries:
            if entry.kind is EntryKind.NORMAL and entry.data:
                txn.put(_INDEX.pack(entry.index), entry.data, db=self._data)
        txn.put(_APPLIED_KEY, _INDEX.pack(entries[-1].index), db=self._meta)
        return [entry.index for entry in entries]

    def snapshot(self) -> bytes:
        with self._env.begin(db=self._data) as txn:
            items = list(txn.cursor())
        applied = self.applied_index()
        return json.dumps(
            {"applied": applied, "items": [[k.hex(), v.hex()] for k, v in items]}
        ).encode()

    def restore(self, txn: Any, snapshot: Snapshot) -> None:
        txn.drop(self._data, delete=False)
        for key, value in json.loads(snapshot.data)["items"]:
            txn.put(bytes.fromhex(key), bytes.fromhex(value), db=self._data)
        txn.put(_APPLIED_KEY, _INDEX.pack(snapshot.meta.index), db=self._meta)

    def entries(self) -> list[str]:
        with self._env.begin(db=self._data) as txn:
            return [value.decode(errors="replace") for _, value in txn.cursor()]


async def run_node(args: argparse.Namespace) -> None:
    node_id = NodeId(args.id)
    peers = parse_peers(args.peers)
    # A large map only reserves address space; growing it under live readers is the risky path.
    store = LmdbLogStore(Path(args.data_dir), map_size_bytes=64 << 30, sync=not args.no_fsync)
    state_machine = LogStateMachine(store)
    host = RaftHost(HostConfig(node_id=node_id, tick_interval_s=args.tick_ms / 1000), store)
    host.add_group(GROUP_ID, state_machine, bootstrap=ConfState(voters=frozenset(peers)))
    transport = TcpTransport(
        node_id, peers[node_id], {n: a for n, a in peers.items() if n != node_id}, host.receive
    )
    await transport.start()
    await host.start(transport)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = await handle(json.loads(line))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            writer.close()

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            status = host.status(GROUP_ID)
            return {
                "id": node_id,
                "pid": os.getpid(),
                "role": status.role,
                "term": status.term,
                "leader": status.leader_id,
                "commit": status.commit_index,
                "applied": status.applied_index,
                "fsyncs": host.metrics.fsyncs,
            }
        if op == "entries":
            return {"entries": state_machine.entries()}
        if op == "propose":
            return await propose(str(request.get("data", "")).encode())
        if op == "bench":
            return await bench(int(request["count"]), int(request["size"]), int(request["window"]))
        return {"error": f"unknown op {op!r}"}

    async def propose(data: bytes) -> dict[str, Any]:
        try:
            index = await asyncio.wait_for(host.propose(GROUP_ID, data), timeout=5)
        except NotLeader as error:
            return {"error": "not_leader", "leader": error.leader_hint}
        except (RaftError, TimeoutError) as error:
            return {"error": type(error).__name__}
        return {"ok": True, "index": index}

    async def bench(count: int, size: int, window: int) -> dict[str, Any]:
        """Propose `count` entries with `window` outstanding; report entries/s committed."""
        payload = b"b" * size
        latencies: list[float] = []
        semaphore = asyncio.Semaphore(window)

        async def one() -> None:
            async with semaphore:
                started = time.perf_counter()
                await host.propose(GROUP_ID, payload)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        fsyncs = host.metrics.fsyncs
        await asyncio.gather(*(one() for _ in range(count)))
        elapsed = time.perf_counter() - started
        latencies.sort()
        return {
            "entries_per_s": count / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "fsyncs": host.metrics.fsyncs - fsyncs,
        }

    server = await asyncio.start_server(serve, "127.0.0.1", args.control_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"node {node_id} ready", flush=True)
    await stop.wait()
    server.close()
    await host.stop()
    await transport.stop()
    store.close()


def parse_peers(text: str) -> dict[NodeId, tuple[str, int]]:
    """'1=127.0.0.1:7001,2=127.0.0.1:7002' -> {1: ('127.0.0.1', 7001), ...}"""
    peers: dict[NodeId, tuple[str, int]] = {}
    for item in text.split(","):
        node, _, address = item.partition("=")
        host, _, port = address.rpartition(":")
        peers[NodeId(int(node))] = (host, int(port))
    return peers


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def request(port: int, payload: dict[str, Any], timeout_s: float = 10) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def node_argv(node_id: int, peers: str, data_dir: Path, control_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "raft.demo",
        "node",
        "--id",
        str(node_id),
        "--peers",
        peers,
        "--data-dir",
        str(data_dir / f"node{node_id}"),
        "--control-port",
        str(control_port),
    ]


def launch(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(2 * args.nodes)
    peers = ",".join(f"{i + 1}=127.0.0.1:{ports[i]}" for i in range(args.nodes))
    controls = ports[args.nodes :]
    processes = [
        subprocess.Popen(node_argv(i + 1, peers, data_dir, controls[i])) for i in range(args.nodes)
    ]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the nodes on SIGTERM too
    try:
        print(f"{args.nodes} Raft nodes on 127.0.0.1 (data in {data_dir}); Ctrl-C stops them.")
        print(
            "This is the replicated log on its own; the KV service and kvctl build on it.",
            flush=True,
        )
        counter = 0
        while True:
            time.sleep(1)
            statuses = []
            for port in controls:
                try:
                    statuses.append(request(port, {"op": "status"}, timeout_s=2))
                except (OSError, ValueError):
                    statuses.append({"role": "down"})
            leader = next((s for s in statuses if s.get("role") == "leader"), None)
            if leader is not None:
                counter += 1
                port = controls[int(leader["id"]) - 1]
                request(port, {"op": "propose", "data": f"tick {counter}"})
            summary = "  ".join(
                f"n{i + 1}:{st.get('role', '?')}@{st.get('term', '-')} "
                f"applied={st.get('applied', '-')}"
                for i, st in enumerate(statuses)
            )
            print(summary, flush=True)
    except KeyboardInterrupt:
        print("stopping")
    finally:  # also on SystemExit from SIGTERM
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raft.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    cluster = sub.add_parser("cluster", help="start N node processes here (the default)")
    cluster.add_argument("--nodes", type=int, default=3)
    cluster.add_argument("--data-dir", default="data/raft-demo")
    node = sub.add_parser("node", help="run one node process")
    node.add_argument("--id", type=int, required=True)
    node.add_argument("--peers", required=True, help="1=host:port,2=host:port,...")
    node.add_argument("--data-dir", required=True)
    node.add_argument("--control-port", type=int, required=True)
    node.add_argument("--tick-ms", type=int, default=50)
    node.add_argument("--no-fsync", action="store_true", help="unsafe: for comparisons only")
    args = parser.parse_args(argv)
    if args.command == "node":
        asyncio.run(run_node(args))
        return 0
    if args.command is None:
        args = cluster.parse_args([])
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
