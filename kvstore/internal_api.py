"""Routes nodes use among themselves (/v1/internal/*): forwarded proposals and reads, local
Raft status, the shard map. Bodies are the msgpack commands and results the log carries.
PeerGuard decides who may call them (node certificate, or cluster secret)."""

from __future__ import annotations

import contextlib
import hmac
import logging
from dataclasses import asdict

import msgpack
from aiohttp import web
from aiohttp.typedefs import Handler

from kvstore.commands import (
    BatchWritten,
    Failed,
    ReplicaHash,
    Restored,
    SplitApplied,
    encode_outcome,
)
from kvstore.consistency_check import ConsistencyChecker
from kvstore.errors import Forbidden, InvalidRequest, KVError
from kvstore.http_api import INTERNAL_ROUTE_PREFIX, error_response, read_body, txn_body_limit_bytes
from kvstore.peer_client import (
    CLUSTER_SECRET_HEADER,
    EPOCH_HEADER,
    HOPS_HEADER,
    LEADER_HEADER,
    NODE_HEADER,
    NotLeaderHere,
)
from kvstore.query_runner import encode_error, encode_event
from kvstore.router import Router
from kvstore.service import Consistency, KeyVersion, TxnResult
from kvstore.tls import is_node_certificate

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


class PeerGuard:
    """Who may call the internal routes: with TLS, a node's client certificate (the CA verified
    it at the handshake); else, when auth is on, the cluster secret; else anyone (a plain local
    cluster has nothing to protect). Every refusal is logged and counted."""

    def __init__(self, *, tls: bool, cluster_secret: str | None) -> None:
        self._tls = tls
        self._secret = cluster_secret
        self.refused = 0

    def is_allowed(self, request: web.Request) -> bool:
        if self._tls:
            transport = request.transport
            peercert = transport.get_extra_info("peercert") if transport is not None else None
            allowed = is_node_certificate(peercert)
        elif self._secret is not None:
            offered = request.headers.get(CLUSTER_SECRET_HEADER, "")
            allowed = hmac.compare_digest(offered.encode(), self._secret.encode())
        else:
            return True
        if not allowed:
            self.refused += 1
            log.warning(
                "refused %s %s from %s: %s",
                request.method,
                request.path,
                request.remote,
                "no node certificate" if self._tls else "wrong or missing cluster secret",
            )
        return allowed

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(INTERNAL_ROUTE_PREFIX) and not self.is_allowed(request):
            return error_response(Forbidden("the internal routes are for the cluster's nodes"))
        return await handler(request)


def add_internal_routes(app: web.Application, router: Router, checker: ConsistencyChecker) -> None:
    async def propose(request: web.Request) -> web.Response:
        try:
            await _check_epoch(request, router)
            limit = max(txn_body_limit_bytes(router.limits), router.limits.max_shard_backup_bytes)
            outcome = await router.serve_internal_propose(
                _int_param(request, "shard"),
                await read_body(request, limit, "command"),
                _hops(request),
            )
        except KVError as error:
            return _error(error)
        except KeyError as error:
            return _error(InvalidRequest(str(error)))
        if isinstance(outcome, str | int | None):  # a metadata group result
            return web.Response(body=msgpack.packb(outcome), content_type="application/msgpack")
        if not isinstance(
            outcome,
            KeyVersion | TxnResult | Failed | ReplicaHash | Restored | BatchWritten | SplitApplied,
        ):
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

    async def query(request: web.Request) -> web.StreamResponse:
        """One shard's part of a query, streamed as frames (see kvstore.query_runner)."""
        try:
            consistency = Consistency(request.query.get("consistency", "linearizable"))
        except ValueError:
            return _error(InvalidRequest("consistency must be linearizable or stale"))
        try:
            await _check_epoch(request, router)
            shard_id = _int_param(request, "shard")
            events = await router.serve_internal_query(
                shard_id,
                await request.read(),
                consistency,
                max(_int_param(request, "budget"), 1),
                follower=request.query.get("follower") == "1",
            )
        except KVError as error:
            return _error(error)
        except KeyError as error:
            return _error(InvalidRequest(str(error)))
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", NODE_HEADER: str(router.node_id)}
        )
        await response.prepare(request)
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    await response.write(encode_event(event))
        except ConnectionResetError:
            return response  # the coordinator went away; the scan stops with the generator
        except Exception as error:
            try:
                failure = router.scan_failure(error, shard_id)
            except Exception:
                log.exception("query on shard %d failed", shard_id)
                failure = KVError(f"node {router.node_id} failed the query; see its log")
            await response.write(encode_error(failure))
        await response.write_eof()
        return response

    async def status(request: web.Request) -> web.Response:
        return web.json_response(router.local_status())

    async def shard_map(request: web.Request) -> web.Response:
        try:
            return web.Response(body=router.shard_map.encode(), content_type="application/msgpack")
        except KVError as error:
            return _error(error)

    async def check(request: web.Request) -> web.Response:
        """This replica's hash at a HashCheck's index (waits a while for it to apply)."""
        try:
            report = await checker.local_report(
                _int_param(request, "shard"), _int_param(request, "index")
            )
        except KVError as error:
            return _error(error)
        return web.json_response(asdict(report))

    app.router.add_post("/v1/internal/propose", propose)
    app.router.add_post("/v1/internal/read", read)
    app.router.add_post("/v1/internal/query", query)
    app.router.add_get("/v1/internal/status", status)
    app.router.add_get("/v1/internal/shard-map", shard_map)
    app.router.add_get("/v1/internal/check", check)
