"""ReplicaQuarantine: what a node does once one of its shard replicas fails a checksum.

That replica stops serving (every read of its shard answers ReplicaCorrupted: 503, naming the
shard and key, so routers go to another replica), stops leading (RaftHost.quarantine hands
leadership to a peer and it never campaigns again), and is counted in metrics. It still votes
and replicates: its Raft log is checked separately and is sound; only its applied data is not.
It lasts until the process restarts; the cure is to rebuild the replica (docs/operations.md).
"""

from __future__ import annotations

import logging

from kvstore.errors import ReplicaCorrupted
from raft.core.types import NodeId
from raft.runtime.host import RaftHost

log = logging.getLogger(__name__)


class ReplicaQuarantine:
    def __init__(self, node_id: NodeId, host: RaftHost) -> None:
        self._node_id = node_id
        self._host = host
        self.corrupt_keys: dict[int, str] = {}  # quarantined shard -> the key that failed first
        self.checksum_failures: dict[int, int] = {}  # shard -> failures seen (the metric)

    def is_quarantined(self, shard_id: int) -> bool:
        return shard_id in self.corrupt_keys

    def refuse_if_quarantined(self, shard_id: int) -> None:
        key = self.corrupt_keys.get(shard_id)
        if key is not None:
            raise self._error(shard_id, key)

    def report(self, shard_id: int, key: str, detail: str) -> ReplicaCorrupted:
        """Count a checksum failure and quarantine the replica; returns the error to answer."""
        self.checksum_failures[shard_id] = self.checksum_failures.get(shard_id, 0) + 1
        if shard_id not in self.corrupt_keys:
            self.corrupt_keys[shard_id] = key
            log.critical(
                "node %d: replica of shard %d is corrupt at key %r (%s): quarantined; it no "
                "longer serves or leads this shard. Rebuild it (docs/operations.md).",
                self._node_id,
                shard_id,
                key,
                detail,
            )
            if self._host.has_group(shard_id):
                self._host.quarantine(shard_id)
        return self._error(shard_id, key)

    def _error(self, shard_id: int, key: str) -> ReplicaCorrupted:
        shown = key if len(key) <= 200 else key[:200] + "..."
        return ReplicaCorrupted(
            f"replica corrupted: node {self._node_id}'s replica of shard {shard_id} failed a "
            f"checksum at key {shown!r}; it no longer serves this shard: other replicas do, "
            "retry on another node",
            shard_id,
            key,
        )
