"""Pure: the changes the meta group applies to the shard map, and their wire codec.

Each change is applied deterministically to the map in force when it commits, and is refused
(the map stays as it is) when its precondition no longer holds: so a reconciler may propose a
change twice, or after a crash, and nothing breaks. Every accepted change bumps the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import msgpack

from kvstore.sharding import META_GROUP_ID, Move, NodeInfo, ShardMap, ShardSpec, Split
from raft.core.types import NO_NODE, NodeId, node_of


class ChangeRefused(Exception):
    """The change's precondition does not hold in the current map; the map is unchanged."""


@dataclass(frozen=True, slots=True)
class AddNode:
    node: NodeInfo


@dataclass(frozen=True, slots=True)
class DrainNode:
    node_id: NodeId


@dataclass(frozen=True, slots=True)
class SetNodeDown:
    """The meta leader's liveness verdict: a down node's replicas are re-created elsewhere."""

    node_id: NodeId
    down: bool


@dataclass(frozen=True, slots=True)
class RemoveNode:
    """Forget a drained node: only once it hosts no replica and takes part in no move."""

    node_id: NodeId


@dataclass(frozen=True, slots=True)
class StartMove:
    group: int
    leaving: NodeId  # replica id
    # The node that gets a new replica id; NO_NODE (meta group only, when every node already
    # holds it): just remove `leaving`, shrinking the group.
    joining_node: NodeId


@dataclass(frozen=True, slots=True)
class FinishMove:
    """The group's Raft membership now has `joining` and not `leaving`: record it."""

    move: Move


@dataclass(frozen=True, slots=True)
class AbortMove:
    """The joiner is gone from the group's membership (never promoted): drop the move."""

    move: Move


@dataclass(frozen=True, slots=True)
class SetPreferredLeader:
    group: int
    replica: NodeId


@dataclass(frozen=True, slots=True)
class StartSplit:
    """Begin cutting `shard` at `split_token`; the child's id is the next unused shard id."""

    shard: int
    split_token: int


@dataclass(frozen=True, slots=True)
class FinishSplit:
    """Every replica of the parent applied its SplitShard: the child joins the map."""

    split: Split


MapChange = (
    AddNode
    | DrainNode
    | SetNodeDown
    | RemoveNode
    | StartMove
    | FinishMove
    | AbortMove
    | SetPreferredLeader
    | StartSplit
    | FinishSplit
)


def apply_change(shard_map: ShardMap, change: MapChange) -> ShardMap:
    """The map after `change`, at the next epoch. Raises ChangeRefused."""
    return replace(_changed(shard_map, change), epoch=shard_map.epoch + 1)


def _changed(shard_map: ShardMap, change: MapChange) -> ShardMap:
    match change:
        case AddNode(node):
            if shard_map.has_node(node.id):
                raise ChangeRefused(f"node {node.id} is already in the cluster")
            nodes = tuple(sorted((*shard_map.nodes, node), key=lambda n: n.id))
            return replace(shard_map, nodes=nodes)
        case DrainNode(node_id):
            info = shard_map.node(node_id) if shard_map.has_node(node_id) else None
            if info is None or info.draining:
                raise ChangeRefused(f"node {node_id} is not an active member")
            if all(n.draining or n.id == node_id for n in shard_map.nodes):
                raise ChangeRefused("cannot remove the last active node")
            nodes = tuple(
                replace(n, draining=True) if n.id == node_id else n for n in shard_map.nodes
            )
            return replace(shard_map, nodes=nodes)
        case SetNodeDown(node_id, down):
            if not shard_map.has_node(node_id) or shard_map.node(node_id).down == down:
                raise ChangeRefused(f"node {node_id} is already marked {down=}")
            nodes = tuple(replace(n, down=down) if n.id == node_id else n for n in shard_map.nodes)
            return replace(shard_map, nodes=nodes)
        case RemoveNode(node_id):
            if not shard_map.has_node(node_id) or not shard_map.node(node_id).draining:
                raise ChangeRefused(f"node {node_id} is not draining")
            if shard_map.replicas_on(node_id) or any(
                node_of(m.leaving) == node_id for m in shard_map.moves
            ):
                raise ChangeRefused(f"node {node_id} still hosts replicas")
            return replace(shard_map, nodes=tuple(n for n in shard_map.nodes if n.id != node_id))
        case StartMove(group, leaving, joining_node):
            replicas = shard_map.group(group).replicas
            if shard_map.move_of(group) is not None:
                raise ChangeRefused(f"group {group} already has a move in progress")
            if shard_map.split_of(group) is not None:
                raise ChangeRefused(f"shard {group} is being split")
            if leaving not in replicas:
                raise ChangeRefused(f"replica {leaving} is not in group {group}")
            if joining_node == NO_NODE and group == META_GROUP_ID and len(replicas) > 1:
                return replace(shard_map, moves=(*shard_map.moves, Move(group, leaving, NO_NODE)))
            if not shard_map.has_node(joining_node) or not shard_map.node(joining_node).is_active:
                raise ChangeRefused(f"node {joining_node} is not an active member")
            if any(node_of(r) == joining_node for r in replicas):
                raise ChangeRefused(f"node {joining_node} already hosts group {group}")
            move = Move(group, leaving, shard_map.new_replica_id(joining_node))
            return replace(
                shard_map,
                moves=(*shard_map.moves, move),
                next_incarnation=shard_map.next_incarnation + 1,
            )
        case FinishMove(move):
            if move not in shard_map.moves:
                raise ChangeRefused(f"no such move {move}")
            replicas = tuple(
                move.joining if r == move.leaving else r
                for r in shard_map.group(move.group).replicas
                if r != move.leaving or move.joining != NO_NODE
            )
            return _with_replicas(_without_move(shard_map, move), move.group, replicas)
        case AbortMove(move):
            if move not in shard_map.moves:
                raise ChangeRefused(f"no such move {move}")
            return _without_move(shard_map, move)
        case SetPreferredLeader(group, replica):
            replicas = shard_map.group(group).replicas
            if replica not in replicas or group == META_GROUP_ID:
                raise ChangeRefused(f"replica {replica} is not in shard {group}")
            ordered = (replica, *(r for r in replicas if r != replica))
            return _with_replicas(shard_map, group, ordered)
        case StartSplit(shard_id, split_token):
            if shard_id == META_GROUP_ID:
                raise ChangeRefused("the meta group is not a shard")
            shard = shard_map.shard(shard_id)
            if shard_map.move_of(shard_id) is not None or shard_map.split_of(shard_id):
                raise ChangeRefused(f"shard {shard_id} has a move or a split in progress")
            if not shard.start_token < split_token < shard.end_token:
                raise ChangeRefused(f"token {split_token} does not cut shard {shard_id} in two")
            used = [s.id for s in shard_map.shards] + [x.child_id for x in shard_map.splits]
            split = Split(shard_id, max(used) + 1, split_token)
            return replace(shard_map, splits=(*shard_map.splits, split))
        case FinishSplit(split):
            if split not in shard_map.splits:
                raise ChangeRefused(f"no such split {split}")
            parent = shard_map.shard(split.shard)
            halves = (
                replace(parent, end_token=split.split_token),
                ShardSpec(split.child_id, split.split_token, parent.end_token, parent.replicas),
            )
            shards = tuple(
                half for s in shard_map.shards for half in (halves if s.id == parent.id else (s,))
            )
            splits = tuple(x for x in shard_map.splits if x != split)
            finished = (*shard_map.finished_splits, split)
            return replace(shard_map, shards=shards, splits=splits, finished_splits=finished)
    raise AssertionError(f"unknown map change {change!r}")


def _without_move(shard_map: ShardMap, move: Move) -> ShardMap:
    return replace(shard_map, moves=tuple(m for m in shard_map.moves if m != move))


def _with_replicas(shard_map: ShardMap, group: int, replicas: tuple[NodeId, ...]) -> ShardMap:
    if group == META_GROUP_ID:
        return replace(shard_map, meta_voters=replicas)
    shards = tuple(replace(s, replicas=replicas) if s.id == group else s for s in shard_map.shards)
    return replace(shard_map, shards=shards)


# --- Wire tags, after kvstore.meta's own (1-3). Append only: they live in the meta log. ---
_ADD_NODE, _DRAIN_NODE, _REMOVE_NODE, _START, _FINISH, _ABORT, _PREFER, _DOWN = range(4, 12)
_START_SPLIT, _FINISH_SPLIT = 12, 13


def encode_change(change: MapChange) -> bytes:
    fields: tuple[object, ...]
    match change:
        case AddNode(node):
            fields = (_ADD_NODE, node.id, node.client_url, list(node.peer_address))
        case DrainNode(node_id):
            fields = (_DRAIN_NODE, node_id)
        case SetNodeDown(node_id, down):
            fields = (_DOWN, node_id, int(down))
        case RemoveNode(node_id):
            fields = (_REMOVE_NODE, node_id)
        case StartMove(group, leaving, joining_node):
            fields = (_START, group, leaving, joining_node)
        case FinishMove(move):
            fields = (_FINISH, move.group, move.leaving, move.joining)
        case AbortMove(move):
            fields = (_ABORT, move.group, move.leaving, move.joining)
        case SetPreferredLeader(group, replica):
            fields = (_PREFER, group, replica)
        case StartSplit(shard, split_token):
            fields = (_START_SPLIT, shard, split_token)
        case FinishSplit(split):
            fields = (_FINISH_SPLIT, split.shard, split.child_id, split.split_token)
    packed: bytes = msgpack.packb(fields)
    return packed


def decode_change(tag: int, fields: list[object]) -> MapChange:
    """`tag` and the rest of an encoded change. Raises ValueError on anything malformed."""
    try:
        ints = [f for f in fields if type(f) is int]
        if tag == _ADD_NODE:
            node_id, url, address = fields
            host, port = address if isinstance(address, list) else (None, None)
            if type(node_id) is not int or not isinstance(url, str):
                raise ValueError("bad node id or url")
            if not isinstance(host, str) or type(port) is not int:
                raise ValueError("bad peer address")
            return AddNode(NodeInfo(NodeId(node_id), url, (host, port)))
        if len(ints) != len(fields):
            raise ValueError("fields must be integers")
        if tag == _DRAIN_NODE:
            (node_id,) = ints
            return DrainNode(NodeId(node_id))
        if tag == _DOWN:
            node_id, down = ints
            return SetNodeDown(NodeId(node_id), bool(down))
        if tag == _REMOVE_NODE:
            (node_id,) = ints
            return RemoveNode(NodeId(node_id))
        if tag == _START:
            group, leaving, joining = ints
            return StartMove(group, NodeId(leaving), NodeId(joining))
        if tag in (_FINISH, _ABORT):
            group, leaving, joining = ints
            move = Move(group, NodeId(leaving), NodeId(joining))
            return FinishMove(move) if tag == _FINISH else AbortMove(move)
        if tag == _PREFER:
            group, replica = ints
            return SetPreferredLeader(group, NodeId(replica))
        if tag == _START_SPLIT:
            shard, split_token = ints
            return StartSplit(shard, split_token)
        if tag == _FINISH_SPLIT:
            shard, child_id, split_token = ints
            return FinishSplit(Split(shard, child_id, split_token))
    except (TypeError, ValueError) as error:
        raise ValueError(f"malformed map change {tag}: {error}") from error
    raise ValueError(f"unknown map change tag {tag}")
