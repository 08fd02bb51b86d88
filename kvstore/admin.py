"""NodeAdmin: the node's AdminService (kvstore.admin_api): consistency checks and shard backups
on top of the router; a backup is a shard leader's snapshot, a restore a Raft command."""

from __future__ import annotations

from typing import Any

from kvstore.admin_api import ShardBackup, ShardRestored
from kvstore.commands import Restored, RestoreShard, encode_command
from kvstore.consistency_check import ConsistencyChecker
from kvstore.errors import InvalidRequest, NotFound, ShardUnavailable
from kvstore.router import Router
from kvstore.service import RequestContext
from kvstore.shard_snapshot import backup_summary


class NodeAdmin:
    def __init__(self, router: Router, checker: ConsistencyChecker) -> None:
        self.limits = router.limits
        self._router = router
        self._checker = checker

    async def check_consistency(self) -> list[dict[str, Any]]:
        return [report.to_json() for report in await self._checker.check_all()]

    def last_checks(self) -> list[dict[str, Any]]:
        return [self._checker.last[shard].to_json() for shard in sorted(self._checker.last)]

    async def backup_shard(self, shard_id: int) -> ShardBackup:
        self._check_shard_exists(shard_id)
        blob = await self._router.snapshot_shard(shard_id)
        try:
            applied_index, key_count, content_digest = backup_summary(blob, shard_id)
        except ValueError as error:  # damaged between the leader's LMDB and here
            raise ShardUnavailable(
                f"shard {shard_id}'s snapshot arrived damaged: {error}"
            ) from None
        return ShardBackup(shard_id, blob, applied_index, key_count, content_digest)

    async def restore_shard(self, shard_id: int, blob: bytes, replace: bool) -> ShardRestored:
        self._check_shard_exists(shard_id)
        try:
            backup_summary(blob, shard_id)  # refuse garbage before it takes a Raft log slot
        except ValueError as error:
            raise InvalidRequest(f"not an intact backup of shard {shard_id}: {error}") from None
        command = encode_command(RestoreShard(blob, replace))
        outcome = await self._router.propose(shard_id, command, RequestContext())
        if not isinstance(outcome, Restored):
            raise AssertionError(f"a RestoreShard applied as {outcome!r}")
        return ShardRestored(shard_id, outcome.index, outcome.key_count, outcome.content_digest)

    def _check_shard_exists(self, shard_id: int) -> None:
        try:
            self._router.shard_map.shard(shard_id)
        except KeyError:
            raise NotFound(f"shard {shard_id} does not exist; see GET /v1/cluster") from None
