"""Side by side with etcd: the same wrk load against a 3-member etcd and our 3-node cluster.

    python tests/benchmarks/compare_etcd.py [--duration 10] [--conns 1,16,64]

Installs etcd-server and wrk with apt-get when they are missing (and says so). Starts etcd
(3 members) and our cluster (3 nodes, 8 shards, replication 3, fsync on) on free loopback
ports, drives both with wrk + Lua at each connection count, for puts and linearizable gets of
100-byte values (etcd through its JSON gateway, /v3/kv/put and /v3/kv/range with base64), and
prints one markdown table with both systems, the ratios, and the peak RSS of every server
process. wrk drives etcd's leader and one node of ours (which forwards to shard leaders).
Everything it started is stopped by PID. Only the ratios of one run mean anything.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cli import launcher  # noqa: E402  (the repo root is on sys.path only from here)

DEADLINE_S = 60.0


def ensure_tools() -> None:
    missing = [tool for tool in ("etcd", "wrk") if shutil.which(tool) is None]
    if not missing:
        return
    packages = ["etcd-server" if tool == "etcd" else tool for tool in missing]
    print(f"missing {', '.join(missing)}: running apt-get install -y {' '.join(packages)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True)


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_call(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_for(what: str, condition: object) -> object:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            result = condition()  # type: ignore[operator]
            if result:
                return result
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each (by its PID, through Popen), then SIGKILL whatever has not exited."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the two systems ----------------------------------------------------------------------


@dataclass
class System:
    name: str
    port: int  # where wrk sends its requests
    pids: list[int]


@contextlib.contextmanager
def etcd_cluster(work: Path) -> Iterator[System]:
    ports = free_ports(6)
    client, peer = ports[:3], ports[3:]
    initial = ",".join(f"m{i}=http://127.0.0.1:{peer[i]}" for i in range(3))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(3):
            log = (work / f"etcd{i}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [
                        "etcd",
                        f"--name=m{i}",
                        f"--data-dir={work / f'etcd{i}'}",
                        f"--listen-client-urls=http://127.0.0.1:{client[i]}",
                        f"--advertise-client-urls=http://127.0.0.1:{client[i]}",
                        f"--listen-peer-urls=http://127.0.0.1:{peer[i]}",
                        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer[i]}",
                        f"--initial-cluster={initial}",
                        "--initial-cluster-state=new",
                        "--initial-cluster-token=compare-etcd",
                        "--log-level=error",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

        def leader_port() -> int | None:
            for port in client:
                status, body = http_call(port, "POST", "/v3/maintenance/status", b"{}")
                doc = json.loads(body)
                if status == 200 and doc.get("leader") == doc["header"]["member_id"]:
                    return port
            return None

        port = wait_for("an etcd leader", leader_port)
        assert isinstance(port, int)
        yield System("etcd", port, [p.pid for p in processes])
    finally:
        stop_processes(processes)


@contextlib.contextmanager
def our_cluster(work: Path) -> Iterator[System]:
    data_dir = work / "ours"
    record = launcher.start_cluster(launcher.UpRequest(data_dir, 3, 8, 3, base_port=None)).record
    try:
        launcher.wait_until_ready(record, timeout_s=DEADLINE_S, on_progress=lambda _: None)
        port = int(record.node(1).client_url.rsplit(":", 1)[1])
        pids = [node.pid for node in record.nodes if node.pid is not None]
        yield System("ours", port, pids)
    finally:
        launcher.stop_cluster(data_dir)


# --- wrk ----------------------------------------------------------------------------------

_LUA_DONE = """
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, errors,
    latency:percentile(50), latency:percentile(99)))
end
"""


def lua_script(system: str, op: str, keys: int, value: bytes) -> str:
    """A wrk script sending `op` for random keys among `keys`, all request bytes prebuilt."""
    # wrk.format() called at load time does not know the Host header yet: give it ourselves.
    lines = ["local requests = {}", 'local headers = {["Host"] = "127.0.0.1"}']
    for index in range(keys):
        key = f"bench-{index:06d}"
        if system == "etcd":
            doc = {"key": base64.b64encode(key.encode()).decode()}
            if op == "put":
                doc["value"] = base64.b64encode(value).decode()
            path = "/v3/kv/put" if op == "put" else "/v3/kv/range"
            body = f"[[{json.dumps(doc)}]]"  # a Lua long string: no escaping needed
            lines.append(f'requests[{index + 1}] = wrk.format("POST", "{path}", headers, {body})')
        elif op == "put":
            lines.append(
                f'requests[{index + 1}] = wrk.format("PUT", "/v1/kv/{key}", headers, '
                f'"{value.decode()}")'
            )
        else:
            lines.append(f'requests[{index + 1}] = wrk.format("GET", "/v1/kv/{key}", headers)')
    lines.append(f"request = function() return requests[math.random({keys})] end")
    return "\n".join(lines) + _LUA_DONE


@dataclass
class Cell:
    per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def run_wrk(port: int, script: Path, conns: int, duration_s: float) -> Cell:
    threads = min(conns, 2)
    completed = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{conns}",
            f"-d{duration_s:g}s",
            "--timeout=10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration_s + 60,
    )
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT "))
    doc = json.loads(line[len("RESULT ") :])
    return Cell(
        per_s=doc["requests"] / (doc["duration_us"] / 1e6),
        p50_ms=doc["p50_us"] / 1000,
        p99_ms=doc["p99_us"] / 1000,
        errors=doc["errors"],
    )


def prefill(system: System, keys: int, value: bytes) -> None:
    """Gets must find their keys (etcd answers a missing key 200, we answer 404)."""
    for index in range(keys):
        key = f"bench-{index:06d}"
        if system.name == "etcd":
            body = json.dumps(
                {
                    "key": base64.b64encode(key.encode()).decode(),
                    "value": base64.b64encode(value).decode(),
                }
            ).encode()
            status, _ = http_call(system.port, "POST", "/v3/kv/put", body)
        else:
            status, _ = http_call(system.port, "PUT", f"/v1/kv/{key}", value)
        if status != 200:
            raise SystemExit(f"{system.name}: prefill of {key} answered {status}")


def measure(
    system: System, work: Path, conns_list: list[int], duration_s: float, keys: int
) -> dict[tuple[str, int], Cell]:
    value = b"v" * 100
    prefill(system, keys, value)
    cells = {}
    for op in ("put", "get"):
        script = work / f"{system.name}-{op}.lua"
        script.write_text(lua_script(system.name, op, keys, value))
        for conns in conns_list:
            cells[op, conns] = cell = run_wrk(system.port, script, conns, duration_s)
            print(
                f"  {system.name:4} {op} c={conns:<3} {cell.per_s:9,.0f}/s  p50 {cell.p50_ms:6.2f}"
                f"  p99 {cell.p99_ms:7.2f} ms  errors {cell.errors}",
                flush=True,
            )
    return cells


def table(
    etcd: dict[tuple[str, int], Cell],
    ours: dict[tuple[str, int], Cell],
    rss: dict[str, list[float]],
) -> str:
    rows = [
        "| op | conns | etcd ops/s | ours ops/s | ours/etcd | etcd p50 / p99 ms "
        "| ours p50 / p99 ms | errors etcd / ours |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (op, conns), theirs in etcd.items():
        mine = ours[op, conns]
        label = "put" if op == "put" else "linearizable get"
        rows.append(
            f"| {label} | {conns} | {theirs.per_s:,.0f} | {mine.per_s:,.0f} "
            f"| {mine.per_s / theirs.per_s:.2f}x | {theirs.p50_ms:.2f} / {theirs.p99_ms:.1f} "
            f"| {mine.p50_ms:.2f} / {mine.p99_ms:.1f} | {theirs.errors} / {mine.errors} |"
        )
    for name, values in rss.items():
        listed = ", ".join(f"{mb:.0f}" for mb in values)
        rows.append(f"\npeak RSS of {name}'s processes (MB): {listed}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--conns", default="1,16,64", help="connection counts")
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()
    conns_list = [int(part) for part in args.conns.split(",")]
    ensure_tools()
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores shared: ratios, not absolutes)")
    results: dict[str, dict[tuple[str, int], Cell]] = {}
    rss: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="compare-etcd-") as tmp:
        work = Path(tmp)
        for start in (etcd_cluster, our_cluster):
            with start(work) as system:
                print(f"{system.name}: driving 127.0.0.1:{system.port}", flush=True)
                results[system.name] = measure(system, work, conns_list, args.duration, args.keys)
                rss[system.name] = [peak_rss_mb(pid) for pid in system.pids]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print()
    print(table(results["etcd"], results["ours"], rss))


if __name__ == "__main__":
    main()
