"""Spreads shard leaders over the nodes: each shard's leadership goes back to its preferred
replica (replicas[0]; placement spreads those evenly), which elections alone do not do, so
otherwise one node can end up doing most of the leader work.

It only asks; RaftHost.request_leader_transfer hands over only to a caught-up, live replica.
"""

from __future__ import annotations

import asyncio

from kvstore.meta import MetaStateMachine
from raft.core.types import NodeId
from raft.runtime.host import RaftHost

BALANCE_INTERVAL_S = 2.0


def request_preferred_leaders(node_id: NodeId, host: RaftHost, meta: MetaStateMachine) -> int:
    """Ask, for each shard this node leads but does not prefer, to hand it over. Returns how
    many requests it made."""
    shard_map = meta.shard_map
    if shard_map is None:
        return 0
    asked = 0
    for shard in shard_map.shards:
        preferred = shard.replicas[0]
        if preferred != node_id and host.has_group(shard.id) and host.is_leader(shard.id):
            host.request_leader_transfer(shard.id, preferred)
            asked += 1
    return asked


async def balance_leaders_forever(node_id: NodeId, host: RaftHost, meta: MetaStateMachine) -> None:
    while True:
        await asyncio.sleep(BALANCE_INTERVAL_S)
        request_preferred_leaders(node_id, host, meta)
