"""Side by side with etcd: the same wrk load against a 3-member etcd and our 3-node cluster.

    python tests/benchmarks/compare_etcd.py [--duration 10] [--conns 1,16,64]

Installs etcd-server and wrk with apt-get when they are missing (and says so). Starts etcd
(3 members) and our cluster (3 nodes, 8 shards, replication 3, fsync on) on free loopback
ports, drives both with wrk + Lua at each connection count, for puts and linearizable gets of
100-byte values (etcd through its JSON gateway, /v3/kv/put and /v3/kv/range with base64), and
prints one markdown table with both systems, the ratios, and the peak RSS of every server
process. wrk drives etcd's leader; ours twice: through one node (which forwards to the shard
leaders), and "routed", one wrk per node sending only keys whose shard that node leads (what a
client that routes by the shard map does, as `kvctl bench` does by default).
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
from cli.client import KVClient  # noqa: E402
from cli.shard_routes import LeaderRoutes  # noqa: E402

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

    def led_keys(self, keys: int) -> dict[int, list[int]]:
        """Ours: port of the node leading each key's shard -> key indexes."""
        status = KVClient([f"http://127.0.0.1:{self.port}"]).cluster_status()
        routes = LeaderRoutes(status)
        by_port: dict[int, list[int]] = {}
        for index in range(keys):
            url = routes.leader_url(key_name(index)) or f"http://127.0.0.1:{self.port}"
            by_port.setdefault(int(url.rsplit(":", 1)[1]), []).append(index)
        return by_port


def key_name(index: int) -> str:
    return f"bench-{index:06d}"


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


def lua_script(system: str, op: str, key_indexes: list[int], value: bytes) -> str:
    """A wrk script sending `op` for random keys among `key_indexes`, every request prebuilt."""
    # wrk.format() called at load time does not know the Host header yet: give it ourselves.
    lines = ["local requests = {}", 'local headers = {["Host"] = "127.0.0.1"}']
    for slot, index in enumerate(key_indexes, 1):
        key = key_name(index)
        if system == "etcd":
            doc = {"key": base64.b64encode(key.encode()).decode()}
            if op == "put":
                doc["value"] = base64.b64encode(value).decode()
            path = "/v3/kv/put" if op == "put" else "/v3/kv/range"
            body = f"[[{json.dumps(doc)}]]"  # a Lua long string: no escaping needed
            lines.append(f'requests[{slot}] = wrk.format("POST", "{path}", headers, {body})')
        elif op == "put":
            lines.append(
                f'requests[{slot}] = wrk.format("PUT", "/v1/kv/{key}", headers, "{value.decode()}")'
            )
        else:
            lines.append(f'requests[{slot}] = wrk.format("GET", "/v1/kv/{key}", headers)')
    lines.append(f"request = function() return requests[math.random({len(key_indexes)})] end")
    return "\n".join(lines) + _LUA_DONE


@dataclass
class Cell:
    per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def run_wrk(targets: list[tuple[int, Path, int]], duration_s: float) -> Cell:
    """Run one wrk per (port, script, conns) at the same time; add up their throughput and
    report the worst p50 and p99 among them (wrk cannot merge histograms)."""
    running = [
        subprocess.Popen(
            [
                "wrk",
                f"-t{min(conns, 2)}",
                f"-c{conns}",
                f"-d{duration_s:g}s",
                "--timeout=10s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for port, script, conns in targets
    ]
    docs = []
    for process in running:
        out, _ = process.communicate(timeout=duration_s + 60)
        if process.returncode != 0:
            raise SystemExit(f"wrk failed ({process.returncode}): {out[-500:]}")
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        docs.append(json.loads(line[len("RESULT ") :]))
    return Cell(
        per_s=sum(doc["requests"] / (doc["duration_us"] / 1e6) for doc in docs),
        p50_ms=max(doc["p50_us"] for doc in docs) / 1000,
        p99_ms=max(doc["p99_us"] for doc in docs) / 1000,
        errors=sum(doc["errors"] for doc in docs),
    )


def prefill(system: System, keys: int, value: bytes) -> None:
    """Gets must find their keys (etcd answers a missing key 200, we answer 404)."""
    for index in range(keys):
        key = key_name(index)
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
) -> dict[str, dict[tuple[str, int], Cell]]:
    """{variant: {(op, conns): cell}}; ours has a second variant, each request sent straight
    to its shard's leader (one wrk per node, the connections split between them)."""
    value = b"v" * 100
    prefill(system, keys, value)
    variants = {system.name: {system.port: list(range(keys))}}
    if system.name == "ours":
        variants["ours routed"] = system.led_keys(keys)
    results: dict[str, dict[tuple[str, int], Cell]] = {}
    for variant, keys_by_port in variants.items():
        cells = results[variant] = {}
        for op in ("put", "get"):
            scripts = {}
            for port, indexes in keys_by_port.items():
                scripts[port] = work / f"{variant.replace(' ', '-')}-{op}-{port}.lua"
                scripts[port].write_text(lua_script(system.name, op, indexes, value))
            for conns in conns_list:
                ports = sorted(keys_by_port, key=lambda p: -len(keys_by_port[p]))[:conns]
                targets = [
                    (port, scripts[port], conns // len(ports) + (i < conns % len(ports)))
                    for i, port in enumerate(ports)
                ]
                cells[op, conns] = cell = run_wrk(targets, duration_s)
                print(
                    f"  {variant:11} {op} c={conns:<3} {cell.per_s:9,.0f}/s  "
                    f"p50 {cell.p50_ms:6.2f}  p99 {cell.p99_ms:7.2f} ms  errors {cell.errors}",
                    flush=True,
                )
    return results


def table(results: dict[str, dict[tuple[str, int], Cell]], rss: dict[str, list[float]]) -> str:
    ours_variants = [name for name in results if name != "etcd"]
    header = "| op | conns | etcd ops/s | etcd p50 / p99 ms |"
    rule = "| --- | ---: | ---: | ---: |"
    for name in ours_variants:
        header += f" {name} ops/s | x etcd | {name} p50 / p99 ms |"
        rule += " ---: | ---: | ---: |"
    rows = [header, rule]
    for (op, conns), theirs in results["etcd"].items():
        label = "put" if op == "put" else "linearizable get"
        latency = f"{theirs.p50_ms:.2f} / {theirs.p99_ms:.1f}"
        row = f"| {label} | {conns} | {theirs.per_s:,.0f} | {latency} |"
        for name in ours_variants:
            mine = results[name][op, conns]
            row += (
                f" {mine.per_s:,.0f} | {mine.per_s / theirs.per_s:.2f}x "
                f"| {mine.p50_ms:.2f} / {mine.p99_ms:.1f} |"
            )
        rows.append(row)
    errors = {name: sum(cell.errors for cell in cells.values()) for name, cells in results.items()}
    rows.append(f"\nerrors (non-2xx, timeouts, socket errors): {errors}")
    for name, values in rss.items():
        listed = ", ".join(f"{mb:.0f}" for mb in values)
        rows.append(f"\npeak RSS of {name}'s server processes (MB): {listed}")
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
                results.update(measure(system, work, conns_list, args.duration, args.keys))
                rss[system.name] = [peak_rss_mb(pid) for pid in system.pids]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print()
    print(table(results, rss))


if __name__ == "__main__":
    main()
