"""The admin routes of the public API (/v1/admin/*): consistency checks and shard backups.

Like http_api, it depends only on a narrow Protocol (AdminService, implemented by
kvstore.admin) and the error tree; errors become JSON through http_api's middleware.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web

from kvstore.auth import Action
from kvstore.errors import InvalidRequest
from kvstore.http_api import authorize, read_body
from kvstore.service import Limits

ADMIN_ROUTE_PREFIX: Final = "/v1/admin/"
_SHARD_ID = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class ShardBackup:
    shard_id: int
    blob: bytes  # opaque to clients: the shard's snapshot, with its own xxh64 checksum
    applied_index: int
    key_count: int
    content_digest: int  # xxh64 over (key, value) pairs; a restore reports the same number


@dataclass(frozen=True, slots=True)
class ShardRestored:
    shard_id: int
    version: int  # every restored key's version
    key_count: int
    content_digest: int


class AdminService(Protocol):
    limits: Limits

    async def check_consistency(self) -> list[dict[str, Any]]:
        """Check every shard now; one report per shard (see kvstore.consistency_check)."""
        ...

    def last_checks(self) -> list[dict[str, Any]]:
        """The latest report of each shard this node checked (periodically or when asked)."""
        ...

    async def backup_shard(self, shard_id: int) -> ShardBackup:
        """Raises NotFound for an unknown shard."""
        ...

    async def restore_shard(self, shard_id: int, blob: bytes, replace: bool) -> ShardRestored:
        """Raises NotFound, InvalidRequest (not a backup of that shard), PreconditionFailed
        (the shard holds keys and replace is False)."""
        ...


def _shard_id(request: web.Request) -> int:
    raw = request.match_info["shard"]
    if not _SHARD_ID.fullmatch(raw):
        raise InvalidRequest("the shard id must be a decimal integer")
    return int(raw)


def _replace(request: web.Request) -> bool:
    raw = request.query.getall("replace", [])
    if raw not in ([], ["true"], ["false"]):
        raise InvalidRequest("replace must be given at most once, as true or false")
    return raw == ["true"]


def _check_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "consistent": all(report["status"] == "consistent" for report in reports),
        "divergent": [report["shard"] for report in reports if report["status"] == "divergent"],
        "shards": reports,
    }


def add_admin_routes(app: web.Application, admin: AdminService) -> None:
    async def run_check(request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")  # a backup or check spans every key
        return web.json_response(_check_report(await admin.check_consistency()))

    async def last_check(request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")  # a backup or check spans every key
        return web.json_response(_check_report(admin.last_checks()))

    async def get_snapshot(request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")  # a backup or check spans every key
        backup = await admin.backup_shard(_shard_id(request))
        return web.Response(
            body=backup.blob,
            content_type="application/octet-stream",
            headers={
                "X-KV-Shard": str(backup.shard_id),
                "X-KV-Applied-Index": str(backup.applied_index),
                "X-KV-Key-Count": str(backup.key_count),
                "X-KV-Content-Digest": f"{backup.content_digest:016x}",
            },
        )

    async def put_snapshot(request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")  # a backup or check spans every key
        shard_id = _shard_id(request)
        replace = _replace(request)
        limit = admin.limits.max_shard_backup_bytes
        blob = await read_body(request, limit, "shard backup")
        restored = await admin.restore_shard(shard_id, blob, replace)
        return web.json_response(
            {
                "shard": restored.shard_id,
                "version": restored.version,
                "key_count": restored.key_count,
                "content_digest": f"{restored.content_digest:016x}",
            }
        )

    app.router.add_post(ADMIN_ROUTE_PREFIX + "check", run_check)
    app.router.add_get(ADMIN_ROUTE_PREFIX + "check", last_check)
    app.router.add_get(ADMIN_ROUTE_PREFIX + "snapshot/{shard}", get_snapshot)
    app.router.add_put(ADMIN_ROUTE_PREFIX + "snapshot/{shard}", put_snapshot)
