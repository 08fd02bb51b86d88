"""Router: the KVService of a node. Finds a key's shard, runs the operation on that shard's
leader (here, or by forwarding to the node that leads it), retries across leader changes
within the request deadline, and fans scans out to every shard and merges them in key order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgpack

from kvstore.balancer import plan_changes
from kvstore.commands import Delete, Failed, Put, Txn, decode_command, encode_command
from kvstore.errors import (
    CrossShardTxn,
    InvalidRequest,
    KVError,
    NotFound,
    OutcomeUnknown,
    ShardUnavailable,
    StaleShardMap,
)
from kvstore.meta import MetaStateMachine, decode_meta_command
from kvstore.peer_client import (
    MAX_HOPS,
    NotLeaderHere,
    PeerClient,
    PeerUnreachable,
    decode_key_values,
    encode_key_values,
)
from kvstore.service import (
    Consistency,
    KeyValue,
    KeyVersion,
    Limits,
    RequestContext,
    ScanPage,
    TxnRequest,
    TxnResult,
)
from kvstore.sharding import META_GROUP_ID, ShardMap, ShardSpec
from kvstore.state_machine import KVStateMachine
from raft.core.errors import NotLeader, ProposalDropped
from raft.core.types import NO_NODE, NodeId, node_of
from raft.runtime.host import OutcomeUnknown as RaftOutcomeUnknown
from raft.runtime.host import RaftHost

log = logging.getLogger(__name__)

T = TypeVar("T")
_RETRY_PAUSE_S = (0.02, 0.05, 0.1, 0.2, 0.3)


class Router:
    def __init__(
        self,
        node_id: NodeId,
        host: RaftHost,
        meta: MetaStateMachine,
        shards: dict[int, KVStateMachine],
        limits: Limits,
        request_timeout_s: float,
        *,
        client_url_overrides: dict[NodeId, str] | None = None,
        unsafe_stale_reads: bool = False,
    ) -> None:
        self.node_id = node_id
        self.limits = limits
        self._host = host
        self._meta = meta
        self._shards = shards  # local replicas' state machines, by shard id
        self._timeout_s = request_timeout_s
        self._peers = PeerClient(request_timeout_s)
        self._client_url_overrides = client_url_overrides or {}
        self._unsafe_stale_reads = unsafe_stale_reads  # test-only fault (jepsen_like broken mode)

    async def close(self) -> None:
        await self._peers.close()

    @property
    def shard_map(self) -> ShardMap:
        shard_map = self._meta.shard_map
        if shard_map is None:
            raise ShardUnavailable("this node has no shard map yet; retry shortly")
        return shard_map

    # ------------------------------------------------------------------ KVService
    async def get(self, key: str, consistency: Consistency, ctx: RequestContext) -> KeyValue:
        shard = self.shard_map.shard_for_key(key)
        found = await self._read(shard, consistency, ctx, "get", key.encode(), _one_or_none)
        if found is None:
            raise NotFound(f"key {key!r} does not exist")
        return found

    async def put(
        self, key: str, value: bytes, if_version: int | None, ctx: RequestContext
    ) -> KeyVersion:
        shard = self.shard_map.shard_for_key(key)
        outcome = await self.propose(
            shard.id, encode_command(Put(key, value, if_version, ctx.idempotency_key)), ctx
        )
        assert isinstance(outcome, KeyVersion), outcome
        return outcome

    async def delete(self, key: str, if_version: int | None, ctx: RequestContext) -> KeyVersion:
        shard = self.shard_map.shard_for_key(key)
        outcome = await self.propose(
            shard.id, encode_command(Delete(key, if_version, ctx.idempotency_key)), ctx
        )
        assert isinstance(outcome, KeyVersion), outcome
        return outcome

    async def txn(self, request: TxnRequest, ctx: RequestContext) -> TxnResult:
        keys = {c.key for c in request.compare}
        keys |= {op.key for op in (*request.success, *request.failure)}
        if not keys:
            raise InvalidRequest("a transaction needs at least one compare or operation")
        shard_map = self.shard_map
        shards = {shard_map.shard_for_key(key).id for key in keys}
        if len(shards) > 1:
            raise CrossShardTxn(
                f"the transaction's keys live in {len(shards)} shards ({sorted(shards)}); "
                "a transaction must stay within one shard: split it, or choose keys of one shard"
            )
        outcome = await self.propose(
            shards.pop(), encode_command(Txn(request, ctx.idempotency_key)), ctx
        )
        assert isinstance(outcome, TxnResult), outcome
        return outcome

    async def scan(
        self,
        *,
        prefix: str,
        start: str | None,
        end: str | None,
        limit: int,
        cursor: str | None,
        consistency: Consistency,
        ctx: RequestContext,
    ) -> ScanPage:
        after = decode_cursor(cursor) if cursor else None
        query = msgpack.packb((prefix, start, end, after, limit + 1))
        shard_map = self.shard_map
        pages = await asyncio.gather(
            *(
                self._read(shard, consistency, ctx, "scan", query, decode_key_values)
                for shard in shard_map.shards
            )
        )
        merged = list(itertools.islice(heapq.merge(*pages, key=_key_bytes), limit + 1))
        items = tuple(merged[:limit])
        next_cursor = encode_cursor(items[-1].key) if len(merged) > limit and items else None
        return ScanPage(items, next_cursor)

    async def node_statuses(self, shard_map: ShardMap) -> dict[NodeId, dict[str, Any] | None]:
        """Every node's local Raft status (None: it did not answer within a second)."""

        async def node_status(node_id: NodeId) -> tuple[NodeId, dict[str, Any] | None]:
            if node_id == self.node_id:
                return node_id, self.local_status()
            try:
                return node_id, await self._peers.get_json(
                    self._url_of(node_id), "status", timeout_s=1.0
                )
            except Exception:
                return node_id, None

        return dict(await asyncio.gather(*(node_status(n.id) for n in shard_map.nodes)))

    async def cluster_status(self) -> dict[str, Any]:
        shard_map = self.shard_map
        answers = await self.node_statuses(shard_map)
        shards = []
        healthy = True
        for shard in shard_map.shards:
            replicas = []
            leader, term = NO_NODE, 0
            for replica in shard.replicas:
                node_id = node_of(replica)
                status = (answers.get(node_id) or {}).get("groups", {}).get(str(shard.id))
                if status is None:
                    replicas.append({"node": node_id, "reachable": False})
                    continue
                replicas.append({"node": node_id, "reachable": True, **status})
                if status["role"] == "leader" and status["term"] >= term:
                    leader, term = node_id, status["term"]
            healthy &= leader != NO_NODE
            shards.append(
                {
                    "id": shard.id,
                    "start_token": shard.start_token,
                    "end_token": shard.end_token,
                    "replicas": [node_of(replica) for replica in shard.replicas],
                    "replica_ids": list(shard.replicas),
                    "preferred_leader": node_of(shard.replicas[0]),
                    "leader": leader,
                    "term": term,
                    "replica_status": replicas,
                }
            )
        nodes = [
            {
                "id": n.id,
                "client_url": n.client_url,
                "peer_address": f"{n.peer_address[0]}:{n.peer_address[1]}",
                "reachable": answers.get(n.id) is not None,
                "draining": n.draining,
                "down": n.down,
                "replicas": sum(1 for shard in shard_map.shards_on(n.id)),
                "leads": sum(1 for shard in shards if shard["leader"] == n.id),
            }
            for n in shard_map.nodes
        ]
        moves = [
            {
                "group": move.group,
                "from_node": node_of(move.leaving),
                "to_node": node_of(move.joining),
                "from_replica": move.leaving,
                "to_replica": move.joining,
            }
            for move in shard_map.moves
        ]
        return {
            "cluster_id": "pyraftkv",
            "epoch": shard_map.epoch,
            "nodes": nodes,
            "shards": shards,
            "moves": moves,
            "meta_voters": [node_of(replica) for replica in shard_map.meta_voters],
            # No move in progress or planned, and every shard led by its preferred leader.
            "balanced": not shard_map.moves
            and not plan_changes(shard_map, max_moves=1)
            and all(shard["leader"] == shard["preferred_leader"] for shard in shards),
            "healthy": healthy and all(n["reachable"] for n in nodes),
        }

    def is_ready(self) -> tuple[bool, str]:
        if self._meta.shard_map is None:
            return False, "no shard map yet"
        leaderless = [
            group for group in self._host.group_ids() if self._host.leader_id(group) == NO_NODE
        ]
        if leaderless:
            return False, f"groups without a known leader: {sorted(leaderless)}"
        return True, "every local shard replica knows its leader"

    def _url_of(self, node_id: NodeId) -> str:
        """How this node reaches a peer's HTTP API (through a test proxy when configured)."""
        override = self._client_url_overrides.get(node_id)
        return override if override else self.shard_map.node(node_id).client_url

    # ------------------------------------------------------------------ shard map freshness
    async def check_peer_epoch(self, peer_epoch: int) -> None:
        """A peer forwarded a request made with shard map `peer_epoch`: tell it if it is behind
        us (it refreshes and retries), or catch up ourselves if it is ahead."""
        ours = self.shard_map.epoch
        if peer_epoch < ours:
            raise StaleShardMap(
                f"the request used shard map epoch {peer_epoch}; node {self.node_id} has {ours}"
            )
        if peer_epoch > ours:
            await self.refresh_map()

    async def refresh_map(self) -> bool:
        """Fetch the shard map from the metadata group's members; adopt the newest. Returns
        whether ours changed."""
        shard_map = self.shard_map
        voters = [node_of(replica) for replica in shard_map.meta_voters]
        urls = [self._url_of(node) for node in voters if node != self.node_id]

        async def fetch(url: str) -> ShardMap | None:
            try:
                return ShardMap.decode(await self._peers.get_bytes(url, "shard-map", 2.0))
            except Exception:  # an unreachable member is skipped; others may answer
                return None

        found = [m for m in await asyncio.gather(*(fetch(url) for url in urls)) if m]
        newest = max(found, key=lambda m: m.epoch, default=None)
        changed = newest is not None and self._meta.adopt(newest)
        if changed:
            log.info("node %d adopted shard map epoch %d", self.node_id, self.shard_map.epoch)
        return changed

    # ------------------------------------------------------------------ local status
    def local_status(self) -> dict[str, Any]:
        groups = {}
        for group_id in self._host.group_ids():
            status = self._host.status(group_id)
            groups[str(group_id)] = {
                "role": status.role,
                "term": status.term,
                "leader": node_of(status.leader_id),
                "replica_id": self._host.replica_id(group_id),
                "voters": list(status.voters),
                "learners": list(status.learners),
                "commit_index": status.commit_index,
                "applied_index": status.applied_index,
                "last_index": status.last_index,
            }
        return {"node": self.node_id, "groups": groups}

    # ------------------------------------------------------------------ writes
    async def propose(self, shard_id: int, command: bytes, ctx: RequestContext) -> object:
        """Run a command on the shard's leader; returns its outcome or raises its failure."""
        outcome = await self._on_leader(
            self.shard_map.shard(shard_id),
            ctx,
            lambda: self._propose_here(shard_id, command),
            lambda url, hops, timeout_s: self._forward_propose(
                url, shard_id, command, hops, timeout_s
            ),
            may_retry_remote=False,
        )
        if isinstance(outcome, Failed):
            raise outcome.to_error()
        return outcome

    async def _propose_here(self, shard_id: int, command: bytes) -> object:
        try:
            return await self._host.propose(shard_id, command)
        except RaftOutcomeUnknown as error:
            raise OutcomeUnknown(str(error)) from error

    async def _forward_propose(
        self, url: str, shard_id: int, command: bytes, hops: int, timeout_s: float
    ) -> object:
        from kvstore.commands import decode_outcome

        payload = await self._peers.call(
            url,
            "propose",
            command,
            hops=hops,
            epoch=self.shard_map.epoch,
            timeout_s=timeout_s,
            params={"shard": str(shard_id)},
        )
        return decode_outcome(payload)

    # ------------------------------------------------------------------ reads
    async def _read(
        self,
        shard: ShardSpec,
        consistency: Consistency,
        ctx: RequestContext,
        op: str,
        query: bytes,
        decode: Callable[[bytes], T],
    ) -> T:
        local_ok = consistency is Consistency.STALE or self._unsafe_stale_reads
        if local_ok and shard.id in self._shards:
            return decode(self.read_here(shard.id, op, query))
        return await self._on_leader(
            shard,
            ctx,
            lambda: self._read_here_linearizable(shard.id, op, query, decode),
            lambda url, hops, timeout_s: self._forward_read(
                url, shard.id, op, query, consistency, hops, timeout_s, decode
            ),
            may_retry_remote=True,
            any_replica=consistency is Consistency.STALE,
        )

    async def _read_here_linearizable(
        self, shard_id: int, op: str, query: bytes, decode: Callable[[bytes], T]
    ) -> T:
        await self._host.read_barrier(shard_id)  # §6.4 ReadIndex
        return decode(self.read_here(shard_id, op, query))

    def read_here(self, shard_id: int, op: str, query: bytes) -> bytes:
        """Serve a read from this replica's applied state (the caller ensured consistency)."""
        machine = self._shards.get(shard_id)
        if machine is None:
            raise NotLeaderHere(f"no replica of shard {shard_id} on node {self.node_id}")
        if op == "get":
            try:
                key = query.decode()
            except UnicodeDecodeError as error:
                raise InvalidRequest("a key must be UTF-8") from error
            found = machine.get(key)
            return encode_key_values([found] if found else [])
        if op == "scan":
            prefix, start, end, after, limit = _decode_scan_query(query)
            return encode_key_values(machine.scan(prefix, start, end, after, limit))
        raise InvalidRequest(f"unknown read operation {op!r}")

    async def _forward_read(
        self,
        url: str,
        shard_id: int,
        op: str,
        query: bytes,
        consistency: Consistency,
        hops: int,
        timeout_s: float,
        decode: Callable[[bytes], T],
    ) -> T:
        payload = await self._peers.call(
            url,
            "read",
            query,
            hops=hops,
            epoch=self.shard_map.epoch,
            timeout_s=timeout_s,
            params={"shard": str(shard_id), "op": op, "consistency": consistency.value},
        )
        return decode(payload)

    async def serve_internal_read(
        self, shard_id: int, op: str, query: bytes, consistency: Consistency, hops: int
    ) -> bytes:
        """A read forwarded by a peer: serve it here or pass it on towards the leader."""
        shard = self.shard_map.shard(shard_id)
        local_ok = consistency is Consistency.STALE or self._unsafe_stale_reads
        if local_ok and shard_id in self._shards:
            return self.read_here(shard_id, op, query)
        return await self._on_leader(
            shard,
            RequestContext(hops=hops),
            lambda: self._read_here_linearizable(shard_id, op, query, lambda b: b),
            lambda url, next_hops, timeout_s: self._forward_read(
                url, shard_id, op, query, consistency, next_hops, timeout_s, lambda b: b
            ),
            may_retry_remote=True,
            any_replica=consistency is Consistency.STALE,
        )

    async def serve_internal_propose(self, shard_id: int, command: bytes, hops: int) -> object:
        try:  # refuse garbage before it takes a slot in the Raft log
            if shard_id == META_GROUP_ID:
                decode_meta_command(command)
            else:
                decode_command(command)
        except ValueError as error:
            raise InvalidRequest(f"malformed command: {error}") from error
        return await self.propose(shard_id, command, RequestContext(hops=hops))

    # ------------------------------------------------------------------ leader finding
    async def _on_leader(
        self,
        shard: ShardSpec,
        ctx: RequestContext,
        here: Callable[[], Awaitable[T]],
        remote: Callable[[str, int, float], Awaitable[T]],
        *,
        may_retry_remote: bool,
        any_replica: bool = False,
    ) -> T:
        """Run `here` if this node leads the shard, else `remote` on the node that does;
        follow leader changes until the request deadline, then answer 503."""
        deadline = time.monotonic() + self._timeout_s
        hint = NO_NODE
        last_problem = "no leader known"
        for attempt in itertools.count():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            host = self._host
            local = host.has_group(shard.id)
            if local and (host.is_leader(shard.id) or (any_replica and shard.id in self._shards)):
                try:
                    return await asyncio.wait_for(here(), timeout=remaining)
                except (NotLeader, ProposalDropped) as error:
                    last_problem = f"leadership moved ({type(error).__name__})"
                except TimeoutError as error:
                    if may_retry_remote:  # a read: nothing happened, report unavailable
                        break
                    raise OutcomeUnknown(
                        f"shard {shard.id} did not commit within {self._timeout_s:.0f}s; "
                        "the write may or may not apply: retry with the same Idempotency-Key"
                    ) from error
            else:
                target = self._pick_target(shard, hint, local, attempt)
                if target != NO_NODE and ctx.hops < MAX_HOPS:
                    url = self._url_of(target)
                    try:
                        return await remote(url, ctx.hops + 1, remaining)
                    except NotLeaderHere as error:
                        hint = error.leader_hint if error.leader_hint != target else NO_NODE
                        last_problem = f"node {target} does not lead shard {shard.id}"
                    except PeerUnreachable:
                        hint = NO_NODE
                        last_problem = f"node {target} is unreachable"
                    except StaleShardMap:
                        await self.refresh_map()  # then retry with the fresh replicas
                        shard = self.shard_map.shard(shard.id)
                        last_problem = "our shard map was stale"
                    except ShardUnavailable as error:
                        last_problem = error.message
                    except OutcomeUnknown:
                        if not may_retry_remote:
                            raise
                        last_problem = f"lost contact with node {target}"
                elif ctx.hops >= MAX_HOPS:
                    raise NotLeaderHere(
                        f"node {self.node_id} does not lead shard {shard.id}",
                        node_of(host.leader_id(shard.id)) if local else NO_NODE,
                    )
            pause = _RETRY_PAUSE_S[min(attempt, len(_RETRY_PAUSE_S) - 1)]
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        raise ShardUnavailable(
            f"shard {shard.id} has no reachable leader ({last_problem}); "
            "a majority of its replicas may be down or partitioned: retry shortly",
            retry_after_s=1,
        )

    def _pick_target(self, shard: ShardSpec, hint: NodeId, local: bool, attempt: int) -> NodeId:
        if local:
            leader = node_of(self._host.leader_id(shard.id))
            if leader not in (NO_NODE, self.node_id):
                return leader
            return NO_NODE  # no leader known yet: wait for the election
        if hint != NO_NODE:
            return hint
        others = [node_of(r) for r in shard.replicas if node_of(r) != self.node_id]
        return others[attempt % len(others)] if others else NO_NODE


def _decode_scan_query(query: bytes) -> tuple[str, str | None, str | None, str | None, int]:
    try:
        prefix, start, end, after, limit = msgpack.unpackb(query)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise InvalidRequest(f"malformed scan query: {error}") from error
    optional = (start, end, after)
    if (
        not isinstance(prefix, str)
        or not all(v is None or isinstance(v, str) for v in optional)
        or type(limit) is not int
        or limit < 1
    ):
        raise InvalidRequest("malformed scan query: wrong field types")
    return prefix, start, end, after, limit


def _one_or_none(payload: bytes) -> KeyValue | None:
    items = decode_key_values(payload)
    return items[0] if items else None


def _key_bytes(item: KeyValue) -> bytes:
    return item.key.encode()


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """Strict: only the exact spelling encode_cursor produced (the lenient decoder would
    silently drop stray characters and restart the scan)."""
    try:
        padded = (cursor + "=" * (-len(cursor) % 4)).encode("ascii")
        key = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeError, ValueError) as error:
        raise InvalidRequest(
            "cursor is not one this API returned; pass next_cursor back unchanged"
        ) from error
    if encode_cursor(key) != cursor:
        raise InvalidRequest("cursor is not one this API returned; pass next_cursor back unchanged")
    return key


__all__ = ["KVError", "Router"]
