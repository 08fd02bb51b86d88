"""TestCluster against real node processes: faults must really happen (a cut link elects a new
leader, a killed node is gone, a paused one is silent) and every process stops by PID."""

from __future__ import annotations

import os
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from jepsen_like.cluster import ClusterError, NodeSpec, TestCluster, node_config_text

pytestmark = pytest.mark.e2e

DEADLINE_S = 30.0
T = TypeVar("T")


def _poll(probe: Callable[[], T | None], what: str, deadline_s: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        time.sleep(0.1)


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped: signal 0 reaches nothing


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    test_cluster = TestCluster(
        tmp_path_factory.mktemp("jepsen_cluster") / "c", nodes=3, shards=2, replication=3
    )
    pids: list[int] = []
    with test_cluster:
        test_cluster.start()
        pids = [pid for node in test_cluster.node_ids if (pid := test_cluster.pid(node))]
        assert test_cluster.proxy.pid is not None
        pids.append(test_cluster.proxy.pid)
        yield test_cluster
    for pid in pids:
        _assert_gone(pid)


@pytest.fixture(autouse=True)
def healthy_after(cluster: TestCluster) -> Iterator[None]:
    """Each test may break the cluster; the next one starts from a healthy one."""
    yield
    for node in cluster.node_ids:
        cluster.resume(node)
        if not cluster.is_alive(node):
            cluster.restart(node)
    cluster.heal()
    cluster.wait_healthy(DEADLINE_S)


def _replica_view(cluster: TestCluster, asked: int, shard: int) -> dict[str, Any] | None:
    """What node `asked` itself says about its replica of `shard` (role, term, leader)."""
    status = cluster.cluster_status(asked)
    if status is None:
        return None
    for entry in status["shards"]:
        if entry["id"] == shard:
            for replica in entry["replica_status"]:
                if replica["node"] == asked and replica["reachable"]:
                    return dict(replica)
    return None


def test_a_started_cluster_has_a_leader_for_every_shard_and_peers_go_through_the_proxy(
    cluster: TestCluster,
) -> None:
    leaders = cluster.leaders()
    assert len(leaders) == 2
    assert set(leaders.values()) <= set(cluster.node_ids)
    for node in cluster.node_ids:
        config = tomllib.loads((cluster.data_dir / f"node{node}" / "node.toml").read_text())
        assert sorted(int(peer) for peer in config["routes"]) == [
            peer for peer in cluster.node_ids if peer != node
        ]
    forwarded = {
        pair: kinds["raft"].bytes_forwarded for pair, kinds in cluster.proxy.stats().items()
    }
    leader = next(iter(leaders.values()))
    assert all(forwarded[(leader, peer)] > 0 for peer in cluster.node_ids if peer != leader)
    assert cluster.client_url(1).startswith("http://127.0.0.1:")


def test_a_follower_forwards_client_requests_over_the_http_proxy(cluster: TestCluster) -> None:
    follower = min(set(cluster.node_ids) - set(cluster.leaders().values()))  # leads no shard

    def forwarded_from_follower() -> int:
        stats = cluster.proxy.stats()
        return sum(
            stats[(follower, peer)]["http"].bytes_forwarded
            for peer in cluster.node_ids
            if peer != follower
        )

    before = forwarded_from_follower()
    request = urllib.request.Request(
        cluster.client_url(follower) + "/v1/kv/proxied", data=b"value", method="PUT"
    )
    with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
        assert response.status in (200, 201, 204)
    assert forwarded_from_follower() > before


def test_partitioning_a_leader_away_elects_a_new_leader_on_the_majority_side(
    cluster: TestCluster,
) -> None:
    shard, old_leader = next(iter(cluster.leaders().items()))
    majority = set(cluster.node_ids) - {old_leader}
    old_term = _poll(lambda: _replica_view(cluster, old_leader, shard), "old leader's view")["term"]
    cluster.partition([{old_leader}, majority])
    assert cluster.blocked_links() == {
        (a, b)
        for a in cluster.node_ids
        for b in cluster.node_ids
        if (a in majority) != (b in majority)
    }
    new_leader = _poll(
        lambda: (leader := cluster.leader_of(shard)) in majority and leader,
        "a new leader on the majority side",
    )
    witness = next(iter(majority - {new_leader}))
    # Not necessarily new_leader: leader balancing may hand it on to the shard's preferred replica.
    view = _poll(
        lambda: (
            (seen := _replica_view(cluster, witness, shard)) and seen["leader"] in majority and seen
        ),
        "the witness to see a leader on the majority side",
    )
    assert view["term"] > old_term
    # The isolated node never got the news: its messages and ours were really dropped.
    isolated = _replica_view(cluster, old_leader, shard)
    assert isolated is not None
    assert isolated["leader"] in (old_leader, 0)
    stats = cluster.proxy.stats()
    assert stats[(old_leader, new_leader)]["raft"].bytes_dropped > 0
    assert stats[(new_leader, old_leader)]["raft"].bytes_dropped > 0
    cluster.heal()
    assert cluster.blocked_links() == set()
    cluster.wait_healthy(DEADLINE_S)
    _poll(
        lambda: (view := _replica_view(cluster, old_leader, shard)) and view["term"] > old_term,
        "the old leader catches up with the new term after the heal",
    )


def test_blocking_only_the_leaders_outbound_links_deposes_it_while_it_still_hears_others(
    cluster: TestCluster,
) -> None:
    shard, old_leader = next(iter(cluster.leaders().items()))
    before = cluster.proxy.stats()  # counters add up over the module's tests
    for peer in cluster.node_ids:
        if peer != old_leader:
            cluster.block_one_way(old_leader, peer)
    others = set(cluster.node_ids) - {old_leader}
    new_leader = _poll(
        lambda: (leader := cluster.leader_of(shard)) in others and leader,
        "the followers elect a leader among themselves",
    )
    # One-way: the new leader's messages still reach the old one, which follows it.
    _poll(
        lambda: (
            (view := _replica_view(cluster, old_leader, shard))
            and view["role"] == "follower"
            and view["leader"] == new_leader
        ),
        "the deposed leader hears the new one",
    )
    after = cluster.proxy.stats()
    inbound, outbound = (new_leader, old_leader), (old_leader, new_leader)
    assert after[inbound]["raft"].bytes_dropped == before[inbound]["raft"].bytes_dropped
    assert after[inbound]["raft"].bytes_forwarded > before[inbound]["raft"].bytes_forwarded
    assert after[outbound]["raft"].bytes_dropped > before[outbound]["raft"].bytes_dropped


def test_a_killed_node_is_gone_until_restarted(cluster: TestCluster) -> None:
    shard, victim = next(iter(cluster.leaders().items()))
    pid = cluster.pid(victim)
    assert pid is not None
    cluster.kill(victim)
    assert not cluster.is_alive(victim)
    assert cluster.pid(victim) is None
    _assert_gone(pid)
    _poll(
        lambda: cluster.leader_of(shard) not in (None, victim),
        "the survivors elect a new leader",
    )
    with pytest.raises(ClusterError, match="not running"):
        cluster.wait_healthy(1.0)
    cluster.restart(victim)
    assert cluster.is_alive(victim)
    assert cluster.pid(victim) != pid
    cluster.wait_healthy(DEADLINE_S)


def test_a_paused_node_is_silent_until_resumed(cluster: TestCluster) -> None:
    shard, victim = next(iter(cluster.leaders().items()))
    cluster.pause(victim)
    assert cluster.is_paused(victim)
    assert cluster.is_alive(victim)
    _poll(
        lambda: cluster.leader_of(shard) not in (None, victim),
        "the others elect a new leader while it sleeps",
    )
    assert cluster.cluster_status(victim, timeout_s=0.5) is None  # stopped: it cannot answer
    cluster.resume(victim)
    assert not cluster.is_paused(victim)
    cluster.wait_healthy(DEADLINE_S)


def test_the_config_routes_every_peer_through_its_proxy_listener(tmp_path: Path) -> None:
    nodes = [NodeSpec(n, 7000 + n, 7100 + n, tmp_path / f"node{n}") for n in (1, 2, 3)]
    routes = {
        2: {"raft": ("127.0.0.1", 9012), "http": ("127.0.0.1", 9112)},
        3: {"raft": ("127.0.0.1", 9013), "http": ("127.0.0.1", 9113)},
    }
    text = node_config_text(
        nodes[0], nodes, routes, shards=4, replication=3, unsafe_stale_reads=True
    )
    config = tomllib.loads(text)
    assert config["node_id"] == 1
    assert config["peer_listen"] == "127.0.0.1:7101"
    assert [n["peer_address"] for n in config["cluster"]["nodes"]] == [
        "127.0.0.1:7101",
        "127.0.0.1:7102",
        "127.0.0.1:7103",
    ]
    assert config["routes"]["2"] == {
        "peer_address": "127.0.0.1:9012",
        "client_url": "http://127.0.0.1:9112",
    }
    assert config["unsafe"] == {"stale_reads": True}
    safe = node_config_text(
        nodes[0], nodes, routes, shards=4, replication=3, unsafe_stale_reads=False
    )
    assert "unsafe" not in tomllib.loads(safe)


def test_an_unsafe_cluster_starts_and_stop_leaves_no_process(tmp_path: Path) -> None:
    test_cluster = TestCluster(
        tmp_path / "c", nodes=3, shards=1, replication=3, unsafe_stale_reads=True
    )
    with test_cluster:
        test_cluster.start()
        pids = [pid for node in test_cluster.node_ids if (pid := test_cluster.pid(node))]
        proxy_pid = test_cluster.proxy.pid
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"--unsafe-test-faults" in cmdline
        test_cluster.pause(2)  # stop() must resume it before SIGTERM, not wait 10 s
    assert len(pids) == 3
    for pid in [*pids, proxy_pid]:
        assert pid is not None
        _assert_gone(pid)
    with pytest.raises(ClusterError, match="stopped"):
        test_cluster.restart(1)
    test_cluster.stop()  # idempotent
