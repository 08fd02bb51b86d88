"""The nemesis: a seeded plan (pure, property-tested) and its application to a real cluster,
which must end healed whether the run finishes, is stopped or is cancelled."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jepsen_like.cluster import TestCluster
from jepsen_like.nemesis import (
    FAULT_MAX_S,
    FAULT_MIN_S,
    FIRST_FAULT_MIN_S,
    GAP_MIN_S,
    KINDS,
    QUIET_TAIL_S,
    FaultEvent,
    Nemesis,
    plan_faults,
)

DEADLINE_S = 30.0
T = TypeVar("T")


# ---------------------------------------------------------------------------- the plan


def test_plan_faults_is_deterministic_for_a_seed() -> None:
    def plan(seed: int) -> list[FaultEvent]:
        return plan_faults(random.Random(seed), 120.0, set(KINDS), [1, 2, 3, 4, 5])

    assert plan(7) == plan(7)
    assert len({repr(plan(seed)) for seed in range(5)}) == 5
    assert {event.kind for event in plan(7)} <= KINDS


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    duration_s=st.floats(0.0, 400.0),
    kinds=st.sets(st.sampled_from(sorted(KINDS)), min_size=1),
    node_count=st.integers(1, 7),
)
def test_planned_windows_never_overlap_and_the_last_seconds_are_fault_free(
    seed: int, duration_s: float, kinds: set[str], node_count: int
) -> None:
    nodes = list(range(1, node_count + 1))
    events = plan_faults(random.Random(seed), duration_s, kinds, nodes)
    previous_end_s = None
    for event in events:
        assert event.kind in kinds
        assert event.start_s >= FIRST_FAULT_MIN_S
        assert FAULT_MIN_S <= event.end_s - event.start_s <= FAULT_MAX_S
        assert event.end_s <= duration_s - QUIET_TAIL_S
        if previous_end_s is not None:
            assert event.start_s - previous_end_s >= GAP_MIN_S
        previous_end_s = event.end_s
        detail = event.detail
        if event.kind in ("kill", "pause"):
            assert set(detail["nodes"]) <= set(nodes)
            assert 1 <= len(detail["nodes"]) <= max(1, (node_count - 1) // 2)
        else:
            assert node_count >= 2
            if detail["variant"] == "halves":
                assert sorted(detail["groups"][0] + detail["groups"][1]) == nodes
                assert all(detail["groups"])
            elif detail["variant"] == "ring":
                cut = {tuple(link) for link in detail["links"]}
                assert cut
                for node in nodes:  # every node still hears a majority, itself included
                    hears = [other for other in nodes if (other, node) not in cut]
                    assert len(hears) > node_count // 2
            elif "links" in detail:
                assert all(src != dst for src, dst in detail["links"])


def test_a_run_too_short_for_a_fault_gets_none_and_unknown_kinds_are_refused() -> None:
    assert plan_faults(random.Random(1), QUIET_TAIL_S + 2.0, {"kill"}, [1, 2, 3]) == []
    assert plan_faults(random.Random(1), 60.0, {"partition"}, [1]) == []
    assert plan_faults(random.Random(1), 60.0, {"none"}, [1, 2, 3]) == []
    with pytest.raises(ValueError, match="unknown nemesis kinds"):
        plan_faults(random.Random(1), 60.0, {"flood"}, [1, 2, 3])


# ---------------------------------------------------------------------------- on a cluster


def _poll(probe: Callable[[], T | None], what: str, deadline_s: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        time.sleep(0.05)


async def _apoll(probe: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        await asyncio.sleep(0.02)


def _assert_all_healed(healthy_cluster: TestCluster) -> None:
    cluster = healthy_cluster
    assert all(cluster.is_alive(node) for node in cluster.node_ids)
    assert not any(cluster.is_paused(node) for node in cluster.node_ids)
    assert cluster.blocked_links() == set()
    assert cluster.proxy.blocked() == set()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    with TestCluster(
        tmp_path_factory.mktemp("jepsen_nemesis") / "c", nodes=3, shards=2, replication=3
    ) as test_cluster:
        test_cluster.start()
        yield test_cluster


@pytest.fixture
def healthy_cluster(cluster: TestCluster) -> TestCluster:
    """The module's cluster, healed and healthy whatever the previous test left."""
    Nemesis(cluster, []).heal_all()
    cluster.wait_healthy(DEADLINE_S)
    return cluster


@pytest.mark.e2e
async def test_a_run_applies_and_reverts_each_fault_on_schedule(
    healthy_cluster: TestCluster,
) -> None:
    cluster = healthy_cluster
    events = [
        FaultEvent(0.1, 1.1, "kill", {"nodes": [3]}),
        FaultEvent(1.5, 2.5, "pause", {"nodes": [2]}),
        FaultEvent(2.9, 3.9, "partition", {"variant": "isolate-leader", "shard_pick": 0.0}),
        FaultEvent(
            4.3,
            5.3,
            "partition",
            {"variant": "ring", "order": [1, 2, 3], "links": [[1, 3], [3, 1]]},
        ),
    ]
    nemesis = Nemesis(cluster, events)
    seen: set[str] = set()
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            if not cluster.is_alive(3):
                seen.add("3 dead")
            if cluster.is_paused(2):
                seen.add("2 paused")
            if cluster.blocked_links() == {(1, 3), (3, 1)}:
                seen.add("ring")
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    await asyncio.wait_for(nemesis.run(stop), timeout=DEADLINE_S)
    stop.set()
    await watcher
    assert time.monotonic() - started >= 5.3
    assert seen == {"3 dead", "2 paused", "ring"}
    assert [fault.kind for fault in nemesis.applied] == ["kill", "pause", "partition", "partition"]
    for earlier, later in zip(nemesis.applied, nemesis.applied[1:], strict=False):
        assert earlier.ended_ns is not None
        assert earlier.started_ns < earlier.ended_ns < later.started_ns
    isolated = nemesis.applied[2].detail
    leader = isolated["leader"]
    assert leader in cluster.node_ids
    assert isolated["shard"] is not None
    assert sorted(map(tuple, isolated["blocked"])) == sorted(
        pair
        for other in cluster.node_ids
        if other != leader
        for pair in [(leader, other), (other, leader)]
    )
    _assert_all_healed(cluster)
    await asyncio.to_thread(cluster.wait_healthy, DEADLINE_S)


@pytest.mark.e2e
async def test_setting_stop_reverts_the_current_fault_at_once(healthy_cluster: TestCluster) -> None:
    cluster = healthy_cluster
    nemesis = Nemesis(cluster, [FaultEvent(0.0, 600.0, "pause", {"nodes": [2]})])
    stop = asyncio.Event()
    run = asyncio.create_task(nemesis.run(stop))
    await _apoll(lambda: cluster.is_paused(2), "node 2 paused")
    stop.set()
    await asyncio.wait_for(run, timeout=DEADLINE_S)
    assert nemesis.applied[0].ended_ns is not None
    _assert_all_healed(cluster)


@pytest.mark.e2e
async def test_a_cancelled_run_leaves_the_cluster_healed(healthy_cluster: TestCluster) -> None:
    cluster = healthy_cluster
    events = [FaultEvent(0.0, 600.0, "partition", {"variant": "halves", "groups": [[1], [2, 3]]})]
    nemesis = Nemesis(cluster, events)
    run = asyncio.create_task(nemesis.run(asyncio.Event()))
    await _apoll(lambda: bool(cluster.blocked_links()), "the partition is applied")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, timeout=DEADLINE_S)
    assert nemesis.applied[0].ended_ns is not None
    _assert_all_healed(cluster)


@pytest.mark.e2e
def test_heal_all_restarts_resumes_and_reconnects_everything(healthy_cluster: TestCluster) -> None:
    cluster = healthy_cluster
    cluster.kill(1)
    cluster.pause(2)
    cluster.block_one_way(3, 1)
    Nemesis(cluster, []).heal_all()
    _assert_all_healed(cluster)
    cluster.wait_healthy(DEADLINE_S)
    _poll(lambda: len(cluster.leaders()) == 2, "every shard has a leader")


def test_overlapping_fault_windows_are_refused(tmp_path) -> None:
    unstarted = TestCluster(tmp_path / "c", nodes=3, shards=1, replication=3)
    events = [
        FaultEvent(0.0, 3.0, "kill", {"nodes": [1]}),
        FaultEvent(2.0, 4.0, "pause", {"nodes": [2]}),
    ]
    with pytest.raises(ValueError, match="overlap"):
        Nemesis(unstarted, events)
