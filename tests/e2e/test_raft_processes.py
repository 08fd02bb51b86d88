"""Three real node processes over loopback TCP and LMDB (fsync on): SIGKILL the leader, and the
survivors elect a new one that keeps every committed entry."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.cluster_plan import free_ports
from raft.demo import node_argv, request

pytestmark = pytest.mark.e2e

DEADLINE_S = 30


class DemoCluster:
    def __init__(self, data_dir: Path, size: int) -> None:
        ports = free_ports(2 * size)
        self.peers = ",".join(f"{i + 1}=127.0.0.1:{ports[i]}" for i in range(size))
        self.control_ports = {i + 1: ports[size + i] for i in range(size)}
        self.data_dir = data_dir
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        for node_id in self.control_ports:
            self.start(node_id)

    def start(self, node_id: int) -> None:
        argv = node_argv(node_id, self.peers, self.data_dir, self.control_ports[node_id])
        log = open(self.data_dir / f"node{node_id}.log", "ab")  # noqa: SIM115 - lives with the process
        self.processes[node_id] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, node_id: int) -> None:
        process = self.processes.pop(node_id)
        process.kill()  # SIGKILL: no chance to flush anything
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.kill()
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()

    def ask(self, node_id: int, payload: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return request(self.control_ports[node_id], payload, timeout_s=5)
        except (OSError, ValueError):
            return None

    def wait_for(self, what: str, condition: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(0.1)
        raise AssertionError(f"timed out after {DEADLINE_S}s waiting for {what}")

    def leader(self, among: set[int] | None = None) -> int | None:
        for node_id in sorted(among or self.processes):
            status = self.ask(node_id, {"op": "status"})
            if status and status["role"] == "leader":
                return node_id
        return None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[DemoCluster]:
    demo = DemoCluster(tmp_path, 3)
    try:
        yield demo
    finally:
        demo.stop_all()


def propose_all(cluster: DemoCluster, leader: int, items: list[str]) -> list[str]:
    acknowledged = []
    for item in items:
        reply = cluster.ask(leader, {"op": "propose", "data": item})
        if reply and reply.get("ok"):
            acknowledged.append(item)
    return acknowledged


def test_killing_the_leader_elects_a_new_one_that_keeps_every_committed_entry(
    cluster: DemoCluster,
):
    first_leader = cluster.wait_for("a leader", cluster.leader)
    before = propose_all(cluster, first_leader, [f"before-{i}" for i in range(40)])
    assert len(before) == 40
    first_term = cluster.ask(first_leader, {"op": "status"})["term"]  # type: ignore[index]

    cluster.kill(first_leader)
    survivors = set(cluster.processes)
    new_leader = cluster.wait_for("a new leader", lambda: cluster.leader(survivors))
    assert new_leader != first_leader
    status = cluster.ask(new_leader, {"op": "status"})
    assert status is not None
    assert status["term"] > first_term

    after = propose_all(cluster, new_leader, [f"after-{i}" for i in range(20)])
    assert len(after) == 20

    cluster.start(first_leader)  # restarts from its LMDB data and catches up
    target = cluster.ask(new_leader, {"op": "status"})["commit"]  # type: ignore[index]

    def caught_up() -> bool:
        status = cluster.ask(first_leader, {"op": "status"})
        return bool(status and status["applied"] >= target)

    cluster.wait_for("the restarted node to catch up", caught_up)
    for node_id in sorted(cluster.processes):
        entries = cluster.ask(node_id, {"op": "entries"})["entries"]  # type: ignore[index]
        assert entries == before + after, f"node {node_id} has a different log"
