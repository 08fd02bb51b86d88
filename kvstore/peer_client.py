"""Node-to-node HTTP: forward a shard operation to the node that can serve it.

Forwarded operations travel as the same msgpack commands the Raft log carries, over the
internal routes of kvstore.internal_api, so forwarding adds no second JSON codec.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack

from kvstore.errors import (
    CrossShardTxn,
    InvalidRequest,
    KVError,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    PreconditionFailed,
    ReplicaCorrupted,
    ShardUnavailable,
    StaleShardMap,
)
from kvstore.service import KeyValue
from raft.core.types import NO_NODE, NodeId

HOPS_HEADER = "X-KV-Hops"
EPOCH_HEADER = "X-KV-Map-Epoch"
LEADER_HEADER = "X-KV-Leader"
NODE_HEADER = "X-KV-Node"  # which node answered a streamed internal route
CLUSTER_SECRET_HEADER = "X-KV-Cluster-Secret"  # peers' proof on internal routes without TLS


class NotLeaderHere(KVError):
    """Internal: the asked node cannot serve the shard; try `leader_hint` (NO_NODE: unknown)."""

    status = 503
    code = "not_leader"

    def __init__(self, message: str, leader_hint: NodeId = NO_NODE) -> None:
        super().__init__(message)
        self.leader_hint = leader_hint


class PeerUnreachable(Exception):
    """The request never reached the peer (connection refused or reset before sending)."""


_ERRORS: dict[str, type[KVError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        CrossShardTxn,
        NotFound,
        PayloadTooLarge,
        ShardUnavailable,
        OutcomeUnknown,
        StaleShardMap,
    )
}


def error_from_code(code: str, message: str) -> KVError:
    """The KVError a peer reported by its code (one it should not send: ShardUnavailable)."""
    return _ERRORS.get(code, ShardUnavailable)(message)


def _error_from(status: int, headers: Any, body: bytes) -> KVError:
    try:
        error = msgpack.unpackb(body) if body[:1] != b"{" else json.loads(body)
        details = error["error"]
        code, message = str(details["code"]), str(details["message"])
    except Exception:  # a peer that answers garbage is as good as unavailable
        return ShardUnavailable(f"peer answered status {status} without a usable error")
    if code == PreconditionFailed.code:
        return PreconditionFailed(message, int(details.get("current_version", 0)))
    if code == NotLeaderHere.code:
        return NotLeaderHere(message, NodeId(int(headers.get(LEADER_HEADER, 0) or 0)))
    if code == ReplicaCorrupted.code:  # that replica is out; the caller tries another
        return ReplicaCorrupted(message, int(details.get("shard", -1)), str(details.get("key")))
    return error_from_code(code, message)


class PeerClient:
    """Calls peers' internal routes: over mutual TLS (our node certificate) when `tls` is set,
    else with the cluster secret when auth needs one."""

    def __init__(
        self,
        timeout_s: float,
        *,
        tls: ssl.SSLContext | None = None,
        cluster_secret: str | None = None,
    ) -> None:
        self._timeout_s = timeout_s
        self._tls = tls
        self._headers = {CLUSTER_SECRET_HEADER: cluster_secret} if cluster_secret else {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout_s),
                connector=aiohttp.TCPConnector(
                    limit=256, limit_per_host=64, ssl=self._tls if self._tls else True
                ),
                headers=self._headers,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        base_url: str,
        route: str,
        body: bytes,
        *,
        hops: int,
        epoch: int,
        timeout_s: float,
        params: dict[str, str] | None = None,
    ) -> bytes:
        """POST body to an internal route. Raises PeerUnreachable if it was never delivered,
        OutcomeUnknown if it may have been (timeout, dropped connection), or the peer's KVError."""
        async with self.open_stream(
            base_url, route, body, hops=hops, epoch=epoch, timeout_s=timeout_s, params=params
        ) as (_node, stream):
            return await stream.read()

    @contextlib.asynccontextmanager
    async def open_stream(
        self,
        base_url: str,
        route: str,
        body: bytes,
        *,
        hops: int,
        epoch: int,
        timeout_s: float,
        params: dict[str, str] | None = None,
    ) -> AsyncIterator[tuple[NodeId, aiohttp.StreamReader]]:
        """As call, for an answer read as a stream: yields (the answering node, its body).
        timeout_s bounds the whole exchange, reading included."""
        headers = {HOPS_HEADER: str(hops), EPOCH_HEADER: str(epoch)}
        try:
            async with self._client().post(
                f"{base_url}/v1/internal/{route}",
                data=body,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 2)),
            ) as response:
                if response.status != 200:
                    raise _error_from(response.status, response.headers, await response.read())
                node = response.headers.get(NODE_HEADER, "")
                yield NodeId(int(node) if node.isdigit() else NO_NODE), response.content
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as error:
            raise PeerUnreachable(f"{base_url}: {error}") from error
        except (TimeoutError, aiohttp.ClientError) as error:
            raise OutcomeUnknown(
                f"lost contact with {base_url} during the request ({type(error).__name__}); "
                "the operation may or may not have been applied"
            ) from error

    async def get_bytes(self, base_url: str, route: str, timeout_s: float) -> bytes:
        async with self._client().get(
            f"{base_url}/v1/internal/{route}", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            response.raise_for_status()
            return await response.read()

    async def get_json(self, base_url: str, route: str, timeout_s: float) -> Any:
        async with self._client().get(
            f"{base_url}/v1/internal/{route}", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            response.raise_for_status()
            return await response.json()


def encode_key_values(items: list[KeyValue]) -> bytes:
    packed: bytes = msgpack.packb([(kv.key, kv.value, kv.version) for kv in items])
    return packed


def decode_key_values(data: bytes) -> list[KeyValue]:
    return [KeyValue(key, value, version) for key, value, version in msgpack.unpackb(data)]
