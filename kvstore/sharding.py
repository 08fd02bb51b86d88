"""Pure: which shard owns a key, and where each shard's replicas live.

Keys hash (xxh64, stable across processes and versions, never Python's hash()) onto a 64-bit
token ring cut into contiguous ranges, one per shard. Replicas are placed by rendezvous hashing,
so adding or removing a node moves only the replicas it must. Replicas are named by replica ids
(raft.core.types.make_replica_id): a founding replica's id is its node's id.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import msgpack
import xxhash

from raft.core.types import NodeId, make_replica_id, node_of

TOKEN_SPACE = 1 << 64
META_GROUP_ID = 0  # the Raft group holding the shard map; shard ids start at 1
MAX_META_VOTERS = 5


def key_token(key: str) -> int:
    return xxhash.xxh64_intdigest(key.encode())


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: NodeId
    client_url: str  # http(s)://host:port of its HTTP API
    peer_address: tuple[str, int]  # its Raft transport
    draining: bool = False  # being removed: the balancer moves every replica away from it
    down: bool = False  # unreachable for longer than down_after: its replicas are re-created

    @property
    def is_active(self) -> bool:
        """May receive replicas."""
        return not (self.draining or self.down)


@dataclass(frozen=True, slots=True)
class Move:
    """One replica of a group (a shard, or the meta group 0) being replaced: `joining` is
    added as a learner, caught up, promoted, then `leaving` is removed (both replica ids)."""

    group: int
    leaving: NodeId
    joining: NodeId


@dataclass(frozen=True, slots=True)
class Split:
    """A shard being cut in two: the keys at or above `split_token` go to the new shard
    `child_id`, on the same replicas (docs/architecture.md, "Shard split")."""

    shard: int
    child_id: int
    split_token: int


@dataclass(frozen=True, slots=True)
class ShardSpec:
    id: int
    start_token: int  # inclusive
    end_token: int  # exclusive; the last shard ends at TOKEN_SPACE
    replicas: tuple[NodeId, ...]  # replica ids; replicas[0] is the preferred leader

    def owns(self, token: int) -> bool:
        return self.start_token <= token < self.end_token


@dataclass(frozen=True, slots=True)
class ShardMap:
    """Every shard's token range and replicas, and every node's addresses, at one epoch."""

    epoch: int
    shards: tuple[ShardSpec, ...]  # sorted by start_token, covering the whole ring
    nodes: tuple[NodeInfo, ...]
    meta_voters: tuple[NodeId, ...]  # replica ids of the meta group
    moves: tuple[Move, ...] = ()  # in progress; at most one per group
    next_incarnation: int = 1  # the next new replica id's incarnation (never reused)
    splits: tuple[Split, ...] = ()  # in progress; at most one per shard, none with a move
    # Every finished split, which tells a node whether a shard's data comes from a handover
    # (LocalReplicas waits for its local parent to hand it over, or starts it empty).
    finished_splits: tuple[Split, ...] = ()
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expected = 0
        for shard in self.shards:
            if shard.start_token != expected or shard.end_token <= shard.start_token:
                raise ValueError(f"shard {shard.id} does not continue the ring at {expected}")
            expected = shard.end_token
        if self.shards and expected != TOKEN_SPACE:
            raise ValueError("the shards do not cover the whole token ring")
        object.__setattr__(self, "_starts", tuple(shard.start_token for shard in self.shards))

    def shard_for_key(self, key: str) -> ShardSpec:
        return self.shards[bisect.bisect_right(self._starts, key_token(key)) - 1]

    def shard(self, shard_id: int) -> ShardSpec:
        """A data shard; KeyError for any other id (the meta group's too: see group())."""
        for shard in self.shards:  # NB: linear; fine below a few hundred shards
            if shard.id == shard_id:
                return shard
        raise KeyError(f"no shard {shard_id} in the shard map (epoch {self.epoch})")

    def group(self, group_id: int) -> ShardSpec:
        """A shard, or for META_GROUP_ID the meta group's replicas as a ring-wide spec (so
        the router finds and forwards to its leader, and moves its replicas, like a shard's)."""
        if group_id == META_GROUP_ID:
            return ShardSpec(META_GROUP_ID, 0, TOKEN_SPACE, self.meta_voters)
        return self.shard(group_id)

    def node(self, node_id: NodeId) -> NodeInfo:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(f"no node {node_id} in the shard map (epoch {self.epoch})")

    def shards_on(self, node_id: NodeId) -> list[ShardSpec]:
        return [
            shard
            for shard in self.shards
            if any(node_of(replica) == node_id for replica in shard.replicas)
        ]

    def group_ids(self) -> list[int]:
        return [META_GROUP_ID, *(shard.id for shard in self.shards)]

    def split_of(self, shard_id: int) -> Split | None:
        return next((split for split in self.splits if split.shard == shard_id), None)

    def split_that_made(self, shard_id: int) -> Split | None:
        """The finished split whose upper half `shard_id` is (None: a founding shard)."""
        return next((x for x in self.finished_splits if x.child_id == shard_id), None)

    def move_of(self, group_id: int) -> Move | None:
        return next((move for move in self.moves if move.group == group_id), None)

    def replicas_on(self, node_id: NodeId) -> dict[int, NodeId]:
        """group id -> the replica id this node should host: a member, or a move's joiner."""
        hosted: dict[int, NodeId] = {}
        for group_id in self.group_ids():
            for replica in self.group(group_id).replicas:
                if node_of(replica) == node_id:
                    hosted[group_id] = replica
        for move in self.moves:
            if node_of(move.joining) == node_id:
                hosted[move.group] = move.joining
        return hosted

    def has_node(self, node_id: NodeId) -> bool:
        return any(node.id == node_id for node in self.nodes)

    def new_replica_id(self, node_id: NodeId) -> NodeId:
        return make_replica_id(node_id, self.next_incarnation)

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(
            (
                self.epoch,
                [
                    (s.id, s.start_token, s.end_token - 1, list(s.replicas)) for s in self.shards
                ],  # u64
                [
                    (n.id, n.client_url, list(n.peer_address), n.draining, n.down)
                    for n in self.nodes
                ],
                list(self.meta_voters),
                [(m.group, m.leaving, m.joining) for m in self.moves],
                self.next_incarnation,
                [(x.shard, x.child_id, x.split_token) for x in self.splits],
                [(x.shard, x.child_id, x.split_token) for x in self.finished_splits],
            )
        )
        return packed

    @classmethod
    def decode(cls, data: bytes) -> ShardMap:
        epoch, shards, nodes, meta_voters, *elastic = msgpack.unpackb(data)
        # Maps from before moves have neither field; maps from before splits, no split fields.
        moves, next_incarnation, *rest = elastic if elastic else ([], 1)
        splits, finished = [*rest, [], []][:2]
        return cls(
            epoch=epoch,
            shards=tuple(
                ShardSpec(i, start, last + 1, tuple(NodeId(r) for r in replicas))
                for i, start, last, replicas in shards
            ),
            nodes=tuple(
                NodeInfo(NodeId(i), url, (peer[0], peer[1]), *flags)
                for i, url, peer, *flags in nodes
            ),
            meta_voters=tuple(NodeId(v) for v in meta_voters),
            moves=tuple(Move(g, NodeId(leaving), NodeId(joining)) for g, leaving, joining in moves),
            next_incarnation=next_incarnation,
            splits=tuple(Split(shard, child, token) for shard, child, token in splits),
            finished_splits=tuple(Split(shard, child, token) for shard, child, token in finished),
        )


def rendezvous_replicas(
    shard_id: int, node_ids: list[NodeId], replication: int
) -> tuple[NodeId, ...]:
    """The `replication` nodes with the highest hash score for this shard (HRW hashing)."""
    scored = sorted(
        node_ids,
        key=lambda node: xxhash.xxh64_intdigest(f"{shard_id}:{node}".encode()),
        reverse=True,
    )
    return tuple(scored[:replication])


def initial_shard_map(nodes: list[NodeInfo], shard_count: int, replication: int) -> ShardMap:
    """Equal token ranges; each shard's replicas on the least loaded nodes so far (then those
    leading fewest, then by rendezvous hashing), so replicas are even (max - min <= 1); its
    preferred leader (replicas[0]) the one of them leading fewest, which is close to even
    (kvstore.balancer.founding_shard_map evens it out). Deterministic."""
    if shard_count < 1:
        raise ValueError("shards must be >= 1")
    if not 1 <= replication <= len(nodes):
        raise ValueError(f"replication must be between 1 and the node count ({len(nodes)})")
    node_ids = sorted(node.id for node in nodes)
    width = TOKEN_SPACE // shard_count
    shards = []
    leads: dict[NodeId, int] = dict.fromkeys(node_ids, 0)
    load: dict[NodeId, int] = dict.fromkeys(node_ids, 0)
    for number in range(shard_count):
        shard_id = number + 1
        rank = {
            node: position
            for position, node in enumerate(rendezvous_replicas(shard_id, node_ids, len(node_ids)))
        }
        replicas = sorted(node_ids, key=lambda node: (load[node], leads[node], rank[node]))
        replicas = replicas[:replication]
        preferred = min(replicas, key=lambda node: (leads[node], rank[node]))
        others = [node for node in replicas if node != preferred]
        for node in replicas:
            load[node] += 1
        leads[preferred] += 1
        start = number * width
        end = TOKEN_SPACE if number == shard_count - 1 else start + width
        shards.append(ShardSpec(shard_id, start, end, (preferred, *others)))
    return ShardMap(
        epoch=1,
        shards=tuple(shards),
        nodes=tuple(sorted(nodes, key=lambda node: node.id)),
        meta_voters=tuple(node_ids[:MAX_META_VOTERS]),
    )
