"""An in-memory AdminService for HTTP tests of kvstore.admin_api: shard 1 and 2 exist; a
"backup" of shard N is b"backup-of-N" followed by its data. And a meta proposer that records
the shard map changes the membership and split routes propose (over a 2-shard map)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvstore.admin_api import ShardBackup, ShardRestored
from kvstore.errors import InvalidRequest, NotFound, PreconditionFailed
from kvstore.map_changes import MapChange, decode_change
from kvstore.service import KeyVersion, Limits, RequestContext
from kvstore.sharding import META_GROUP_ID, NodeInfo, ShardMap, initial_shard_map
from raft.core.types import NodeId

SHARDS = (1, 2)


@dataclass
class FakeAdminService:
    limits: Limits = field(default_factory=Limits)
    data: dict[int, bytes] = field(default_factory=lambda: dict.fromkeys(SHARDS, b""))
    checks: list[dict[str, Any]] = field(default_factory=list)

    async def check_consistency(self) -> list[dict[str, Any]]:
        self.checks = [
            {"shard": shard, "status": "consistent", "index": 7, "replicas": [], "message": "ok"}
            for shard in SHARDS
        ]
        return self.checks

    def last_checks(self) -> list[dict[str, Any]]:
        return self.checks

    async def backup_shard(self, shard_id: int) -> ShardBackup:
        self._exists(shard_id)
        blob = f"backup-of-{shard_id}".encode() + self.data[shard_id]
        return ShardBackup(shard_id, blob, 7, len(self.data[shard_id]), 0xABC)

    async def restore_shard(self, shard_id: int, blob: bytes, replace: bool) -> ShardRestored:
        self._exists(shard_id)
        header = f"backup-of-{shard_id}".encode()
        if not blob.startswith(header):
            raise InvalidRequest(f"not an intact backup of shard {shard_id}")
        if self.data[shard_id] and not replace:
            raise PreconditionFailed(f"shard {shard_id} holds keys", 0)
        self.data[shard_id] = blob[len(header) :]
        return ShardRestored(shard_id, 9, len(self.data[shard_id]), 0xABC)

    def _exists(self, shard_id: int) -> None:
        if shard_id not in self.data:
            raise NotFound(f"shard {shard_id} does not exist")


@dataclass
class RecordingMetaProposer:
    changes: list[MapChange] = field(default_factory=list)
    refuse: bool = False  # answer every change as the meta group refusing it
    shard_map: ShardMap = field(
        default_factory=lambda: initial_shard_map(
            [NodeInfo(NodeId(1), "http://127.0.0.1:1", ("127.0.0.1", 2))], len(SHARDS), 1
        )
    )

    async def propose(self, shard_id: int, command: bytes, ctx: RequestContext) -> object:
        if shard_id != META_GROUP_ID:
            raise AssertionError(f"a membership change went to group {shard_id}")
        tag, *fields = msgpack.unpackb(command)
        self.changes.append(decode_change(tag, fields))
        if self.refuse:
            raise PreconditionFailed("node 4 is already in the cluster", 7)
        return KeyVersion("(shard map)", 8)
