"""Operator routes (/v1/admin/*): join a node to the cluster, drain one out of it. Each is one
shard map change through the meta group; the reconciler and the movers do the rest, and
/v1/cluster shows their progress (moves, balanced)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kvstore.config import ConfigError, parse_address
from kvstore.errors import InvalidRequest
from kvstore.map_changes import AddNode, DrainNode, MapChange, encode_change
from kvstore.moves import MetaProposer
from kvstore.service import KeyVersion, RequestContext
from kvstore.sharding import META_GROUP_ID, NodeInfo
from raft.core.types import MAX_NODE_ID, NodeId

MAX_ADMIN_BODY_BYTES = 4096


def add_admin_routes(app: web.Application, router: MetaProposer) -> None:
    async def apply(change: MapChange) -> web.Response:
        outcome = await router.propose(META_GROUP_ID, encode_change(change), RequestContext())
        assert isinstance(outcome, KeyVersion), outcome
        return web.json_response({"epoch": outcome.version})

    async def add_node(request: web.Request) -> web.Response:
        body = await request.content.read(MAX_ADMIN_BODY_BYTES + 1)
        return await apply(AddNode(_node_info(body)))

    async def drain_node(request: web.Request) -> web.Response:
        return await apply(DrainNode(_node_id(request.match_info["node_id"])))

    app.router.add_post("/v1/admin/nodes", add_node)
    app.router.add_post("/v1/admin/nodes/{node_id}/drain", drain_node)


def _node_id(raw: Any) -> NodeId:
    text = str(raw)
    if type(raw) not in (int, str) or not text.isdigit() or not 1 <= int(text) <= MAX_NODE_ID:
        raise InvalidRequest(f"a node id is an integer from 1 to {MAX_NODE_ID}, got {raw!r}")
    return NodeId(int(text))


def _node_info(body: bytes) -> NodeInfo:
    if len(body) > MAX_ADMIN_BODY_BYTES:
        raise InvalidRequest(f"the body must be at most {MAX_ADMIN_BODY_BYTES} bytes")
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
