"""The nemesis: faults on a timeline planned from a seed (plan_faults, pure), applied to a real
TestCluster and reverted on schedule (Nemesis). Fault windows never overlap, a recovery gap
follows each, and the last seconds of a run are fault-free, so every run ends healed. Whatever
happens, including cancellation, the nemesis leaves every node running and every link open.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from jepsen_like.cluster import TestCluster

KINDS: Final = frozenset({"kill", "pause", "partition"})
PARTITION_VARIANTS: Final = ("halves", "isolate-leader", "ring", "one-way")
FAULT_MIN_S: Final = 2.0
FAULT_MAX_S: Final = 6.0
GAP_MIN_S: Final = 2.0
GAP_MAX_S: Final = 5.0
FIRST_FAULT_MIN_S: Final = 1.0  # let clients warm up on a healthy cluster
FIRST_FAULT_MAX_S: Final = 3.0
QUIET_TAIL_S: Final = 5.0  # no fault in the run's last seconds: it ends healed


@dataclass(frozen=True)
class FaultEvent:
    start_s: float  # seconds after Nemesis.run starts
    end_s: float
    kind: str  # "kill" | "pause" | "partition"
    detail: dict[str, Any]  # what to do; anything decided by the cluster's state is resolved late


@dataclass(slots=True)
class AppliedFault:
    kind: str
    detail: dict[str, Any]  # the event's detail plus what was resolved when applied
    started_ns: int  # time.monotonic_ns(), like the history's op times
    ended_ns: int | None = None  # None while the fault lasts


Pair = tuple[int, int]


# ---------------------------------------------------------------------------- the plan (pure)


def plan_faults(
    rng: random.Random, duration_s: float, kinds: set[str], node_ids: list[int]
) -> list[FaultEvent]:
    """Fault windows of FAULT_MIN_S..FAULT_MAX_S, each followed by a GAP_MIN_S..GAP_MAX_S
    recovery gap, none in the last QUIET_TAIL_S. Deterministic for a seed: every choice that
    does not depend on the cluster's state is made here. "none" in kinds is ignored."""
    unknown = set(kinds) - KINDS - {"none"}
    if unknown:
        raise ValueError(f"unknown nemesis kinds {sorted(unknown)}; known: {sorted(KINDS)}")
    nodes = sorted(node_ids)
    usable = sorted(kind for kind in kinds if kind in KINDS)
    if len(nodes) < 2:
        usable = [kind for kind in usable if kind != "partition"]
    events: list[FaultEvent] = []
    if not usable or not nodes:
        return events
    last_end_s = duration_s - QUIET_TAIL_S
    start_s = rng.uniform(FIRST_FAULT_MIN_S, FIRST_FAULT_MAX_S)
    while start_s + FAULT_MIN_S <= last_end_s:
        end_s = min(start_s + rng.uniform(FAULT_MIN_S, FAULT_MAX_S), last_end_s)
        kind = rng.choice(usable)
        events.append(FaultEvent(start_s, end_s, kind, _plan_detail(rng, kind, nodes)))
        start_s = end_s + rng.uniform(GAP_MIN_S, GAP_MAX_S)
    return events


def _plan_detail(rng: random.Random, kind: str, nodes: list[int]) -> dict[str, Any]:
    if kind in ("kill", "pause"):
        minority = max(1, (len(nodes) - 1) // 2)
        return {"nodes": sorted(rng.sample(nodes, rng.randint(1, minority)))}
    variant = rng.choice(PARTITION_VARIANTS)
    if variant == "ring" and len(nodes) < 3:
        variant = "halves"  # two nodes have no ring
    if variant == "halves":
        shuffled = rng.sample(nodes, len(nodes))
        cut = len(nodes) // 2
        return {"variant": variant, "groups": [sorted(shuffled[:cut]), sorted(shuffled[cut:])]}
    if variant == "isolate-leader":
        return {"variant": variant, "shard_pick": rng.random()}  # the leader is known only then
    if variant == "ring":
        order = rng.sample(nodes, len(nodes))
        return {"variant": variant, "order": order, "links": _ring_links(order)}
    if rng.random() < 0.5:
        src, dst = rng.sample(nodes, 2)
        return {"variant": variant, "mode": "pair", "links": [[src, dst]]}
    return {"variant": variant, "mode": "leader-outbound", "shard_pick": rng.random()}


def _ring_links(order: list[int]) -> list[list[int]]:
    """Majorities ring: nodes in `order` on a ring, each link cut (both ways) between nodes
    farther apart than the reach that gives each node a majority counting itself. So every
    node sees a majority and no two see the same one. Three nodes have no such ring (their
    neighbours are everyone): they get the bridge instead, the middle node of `order` seeing
    both ends, which cannot see each other."""
    count = len(order)
    if count == 3:
        first, _, last = order
        return sorted([[first, last], [last, first]])
    reach = (count // 2 + 1) // 2
    links = []
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            if min(abs(i - j), count - abs(i - j)) > reach:
                links.append([a, b])
    return sorted(links)


# ---------------------------------------------------------------------------- applying it


class Nemesis:
    """Applies each event at its start and reverts it at its end; records what it did."""

    def __init__(
        self,
        cluster: TestCluster,
        events: Iterable[FaultEvent],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.events = sorted(events, key=lambda event: event.start_s)
        for earlier, later in zip(self.events, self.events[1:], strict=False):
            if later.start_s < earlier.end_s:
                raise ValueError(f"fault windows overlap: {earlier} and {later}")
        self.applied: list[AppliedFault] = []
        self._clock = clock
        # Serialises applying, reverting and healing: a cancelled run heals only after an
        # apply already running in a worker thread has finished, and none starts after that.
        self._lock = threading.Lock()
        self._open: list[AppliedFault] = []
        self._is_closed = False

    async def run(self, stop: asyncio.Event) -> None:
        """Runs the timeline until it ends or `stop` is set; an active fault is then reverted
        at once. On cancellation (or any error) it heals everything before returning."""
        origin = self._clock()
        try:
            for event in self.events:
                if not await self._wait_until(origin + event.start_s, stop):
                    break
                fault = await asyncio.to_thread(self._apply, event)
                if fault is None:
                    break
                await self._wait_until(origin + event.end_s, stop)
                await asyncio.to_thread(self._revert, fault)
        finally:
            # shield: a second cancel must not abandon the heal half done (the thread goes on).
            await asyncio.shield(asyncio.to_thread(self._close))

    def heal_all(self) -> None:
        """Resumes paused nodes, restarts dead ones, opens every link; closes open faults.
        Blocking; safe to call from any thread, any number of times."""
        with self._lock:
            self._heal_locked()

    # -- internals (worker threads) --
    async def _wait_until(self, deadline: float, stop: asyncio.Event) -> bool:
        """False if `stop` was set before the deadline."""
        remaining_s = deadline - self._clock()
        if stop.is_set():
            return False
        if remaining_s <= 0:
            return True
        try:
            await asyncio.wait_for(stop.wait(), timeout=remaining_s)
        except TimeoutError:
            return True
        return False

    def _apply(self, event: FaultEvent) -> AppliedFault | None:
        with self._lock:
            if self._is_closed:
                return None
            fault = AppliedFault(event.kind, dict(event.detail), time.monotonic_ns())
            self.applied.append(fault)
            self._open.append(fault)  # before acting: a failure half way is healed too
            cluster = self.cluster
            if event.kind == "kill":
                for node in event.detail["nodes"]:
                    cluster.kill(node)
            elif event.kind == "pause":
                paused = [node for node in event.detail["nodes"] if cluster.is_alive(node)]
                for node in paused:
                    cluster.pause(node)
                fault.detail["paused"] = paused
            elif event.kind == "partition":
                blocked = self._partition(event.detail, fault.detail)
                fault.detail["blocked"] = sorted([list(pair) for pair in blocked])
            else:
                raise ValueError(f"unknown fault kind {event.kind!r}")
            return fault

    def _partition(self, planned: dict[str, Any], resolved: dict[str, Any]) -> set[Pair]:
        cluster = self.cluster
        nodes = cluster.node_ids
        variant = planned["variant"]
        if variant == "halves":
            cluster.partition([set(group) for group in planned["groups"]])
        elif variant == "isolate-leader":
            leader = self._resolve_leader(planned["shard_pick"], resolved)
            resolved["groups"] = [[leader], sorted(set(nodes) - {leader})]
            cluster.partition([{leader}, set(nodes) - {leader}])
        elif variant == "ring" or (variant == "one-way" and planned["mode"] == "pair"):
            cluster.set_blocked({(int(src), int(dst)) for src, dst in planned["links"]})
        elif variant == "one-way":
            leader = self._resolve_leader(planned["shard_pick"], resolved)
            cluster.set_blocked({(leader, other) for other in nodes if other != leader})
        else:
            raise ValueError(f"unknown partition variant {variant!r}")
        return cluster.blocked_links()

    def _resolve_leader(self, pick: float, resolved: dict[str, Any]) -> int:
        """The leader of the shard `pick` selects, as the cluster says now. Without a known
        leader the pick selects a node instead, so the fault still happens."""
        leaders = self.cluster.leaders()
        nodes = self.cluster.node_ids
        if leaders:
            shards = sorted(leaders)
            shard = shards[min(int(pick * len(shards)), len(shards) - 1)]
            resolved["shard"] = shard
            resolved["leader"] = leaders[shard]
            return leaders[shard]
        resolved["shard"] = None
        resolved["leader"] = None
        return nodes[min(int(pick * len(nodes)), len(nodes) - 1)]

    def _revert(self, fault: AppliedFault) -> None:
        with self._lock:
            if fault not in self._open:
                return  # healed meanwhile
            cluster = self.cluster
            if fault.kind == "kill":
                for node in fault.detail["nodes"]:
                    if not cluster.is_alive(node):
                        cluster.restart(node)
            elif fault.kind == "pause":
                for node in fault.detail["nodes"]:
                    cluster.resume(node)
            else:
                cluster.heal()
            self._end(fault)

    def _close(self) -> None:
        with self._lock:
            self._is_closed = True
            self._heal_locked()

    def _heal_locked(self) -> None:
        cluster = self.cluster
        if cluster.is_stopped:  # torn down under us (the run failed): nothing left to heal
            for fault in list(self._open):
                self._end(fault)
            return
        for node in cluster.node_ids:
            if cluster.is_paused(node):
                cluster.resume(node)
        for node in cluster.node_ids:
            if not cluster.is_alive(node):
                cluster.restart(node)
        cluster.heal()
        for fault in list(self._open):
            self._end(fault)

    def _end(self, fault: AppliedFault) -> None:
        fault.ended_ns = time.monotonic_ns()
        self._open.remove(fault)
