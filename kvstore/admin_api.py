"""The admin routes of the public API (/v1/admin/*): consistency checks, shard backups,
cluster membership (join a node, drain one out) and shard splits.

Like http_api, it depends only on narrow Protocols and the error tree: AdminService
(kvstore.admin) for integrity, MetaProposer (the router) for membership, where each route is
one shard map change through the meta group; the reconciler and the movers do the rest, and
/v1/cluster shows their progress (moves, balanced). Errors become JSON through http_api's
middleware. Every route needs the admin grant.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web

from kvstore.auth import Action
from kvstore.config import ConfigError, parse_address
from kvstore.errors import InvalidRequest, NotFound
from kvstore.http_api import authorize, read_body
from kvstore.map_changes import AddNode, DrainNode, MapChange, StartSplit, encode_change
from kvstore.moves import MetaProposer
from kvstore.service import KeyVersion, Limits, RequestContext
from kvstore.sharding import META_GROUP_ID, NodeInfo, ShardMap
from raft.core.types import MAX_NODE_ID, NodeId

ADMIN_ROUTE_PREFIX: Final = "/v1/admin/"
_SHARD_ID = re.compile(r"[0-9]{1,19}")
MAX_NODE_BODY_BYTES = 4096


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


class Membership(MetaProposer, Protocol):
    """What the membership and split routes need from the router."""

    @property
    def shard_map(self) -> ShardMap: ...


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


def _node_id(raw: Any) -> NodeId:
    text = str(raw)
    if type(raw) not in (int, str) or not text.isdigit() or not 1 <= int(text) <= MAX_NODE_ID:
        raise InvalidRequest(f"a node id is an integer from 1 to {MAX_NODE_ID}, got {raw!r}")
    return NodeId(int(text))


def _node_info(body: bytes) -> NodeInfo:
    try:
        fields = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"the body must be JSON: {error}") from error
    if not isinstance(fields, dict) or set(fields) != {"id", "client_url", "peer_address"}:
        raise InvalidRequest('the body must be {"id": N, "client_url": URL, "peer_address": H:P}')
    client_url = fields["client_url"]
    if not isinstance(client_url, str) or not client_url.startswith(("http://", "https://")):
        raise InvalidRequest("client_url must be an http(s):// URL")
    try:
        peer = parse_address(str(fields["peer_address"]), "peer_address")
    except ConfigError as error:
        raise InvalidRequest(str(error)) from error
    return NodeInfo(_node_id(fields["id"]), client_url.rstrip("/"), peer)


def add_admin_routes(app: web.Application, admin: AdminService, membership: Membership) -> None:
    async def change_map(change: MapChange) -> web.Response:
        outcome = await membership.propose(META_GROUP_ID, encode_change(change), RequestContext())
        if not isinstance(outcome, KeyVersion):
            raise AssertionError(f"a shard map change applied as {outcome!r}")
        return web.json_response({"epoch": outcome.version})

    async def add_node(request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")  # membership concerns every key
        body = await read_body(request, MAX_NODE_BODY_BYTES, "a node's description")
        return await change_map(AddNode(_node_info(body)))

    async def drain_node(request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")  # membership concerns every key
        return await change_map(DrainNode(_node_id(request.match_info["node_id"])))

    async def split_shard(request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")  # a split moves a range of keys
        shard_id = _shard_id(request)
        try:
            shard = membership.shard_map.shard(shard_id)
        except KeyError:
            raise NotFound(f"there is no shard {shard_id}") from None
        # Keys hash evenly over tokens, so the middle token halves the keys up to noise.
        middle = (shard.start_token + shard.end_token) // 2
        return await change_map(StartSplit(shard_id, middle))

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
    app.router.add_post(ADMIN_ROUTE_PREFIX + "nodes", add_node)
    app.router.add_post(ADMIN_ROUTE_PREFIX + "nodes/{node_id}/drain", drain_node)
    app.router.add_post(ADMIN_ROUTE_PREFIX + "shards/{shard}/split", split_shard)
