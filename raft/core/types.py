"""Identifiers and positions used throughout Raft: NewTypes, so mypy catches a term passed as
an index."""

from __future__ import annotations

from typing import NewType

NodeId = NewType("NodeId", int)
Term = NewType("Term", int)
LogIndex = NewType("LogIndex", int)

NO_NODE = NodeId(0)  # "nobody": no vote cast, no leader known. Real node ids are >= 1.

# A group member's id (a "replica id") carries the node that hosts it in its low bits, so the
# transport routes by node while a replica re-created on the same node gets a fresh id: ids are
# never reused with fresh state (docs/raft.md). Incarnation 0 is the node id itself.
REPLICA_NODE_BITS = 16
MAX_NODE_ID = (1 << REPLICA_NODE_BITS) - 1


def node_of(replica_id: NodeId) -> NodeId:
    """The node (process) hosting this replica."""
    return NodeId(replica_id & MAX_NODE_ID)


def make_replica_id(node_id: NodeId, incarnation: int) -> NodeId:
    if not 1 <= node_id <= MAX_NODE_ID or incarnation < 0:
        raise ValueError(f"no replica id for node {node_id}, incarnation {incarnation}")
    return NodeId(incarnation << REPLICA_NODE_BITS | node_id)
