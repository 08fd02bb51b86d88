"""Reconciler: runs on the meta group's leader only. Each round it compares the cluster with
the shard map and proposes the map changes that close the gap, one small change at a time:

- liveness: a node that has not answered for `down_after_s` is marked down (its replicas are
  then re-created elsewhere); one that answers again is marked up;
- a draining node that hosts nothing any more is removed from the map;
- the balancer's next moves and preferred leaders (kvstore.balancer);
- a split of a shard whose replicas report more than `split_keys` keys (0: never), one at a
  time cluster-wide.

It keeps nothing durable: a new meta leader starts over from the map (and, conservatively,
counts every node as last seen when it took over), so it resumes after any crash.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kvstore.balancer import plan_changes
from kvstore.map_changes import MapChange, RemoveNode, SetNodeDown, StartSplit
from kvstore.moves import propose_map_change
from kvstore.router import Router
from kvstore.sharding import META_GROUP_ID, ShardMap
from raft.core.types import NodeId, node_of
from raft.runtime.host import RaftHost

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        host: RaftHost,
        router: Router,
        *,
        down_after_s: float,
        max_moves: int,
        split_keys: int = 0,
    ) -> None:
        self._host = host
        self._router = router
        self._down_after_s = down_after_s
        self._max_moves = max_moves
        self._split_keys = split_keys
        self._leader_since: float | None = None
        self._last_seen: dict[NodeId, float] = {}

    def _is_meta_leader(self) -> bool:
        host = self._host
        return host.has_group(META_GROUP_ID) and host.is_leader(META_GROUP_ID)

    async def run_once(self, shard_map: ShardMap) -> None:
        if not self._is_meta_leader():
            self._leader_since = None
            return
        now = time.monotonic()
        if self._leader_since is None:
            self._leader_since = now
            self._last_seen.clear()
        statuses = await self._router.node_statuses(shard_map)
        for change in self._liveness_changes(shard_map, statuses, now):
            await propose_map_change(self._router, change)
        for change in plan_splits(shard_map, statuses, self._split_keys):
            log.info("automatic split: %s", change)
            await propose_map_change(self._router, change)
        for change in self._removals(shard_map):
            await propose_map_change(self._router, change)
        for change in plan_changes(shard_map, max_moves=self._max_moves):
            if not self._is_meta_leader():
                return
            log.info("balancer: %s", change)
            await propose_map_change(self._router, change)

    def _liveness_changes(
        self, shard_map: ShardMap, statuses: dict[NodeId, dict[str, Any] | None], now: float
    ) -> list[MapChange]:
        changes: list[MapChange] = []
        for node in shard_map.nodes:
            if statuses.get(node.id) is not None:
                self._last_seen[node.id] = now
            assert self._leader_since is not None
            silent_s = now - self._last_seen.get(node.id, self._leader_since)
            is_down = silent_s > self._down_after_s
            if is_down != node.down:
                log.warning("node %d is %s", node.id, "down" if is_down else "up again")
                changes.append(SetNodeDown(node.id, is_down))
        return changes

    def _removals(self, shard_map: ShardMap) -> list[MapChange]:
        return [
            RemoveNode(node.id)
            for node in shard_map.nodes
            if node.draining
            and not shard_map.replicas_on(node.id)
            and not any(node_of(move.leaving) == node.id for move in shard_map.moves)
        ]


def plan_splits(
    shard_map: ShardMap, statuses: dict[NodeId, dict[str, Any] | None], split_keys: int
) -> list[MapChange]:
    """At most one StartSplit, at the middle token of the shard whose replicas report the
    most keys above `split_keys`, when no split or move is in progress (0: never split)."""
    if split_keys <= 0 or shard_map.splits or shard_map.moves:
        return []
    key_counts: dict[int, int] = {}
    for status in statuses.values():
        for group, facts in (status or {}).get("groups", {}).items():
            count = facts.get("key_count")
            if isinstance(count, int):
                key_counts[int(group)] = max(key_counts.get(int(group), 0), count)
    over = [s for s in shard_map.shards if key_counts.get(s.id, 0) > split_keys]
    if not over:
        return []
    shard = max(over, key=lambda s: key_counts[s.id])
    if shard.end_token - shard.start_token < 2:
        return []  # one token wide: nothing to cut
    return [StartSplit(shard.id, (shard.start_token + shard.end_token) // 2)]
