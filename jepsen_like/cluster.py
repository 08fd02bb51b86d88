"""A real cluster for one test run: node processes on free loopback ports, every node-to-node link
routed through the proxy process (jepsen_like.proxy) so partitions really cut traffic, and the
process faults (kill -9, SIGSTOP/SIGCONT, restart). Clients talk to nodes directly.
Black box: only HTTP and signals, never an import of kvstore or raft. Processes are signalled by
the PID this object spawned, never by name.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cli.cluster_plan import PlannedNode, free_ports, node_toml, toml_string
from jepsen_like.proxy import KINDS, Address, LinkProxy, Pair

HOST: Final = "127.0.0.1"
START_DEADLINE_S: Final = 60.0
STOP_TIMEOUT_S: Final = 10.0
_HTTP_TIMEOUT_S: Final = 5.0
_POLL_INTERVAL_S: Final = 0.1
_REPO_ROOT: Final = Path(__file__).resolve().parent.parent


class ClusterError(RuntimeError):
    """The cluster did not start, or did not become healthy in time; the message has log tails."""


NodeSpec = PlannedNode  # one node's ports and directory, as kvctl's launcher plans them


def node_config_text(
    node: NodeSpec,
    nodes: list[NodeSpec],
    routes: dict[int, dict[str, Address]],
    *,
    shards: int,
    replication: int,
    unsafe_stale_reads: bool,
) -> str:
    """kvctl's node.toml plus a [routes.N] per peer: how this node reaches N through the proxy.
    [[cluster.nodes]] keeps the real addresses, identical in every file."""
    lines = [
        node_toml(
            node, nodes, shards=shards, replication=replication, written_by="jepsen_like"
        ).rstrip("\n")
    ]
    for peer, via in sorted(routes.items()):
        raft_host, raft_port = via["raft"]
        http_host, http_port = via["http"]
        lines += [
            "",
            f"[routes.{peer}]",
            f"peer_address = {toml_string(f'{raft_host}:{raft_port}')}",
            f"client_url = {toml_string(f'http://{http_host}:{http_port}')}",
        ]
    if unsafe_stale_reads:
        lines += ["", "[unsafe]", "stale_reads = true"]
    return "\n".join(lines) + "\n"


class TestCluster:
    """Start with `start()` (or use as a context manager, which always stops it)."""

    __test__ = False  # pytest: a helper, not a test class

    def __init__(
        self,
        data_dir: Path,
        *,
        nodes: int,
        shards: int,
        replication: int,
        unsafe_stale_reads: bool = False,
        python: str = sys.executable,
    ) -> None:
        if nodes < 1 or shards < 1 or not 1 <= replication <= nodes:
            raise ValueError("need nodes >= 1, shards >= 1 and 1 <= replication <= nodes")
        self.data_dir = data_dir.resolve()
        self.shards = shards
        self.replication = replication
        self.unsafe_stale_reads = unsafe_stale_reads
        self._python = python
        self._node_count = nodes
        self._specs: dict[int, NodeSpec] = {}
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._paused: set[int] = set()
        self._proxy = LinkProxy(python=python, log_path=self.data_dir / "proxy.log")
        self._lock = threading.RLock()  # the nemesis thread and the runner share this object
        self._blocked: set[Pair] = set()
        self._is_stopped = False  # once stopped, nothing here spawns a process again

    # ------------------------------------------------------------------ lifecycle
    def start(self, deadline_s: float = START_DEADLINE_S) -> None:
        """Ports, proxy, configs, nodes; returns once every shard has a leader and every node
        is ready. Stops everything it started if that fails."""
        try:
            self._start(deadline_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, deadline_s: float) -> None:
        with self._lock:
            if self._specs or self._is_stopped:
                raise ClusterError("a TestCluster starts once")
            count = self._node_count
            ports = free_ports(2 * count)
            self._specs = {
                node_id: NodeSpec(
                    node_id,
                    ports[node_id - 1],
                    ports[count + node_id - 1],
                    self.data_dir / f"node{node_id}",
                )
                for node_id in range(1, count + 1)
            }
            specs = list(self._specs.values())
            listen = self._proxy.start(
                {
                    (src.id, dst.id): {
                        "raft": (HOST, dst.peer_port),
                        "http": (HOST, dst.client_port),
                    }
                    for src in specs
                    for dst in specs
                    if src.id != dst.id
                }
            )
            for spec in specs:
                spec.data_dir.mkdir(parents=True, exist_ok=True)
                routes = {dst: via for (src, dst), via in listen.items() if src == spec.id}
                spec.config_path.write_text(
                    node_config_text(
                        spec,
                        specs,
                        routes,
                        shards=self.shards,
                        replication=self.replication,
                        unsafe_stale_reads=self.unsafe_stale_reads,
                    ),
                    encoding="utf-8",
                )
            for spec in specs:
                self._spawn(spec.id)
        self.wait_healthy(deadline_s)

    def stop(self) -> None:
        """Resumes paused nodes, SIGTERMs every node, SIGKILLs any still up after 10 s, then
        stops the proxy. Idempotent; all by PID."""
        with self._lock:
            self._is_stopped = True
            running = {
                node_id: process
                for node_id, process in self._processes.items()
                if process.poll() is None
            }
            for node_id, process in running.items():
                if node_id in self._paused:
                    _signal(process, signal.SIGCONT)
                _signal(process, signal.SIGTERM)
            self._paused.clear()
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for process in running.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
            for process in running.values():
                if process.poll() is None:
                    _signal(process, signal.SIGKILL)
                    process.wait()
            self._proxy.stop()
            self._blocked.clear()

    def __enter__(self) -> TestCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ nodes
    @property
    def node_ids(self) -> list[int]:
        return sorted(self._specs) if self._specs else list(range(1, self._node_count + 1))

    @property
    def is_stopped(self) -> bool:
        return self._is_stopped

    @property
    def proxy(self) -> LinkProxy:
        return self._proxy

    def client_url(self, node: int) -> str:
        """The node's own HTTP address: clients bypass the proxies."""
        return self._spec(node).client_url

    def pid(self, node: int) -> int | None:
        process = self._processes.get(node)
        return None if process is None or process.poll() is not None else process.pid

    def is_alive(self, node: int) -> bool:
        process = self._processes.get(node)
        return process is not None and process.poll() is None

    def is_paused(self, node: int) -> bool:
        return node in self._paused and self.is_alive(node)

    def kill(self, node: int) -> None:
        """kill -9 and reap. A node that is not running is left alone."""
        with self._lock:
            process = self._processes.get(node)
            if process is not None and process.poll() is None:
                _signal(process, signal.SIGKILL)
                process.wait()
            self._paused.discard(node)

    def restart(self, node: int) -> None:
        """Starts the node again with the same argv and data; a running one is killed first.
        Returns once the process is spawned, not once it serves."""
        with self._lock:
            self.kill(node)
            self._spawn(node)

    def pause(self, node: int) -> None:
        with self._lock:
            process = self._running(node)
            _signal(process, signal.SIGSTOP)
            self._paused.add(node)

    def resume(self, node: int) -> None:
        with self._lock:
            process = self._processes.get(node)
            if process is not None and process.poll() is None:
                _signal(process, signal.SIGCONT)
            self._paused.discard(node)

    def log_paths(self) -> list[Path]:
        return [self._spec(node).log_path for node in self.node_ids if node in self._specs] + [
            self.data_dir / "proxy.log"
        ]

    # ------------------------------------------------------------------ network
    def partition(self, groups: list[set[int]]) -> None:
        """Cuts every link between different groups, both ways; replaces any earlier cut.
        The groups must cover every node exactly once."""
        listed = [node for group in groups for node in group]
        if sorted(listed) != self.node_ids:
            raise ValueError(f"groups {groups} must cover nodes {self.node_ids} exactly once")
        side = {node: index for index, group in enumerate(groups) for node in group}
        self.set_blocked(
            {(a, b) for a in self.node_ids for b in self.node_ids if side[a] != side[b]}
        )

    def block_one_way(self, src: int, dst: int) -> None:
        """Cuts what src sends to dst (its Raft messages, its forwarded requests); adds to any
        earlier cut. dst's messages to src still arrive."""
        self.block_links([(src, dst)])

    def block_links(self, pairs: Iterable[Pair]) -> None:
        """Adds directed cuts."""
        with self._lock:
            self.set_blocked(self._blocked | set(pairs))

    def set_blocked(self, pairs: Iterable[Pair]) -> None:
        """Makes exactly these directed links blocked, changing only the ones that differ."""
        wanted = set(pairs)
        unknown = [pair for pair in wanted if not self._is_link(pair)]
        if unknown:
            raise ValueError(f"no such links: {sorted(unknown)}")
        with self._lock:
            newly = wanted - self._blocked
            if newly:
                self._proxy.block(sorted(newly), KINDS)
            freed = self._blocked - wanted
            if freed:
                self._proxy.unblock(sorted(freed), KINDS)
            self._blocked = wanted

    def blocked_links(self) -> set[Pair]:
        return set(self._blocked)

    def heal(self) -> None:
        with self._lock:
            self._proxy.heal()
            self._blocked.clear()

    # ------------------------------------------------------------------ status over HTTP
    def cluster_status(
        self, node: int, timeout_s: float = _HTTP_TIMEOUT_S
    ) -> dict[str, Any] | None:
        """GET /v1/cluster on one node; None if it does not answer 200 in time."""
        answer = self._get(node, "/v1/cluster", timeout_s)
        if answer is None or answer[0] != 200:
            return None
        status: dict[str, Any] = json.loads(answer[1])
        return status

    def leaders(self) -> dict[int, int]:
        """shard -> leader, by /v1/cluster of every live, unpaused node at once. Views disagree
        during a partition (an isolated leader still believes in itself): the highest term wins."""
        best: dict[int, tuple[int, int]] = {}  # shard -> (term, leader)
        for status in self._statuses():
            for shard in status.get("shards", []):
                leader, term = int(shard.get("leader") or 0), int(shard.get("term") or 0)
                if leader > 0 and (term, leader) > best.get(int(shard["id"]), (-1, 0)):
                    best[int(shard["id"])] = (term, leader)
        return {shard: leader for shard, (_, leader) in sorted(best.items())}

    def leader_of(self, shard_id: int) -> int | None:
        return self.leaders().get(shard_id)

    def wait_healthy(self, deadline_s: float) -> None:
        """Polls until every node is alive, unpaused and answers /ready, and every shard has a
        leader. Raises ClusterError (with log tails) when a node is down or time runs out."""
        deadline = time.monotonic() + deadline_s
        progress = "no answer yet"
        while True:
            down = [node for node in self.node_ids if not self.is_alive(node)]
            if down:
                raise ClusterError(f"node(s) {down} are not running\n" + self._log_tails(down))
            paused = [node for node in self.node_ids if self.is_paused(node)]
            if paused:
                raise ClusterError(f"node(s) {paused} are paused; resume them first")
            probe_s = min(_HTTP_TIMEOUT_S, max(0.2, deadline - time.monotonic()))
            unready = [node for node in self.node_ids if not self._is_ready(node, probe_s)]
            if not unready:
                leaders = self.leaders()
                if len(leaders) == self.shards:
                    return
                progress = f"{len(leaders)}/{self.shards} shards have a leader"
            else:
                progress = f"node(s) {unready} not ready"
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"cluster not healthy after {deadline_s:g}s ({progress})\n"
                    + self._log_tails(self.node_ids)
                )
            time.sleep(_POLL_INTERVAL_S)

    # ------------------------------------------------------------------ internals
    def _spec(self, node: int) -> NodeSpec:
        spec = self._specs.get(node)
        if spec is None:
            raise ValueError(f"no node {node} (nodes: {self.node_ids}; started?)")
        return spec

    def _is_link(self, pair: Pair) -> bool:
        src, dst = pair
        return src != dst and src in self._specs and dst in self._specs

    def _running(self, node: int) -> subprocess.Popen[bytes]:
        process = self._processes.get(node)
        if process is None or process.poll() is not None:
            raise ClusterError(f"node {node} is not running")
        return process

    def _argv(self, node: int) -> list[str]:
        argv = [self._python, "-m", "kvstore", "--config", str(self._spec(node).config_path)]
        if self.unsafe_stale_reads:
            argv.append("--unsafe-test-faults")
        return argv

    def _spawn(self, node: int) -> None:
        if self._is_stopped:
            raise ClusterError(f"the cluster was stopped; not starting node {node} again")
        spec = self._spec(node)
        argv = self._argv(node)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if part
        )
        with open(spec.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} jepsen_like started: {' '.join(argv)}\n".encode())
            log.flush()
            self._processes[node] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.data_dir,
                start_new_session=True,  # a Ctrl-C to the harness reaches no node by accident
            )
        self._paused.discard(node)

    def _get(
        self, node: int, path: str, timeout_s: float = _HTTP_TIMEOUT_S
    ) -> tuple[int, bytes] | None:
        parts = urlsplit(self.client_url(node))
        connection = http.client.HTTPConnection(
            parts.hostname or HOST, parts.port, timeout=timeout_s
        )
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def _is_ready(self, node: int, timeout_s: float) -> bool:
        answer = self._get(node, "/ready", timeout_s)
        return answer is not None and answer[0] == 200

    def _statuses(self) -> list[dict[str, Any]]:
        nodes = [node for node in self.node_ids if self.is_alive(node) and not self.is_paused(node)]
        if not nodes:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            answers = list(pool.map(self.cluster_status, nodes))
        return [answer for answer in answers if answer is not None]

    def _log_tails(self, nodes: Iterable[int], lines: int = 15) -> str:
        parts = []
        for node in nodes:
            path = self._spec(node).log_path
            try:
                text = path.read_bytes()[-32_768:].decode("utf-8", "replace")
            except OSError as error:
                text = f"(cannot read: {error.strerror})"
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- node {node} ({path}):\n{tail}")
        return "\n".join(parts)


def _signal(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Signals our own child by PID; one that exited meanwhile is fine."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)
