"""Pure: the next map changes that bring placement closer to the goal, given the current map.

Goal, in priority order: (1) no replica on a node that is draining or down (re-replication);
(2) shard replicas even across active nodes, max - min <= 1; (3) preferred leaders even the
same way. Moves are few: only a replica on an overloaded (or leaving) node moves, always to
the least loaded node, so adding one node to N moves about 1/(N+1) of the replicas.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from kvstore.map_changes import MapChange, SetPreferredLeader, StartMove, apply_change
from kvstore.sharding import META_GROUP_ID, NodeInfo, ShardMap, initial_shard_map
from raft.core.types import NO_NODE, NodeId, node_of


def plan_changes(shard_map: ShardMap, *, max_moves: int) -> list[MapChange]:
    """At most `max_moves` moves in flight in all (counting those already in the map); at
    most one per group. Returns [] when placement is at the goal (or cannot get closer)."""
    active = sorted(node.id for node in shard_map.nodes if node.is_active)
    if not active:
        return []
    budget = max_moves - len(shard_map.moves)
    changes: list[MapChange] = []
    busy = {move.group for move in shard_map.moves} | {split.shard for split in shard_map.splits}
    load = _replica_load(shard_map, active)
    hosts = {group: _hosts(shard_map, group) for group in shard_map.group_ids()}

    def start(group: int, leaving: NodeId, target: NodeId) -> None:
        changes.append(StartMove(group, leaving, target))
        busy.add(group)
        hosts[group].discard(node_of(leaving))
        hosts[group].add(target)
        if group != META_GROUP_ID and target != NO_NODE:
            load[target] += 1
            if node_of(leaving) in load:
                load[node_of(leaving)] -= 1

    # (1) evacuate draining and down nodes, the meta group first: it must stay writable
    for group in shard_map.group_ids():
        if budget <= len(changes) or group in busy:
            continue
        for replica in shard_map.group(group).replicas:
            if node_of(replica) in load:
                continue
            candidates = [node for node in active if node not in hosts[group]]
            if candidates:
                start(group, replica, min(candidates, key=lambda node: (load[node], node)))
            elif group == META_GROUP_ID and shard_map.node(node_of(replica)).draining:
                start(group, replica, NO_NODE)  # every node holds meta: shrink it instead
            break
    # (2) even out shard replicas
    while len(changes) < budget:
        most = max(active, key=lambda node: (load[node], -node))
        least = min(active, key=lambda node: (load[node], node))
        if load[most] - load[least] <= 1:
            break
        movable = [
            shard
            for shard in shard_map.shards
            if shard.id not in busy and most in hosts[shard.id] and least not in hosts[shard.id]
        ]
        if not movable:
            break
        shard = movable[0]
        leaving = next(r for r in shard.replicas if node_of(r) == most)
        start(shard.id, leaving, least)
    if changes or shard_map.moves:
        return changes  # leaders are evened out once replicas have settled
    return _even_leaders(shard_map, active)


def founding_shard_map(nodes: list[NodeInfo], shard_count: int, replication: int) -> ShardMap:
    """The map a new cluster starts from: initial_shard_map (replicas already even) with its
    preferred leaders evened out as the balancer would, so a new cluster has nothing to move
    or hand over. Deterministic: every founding node computes the same map, at epoch 1."""
    shard_map = initial_shard_map(nodes, shard_count, replication)
    active = sorted(node.id for node in nodes)
    for _ in range(shard_count):  # each round evens a pair of nodes; few rounds suffice
        changes = _even_leaders(shard_map, active)
        if not changes:
            break
        for change in changes:
            shard_map = apply_change(shard_map, change)
    return replace(shard_map, epoch=1)


def _replica_load(shard_map: ShardMap, active: list[NodeId]) -> Counter[NodeId]:
    """Shard replicas per active node, counting a move's joiner instead of its leaver."""
    load: Counter[NodeId] = Counter(dict.fromkeys(active, 0))
    for shard in shard_map.shards:
        for node in _hosts(shard_map, shard.id):
            if node in load:
                load[node] += 1
    return load


def _hosts(shard_map: ShardMap, group: int) -> set[NodeId]:
    nodes = {node_of(replica) for replica in shard_map.group(group).replicas}
    move = shard_map.move_of(group)
    if move is not None:
        nodes.discard(node_of(move.leaving))
        if move.joining != NO_NODE:
            nodes.add(node_of(move.joining))
    return nodes


def _even_leaders(shard_map: ShardMap, active: list[NodeId]) -> list[MapChange]:
    leads: Counter[NodeId] = Counter(dict.fromkeys(active, 0))
    preferred = {shard.id: node_of(shard.replicas[0]) for shard in shard_map.shards}
    for node in preferred.values():
        if node in leads:
            leads[node] += 1
    changes: list[MapChange] = []
    changed: set[int] = set()

    def prefer(shard_id: int, replica: NodeId) -> None:
        old = preferred[shard_id]
        if old in leads:
            leads[old] -= 1
        preferred[shard_id] = node_of(replica)
        leads[node_of(replica)] += 1
        changes.append(SetPreferredLeader(shard_id, replica))
        changed.add(shard_id)

    for shard in shard_map.shards:
        if preferred[shard.id] not in leads:  # preferred on a node that cannot lead now
            options = [r for r in shard.replicas if node_of(r) in leads]
            if options:
                prefer(shard.id, min(options, key=lambda r: (leads[node_of(r)], r)))
    for _ in range(len(shard_map.shards)):
        most = max(active, key=lambda node: (leads[node], -node))
        path = _leader_path(shard_map, preferred, leads, changed, most)
        if path is None:
            break
        for shard_id, replica in path:  # each node on the way gives one lead, takes one
            prefer(shard_id, replica)
    return changes


def _leader_path(
    shard_map: ShardMap,
    preferred: dict[int, NodeId],
    leads: Counter[NodeId],
    changed: set[int],
    most: NodeId,
) -> list[tuple[int, NodeId]] | None:
    """Breadth-first from the node leading most, along "shard led by u has a replica on v",
    to a node leading at least two fewer: handing each shard on the path to the next node
    evens the two ends and leaves the nodes between unchanged. None: already even."""
    came_from: dict[NodeId, tuple[NodeId, int, NodeId]] = {}
    frontier, seen = [most], {most}
    while frontier:
        next_frontier = []
        for node in frontier:
            for shard in shard_map.shards:
                if preferred[shard.id] != node or shard.id in changed:
                    continue
                for replica in shard.replicas:
                    target = node_of(replica)
                    if target in seen or target not in leads:
                        continue
                    seen.add(target)
                    came_from[target] = (node, shard.id, replica)
                    if leads[target] <= leads[most] - 2:
                        path = []
                        while target != most:
                            source, shard_id, via = came_from[target]
                            path.append((shard_id, via))
                            target = source
                        return path[::-1]
                    next_frontier.append(target)
        frontier = next_frontier
    return None
