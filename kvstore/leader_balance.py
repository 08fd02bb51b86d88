"""Spreads shard leaders over the nodes: each shard's leadership goes back to its preferred
replica (replicas[0]; placement spreads those evenly), which elections alone do not do, so
otherwise one node can end up doing most of the leader work.

It only asks; RaftHost.request_leader_transfer hands over only to a caught-up, live replica.
A target can still refuse silently (a quarantined replica never campaigns), and a transfer in
progress refuses proposals for up to an election timeout, so a shard whose hand-off did not
happen is asked again only after a doubling back-off: a refusing target costs one short stall
per back-off period, not one every round.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from kvstore.sharding import ShardMap
from raft.core.types import NodeId

BALANCE_INTERVAL_S = 2.0
FREE_RETRIES = 3  # a target still catching up after a restart is asked every round at first
MAX_BACKOFF_ROUNDS = 128  # then rounds skipped double, to about 4 minutes between attempts


class ShardMapView(Protocol):
    """Where the current shard map is read (kvstore.meta.MetaStateMachine)."""

    @property
    def shard_map(self) -> ShardMap | None: ...


class LeaderHost(Protocol):
    """What leader balancing needs of raft.runtime.host.RaftHost."""

    def has_group(self, group_id: int) -> bool: ...

    def is_leader(self, group_id: int) -> bool: ...

    def request_leader_transfer(self, group_id: int, target: NodeId) -> None: ...


@dataclass
class _Attempt:
    target: NodeId
    failures: int = 0  # rounds we still led the shard after asking
    wait_rounds: int = 0


@dataclass
class LeaderBalancer:
    node_id: NodeId
    host: LeaderHost
    meta: ShardMapView
    _attempts: dict[int, _Attempt] = field(default_factory=dict)  # shard -> last hand-off asked

    def round(self) -> int:
        """Ask, for each shard this node leads but does not prefer, to hand it over (unless it
        is backing off). Returns how many requests it made."""
        shard_map = self.meta.shard_map
        if shard_map is None:
            return 0
        asked = 0
        leading: set[int] = set()
        for shard in shard_map.shards:
            preferred = shard.replicas[0]
            host = self.host
            if preferred == self.node_id or not host.has_group(shard.id):
                continue
            if not host.is_leader(shard.id):
                continue
            leading.add(shard.id)
            attempt = self._attempts.get(shard.id)
            if attempt is None or attempt.target != preferred:
                self._attempts[shard.id] = _Attempt(preferred)
            elif attempt.wait_rounds > 0:
                attempt.wait_rounds -= 1
                continue
            else:  # we asked last time and still lead: that hand-off did not happen
                attempt.failures += 1
                if attempt.failures >= FREE_RETRIES:
                    exponent = min(attempt.failures - FREE_RETRIES + 1, 7)
                    attempt.wait_rounds = min(2**exponent, MAX_BACKOFF_ROUNDS)
            host.request_leader_transfer(shard.id, preferred)
            asked += 1
        for shard_id in set(self._attempts) - leading:  # handed over, or no longer ours
            del self._attempts[shard_id]
        return asked

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(BALANCE_INTERVAL_S)
            self.round()
