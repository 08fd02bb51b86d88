"""Routes nodes use among themselves (/v1/internal/*): forwarded proposals and reads, local
Raft status, the shard map. Bodies are the msgpack commands and results the log carries."""

from __future__ import annotations

import logging

from aiohttp import web

from kvstore.commands import BatchWritten, Failed, encode_outcome
from kvstore.errors import InvalidRequest, KVError
from kvstore.http_api import error_response
from kvstore.peer_client import EPOCH_HEADER, HOPS_HEADER, LEADER_HEADER, NotLeaderHere
from kvstore.router import Router
from kvstore.service import Consistency, KeyVersion, TxnResult

log = logging.getLogger(__name__)


def _error(error: KVError) -> web.Response:
    response = error_response(error)
    if isinstance(error, NotLeaderHere):
        response.headers[LEADER_HEADER] = str(error.leader_hint)
    return response


def _int_param(request: web.Request, name: str) -> int:
    raw = request.query.get(name, "")
    if not raw.isdigit():
        raise InvalidRequest(f"query parameter {name} must be a non-negative integer")
    return int(raw)


async def _check_epoch(request: web.Request, router: Router) -> None:
    raw = request.headers.get(EPOCH_HEADER)
    if raw is None:
        return
    if not raw.isdigit():
        raise InvalidRequest(f"{EPOCH_HEADER} must be a non-negative integer")
    await router.check_peer_epoch(int(raw))


def _hops(request: web.Request) -> int:
    raw = request.headers.get(HOPS_HEADER, "0")
    if not raw.isdigit():
        raise InvalidRequest(f"{HOPS_HEADER} must be a non-negative integer")
    return int(raw)


def add_internal_routes(app: web.Application, router: Router) -> None:
    async def propose(request: web.Request) -> web.Response:
        try:
            await _check_epoch(request, router)
            outcome = await router.serve_internal_propose(
                _int_param(request, "shard"), await request.read(), _hops(request)
            )
        except KVError as error:
            return _error(error)
        except KeyError as error:
            return _error(InvalidRequest(str(error)))
        if not isinstance(outcome, KeyVersion | TxnResult | Failed | BatchWritten):
            raise AssertionError(f"unexpected outcome {outcome!r}")
        return web.Response(body=encode_outcome(outcome), content_type="application/msgpack")

    async def read(request: web.Request) -> web.Response:
        try:
            consistency = Consistency(request.query.get("consistency", "linearizable"))
        except ValueError:
            return _error(InvalidRequest("consistency must be linearizable or stale"))
        try:
            await _check_epoch(request, router)
            payload = await router.serve_internal_read(
                _int_param(request, "shard"),
                request.query.get("op", ""),
                await request.read(),
                consistency,
                _hops(request),
            )
        except KVError as error:
            return _error(error)
        except KeyError as error:
            return _error(InvalidRequest(str(error)))
        return web.Response(body=payload, content_type="application/msgpack")

    async def status(request: web.Request) -> web.Response:
        return web.json_response(router.local_status())

    async def shard_map(request: web.Request) -> web.Response:
        try:
            return web.Response(body=router.shard_map.encode(), content_type="application/msgpack")
        except KVError as error:
            return _error(error)

    app.router.add_post("/v1/internal/propose", propose)
    app.router.add_post("/v1/internal/read", read)
    app.router.add_get("/v1/internal/status", status)
    app.router.add_get("/v1/internal/shard-map", shard_map)
