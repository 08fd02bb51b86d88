"""Router: the KVService of a node. Finds a key's shard, runs the operation on that shard's
leader (here, or by forwarding to the node that leads it), retries across leader changes
within the request deadline, and fans scans out to every shard and merges them in key order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import msgpack

from kvstore.auth import User
from kvstore.balancer import plan_changes
from kvstore.commands import (
    FAILED_INVALID,
    FAILED_NOT_FOUND,
    FAILED_PRECONDITION,
    FAILED_WRONG_SHARD,
    BatchWritten,
    Delete,
    Failed,
    Put,
    PutBatch,
    Txn,
    decode_command,
    decode_outcome,
    encode_command,
)
from kvstore.errors import (
    CrossShardTxn,
    InvalidRequest,
    KVError,
    NotFound,
    OutcomeUnknown,
    ShardUnavailable,
    StaleShardMap,
)
from kvstore.meta import (
    LAST_ADMIN_REFUSED,
    MetaStateMachine,
    check_meta_command,
    encode_delete_user,
    encode_put_user,
)
from kvstore.peer_client import (
    NotLeaderHere,
    PeerClient,
    PeerUnreachable,
    decode_key_values,
    encode_key_values,
    error_from_code,
)
from kvstore.quarantine import ReplicaQuarantine
from kvstore.query import PluginRegistry, ShardPlan, merge_partials, parse_query
from kvstore.query.results import Partial, ReadPoint, RowsPartial
from kvstore.query.spec import QuerySpec
from kvstore.query_runner import (
    QuerySettings,
    ScanTurns,
    ShardDone,
    ShardEvent,
    read_events,
    scan_shard,
    shard_failure,
)
from kvstore.service import (
    MAX_HOPS,
    Consistency,
    KeyValue,
    KeyVersion,
    Limits,
    RequestContext,
    ScanPage,
    TxnRequest,
    TxnResult,
)
from kvstore.sharding import META_GROUP_ID, ShardMap, ShardSpec, key_token
from kvstore.state_machine import CorruptValueError, KVStateMachine, RangeMovedError
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
        query_settings: QuerySettings | None = None,
        plugins: PluginRegistry | None = None,
        peer_client: PeerClient | None = None,
    ) -> None:
        self.node_id = node_id
        self.limits = limits
        self._host = host
        self._meta = meta
        self._shards = shards  # local replicas' state machines, by shard id
        self._timeout_s = request_timeout_s
        self._peers = peer_client if peer_client is not None else PeerClient(request_timeout_s)
        self._client_url_overrides = client_url_overrides or {}
        self._unsafe_stale_reads = unsafe_stale_reads  # test-only fault (jepsen_like broken mode)
        self.query_settings = query_settings or QuerySettings()
        self._plugins = plugins or PluginRegistry()
        self._scan_threads = concurrent.futures.ThreadPoolExecutor(
            self.query_settings.scan_threads, thread_name_prefix="query-scan"
        )
        self._scan_turns = ScanTurns()
        self.quarantine = ReplicaQuarantine(node_id, host)

    async def close(self) -> None:
        await self._peers.close()
        self._scan_threads.shutdown(wait=False, cancel_futures=True)

    @property
    def host(self) -> RaftHost:
        return self._host

    @property
    def shard_map(self) -> ShardMap:
        shard_map = self._meta.shard_map
        if shard_map is None:
            raise ShardUnavailable("this node has no shard map yet; retry shortly")
        return shard_map

    # ------------------------------------------------------------------ KVService
    async def get(self, key: str, consistency: Consistency, ctx: RequestContext) -> KeyValue:
        found = await self._with_fresh_map(
            lambda: self._read(
                self.shard_map.shard_for_key(key),
                consistency,
                ctx,
                "get",
                key.encode(),
                _one_or_none,
            )
        )
        if found is None:
            raise NotFound(f"key {key!r} does not exist")
        return found

    async def put(
        self, key: str, value: bytes, if_version: int | None, ctx: RequestContext
    ) -> KeyVersion:
        command = encode_command(Put(key, value, if_version, ctx.idempotency_key))
        outcome = await self._propose_for_keys([key], command, ctx)
        return _expect(KeyVersion, outcome, ctx, {FAILED_PRECONDITION})

    async def delete(self, key: str, if_version: int | None, ctx: RequestContext) -> KeyVersion:
        command = encode_command(Delete(key, if_version, ctx.idempotency_key))
        outcome = await self._propose_for_keys([key], command, ctx)
        return _expect(KeyVersion, outcome, ctx, {FAILED_PRECONDITION, FAILED_NOT_FOUND})

    async def txn(self, request: TxnRequest, ctx: RequestContext) -> TxnResult:
        keys = {c.key for c in request.compare}
        keys |= {op.key for op in (*request.success, *request.failure)}
        if not keys:
            raise InvalidRequest("a transaction needs at least one compare or operation")
        command = encode_command(Txn(request, ctx.idempotency_key))
        outcome = await self._propose_for_keys(sorted(keys), command, ctx)
        return _expect(TxnResult, outcome, ctx, set())  # a failed compare is a TxnResult too

    async def _propose_for_keys(
        self, keys: Sequence[str], command: bytes, ctx: RequestContext
    ) -> object:
        """Propose on the one shard that holds `keys` (a Failed outcome is returned, not
        raised); a shard that split them away refuses them, and it goes again with the map
        that has the new shard."""

        async def attempt() -> object:
            shard_map = self.shard_map
            shards = {shard_map.shard_for_key(key).id for key in keys}
            if len(shards) > 1:
                raise CrossShardTxn(
                    f"the transaction's keys live in {len(shards)} shards ({sorted(shards)}); "
                    "a transaction must stay within one shard: split it, or choose keys of one "
                    "shard"
                )
            outcome = await self.propose(shards.pop(), command, ctx, raise_failure=False)
            if isinstance(outcome, Failed) and outcome.code == FAILED_WRONG_SHARD:
                raise outcome.to_error()  # applied nowhere: safe to send again
            return outcome

        return await self._with_fresh_map(attempt)

    async def _with_fresh_map(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` (which resolves shards from the current map each time) until no
        shard refuses it as routed by a stale map, or the request deadline passes. Between a
        split's handover and its FinishSplit the refusal repeats for a moment: the map then
        still shows the old range."""
        deadline = time.monotonic() + self._timeout_s
        for pause in itertools.chain(_RETRY_PAUSE_S, itertools.repeat(_RETRY_PAUSE_S[-1])):
            try:
                return await attempt()
            except StaleShardMap as error:
                if time.monotonic() + pause > deadline:
                    raise ShardUnavailable(
                        f"the shard map stayed stale ({error.message}); retry shortly",
                        retry_after_s=1,
                    ) from error
            if not await self._refresh_map_if_behind():
                await asyncio.sleep(pause)
        raise AssertionError("unreachable: the pauses never end")

    async def _refresh_map_if_behind(self) -> bool:
        """refresh_map, except on the meta leader, whose own map is the newest there is."""
        host = self._host
        if host.has_group(META_GROUP_ID) and host.is_leader(META_GROUP_ID):
            return False
        return await self.refresh_map()

    async def batch_put(
        self, items: Sequence[tuple[str, bytes]], ctx: RequestContext
    ) -> list[int | KVError]:
        results: list[int | KVError] = [ShardUnavailable("not attempted")] * len(items)
        pending = list(range(len(items)))
        deadline = time.monotonic() + self._timeout_s
        while True:
            await self._batch_put_once(items, pending, results, ctx)
            pending = [p for p in pending if isinstance(results[p], StaleShardMap)]
            if not pending or time.monotonic() > deadline:
                return results
            if not await self._refresh_map_if_behind():
                await asyncio.sleep(_RETRY_PAUSE_S[-1])

    async def _batch_put_once(
        self,
        items: Sequence[tuple[str, bytes]],
        pending: Sequence[int],
        results: list[int | KVError],
        ctx: RequestContext,
    ) -> None:
        """Put the pending items, one PutBatch per shard; record each item's result."""
        shard_map = self.shard_map
        positions_by_shard: dict[int, list[int]] = {}
        for position in pending:
            key = items[position][0]
            positions_by_shard.setdefault(shard_map.shard_for_key(key).id, []).append(position)

        async def put_shard(shard_id: int, positions: list[int]) -> int:
            command = PutBatch(tuple(items[position] for position in positions))
            outcome = await self.propose(shard_id, encode_command(command), ctx)
            assert isinstance(outcome, BatchWritten), outcome
            return outcome.version

        answers = await asyncio.gather(
            *(put_shard(shard, positions) for shard, positions in positions_by_shard.items()),
            return_exceptions=True,
        )
        for positions, answer in zip(positions_by_shard.values(), answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, KVError):
                raise answer  # a bug or a cancellation, not an outcome of this shard
            for position in positions:
                results[position] = answer

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

        async def scan_every_shard() -> list[list[KeyValue]]:
            shard_map = self.shard_map
            return await asyncio.gather(
                *(
                    self._read(shard, consistency, ctx, "scan", query, decode_key_values)
                    for shard in shard_map.shards
                )
            )

        pages = await self._with_fresh_map(scan_every_shard)
        merged = list(itertools.islice(heapq.merge(*pages, key=_key_bytes), limit + 1))
        items = tuple(merged[:limit])
        next_cursor = encode_cursor(items[-1].key) if len(merged) > limit and items else None
        return ScanPage(items, next_cursor)

    def parse_query(self, doc: Any) -> QuerySpec:
        return parse_query(doc, self.query_settings.limits, self._plugins)

    async def query(self, spec: QuerySpec, ctx: RequestContext) -> dict[str, Any]:
        """POST /v1/query: the plan runs on every shard at once (each at its own read point),
        and the partials merge here; again with a fresh map if a shard split meanwhile."""
        return await self._with_fresh_map(lambda: self._query_every_shard(spec, ctx))

    async def _query_every_shard(self, spec: QuerySpec, ctx: RequestContext) -> dict[str, Any]:
        settings = self.query_settings
        shards = self.shard_map.shards
        budget = settings.shard_budget_bytes(len(shards))
        scanners = self._spread_scans(shards)
        answers = await asyncio.gather(
            *(self._query_shard(shard, scanners[shard.id], spec, budget, ctx) for shard in shards),
            return_exceptions=True,
        )
        partials: list[Partial] = []
        points: list[ReadPoint] = []
        failed: dict[int, str] = {}
        cut_after: str | None = None
        for shard, answer in zip(shards, answers, strict=True):
            if isinstance(answer, InvalidRequest | StaleShardMap):
                raise answer  # the query itself is at fault, or the map it was planned on
            if isinstance(answer, KVError):
                failed[shard.id] = answer.message
                continue
            if isinstance(answer, BaseException):
                raise answer
            partials.extend(answer.partials)
            points.append(ReadPoint(shard.id, answer.node, answer.applied_index))
            if answer.last_row_key is not None:
                cut_after = min(cut_after or answer.last_row_key, answer.last_row_key)
        if failed and not spec.allow_partial:
            reasons = "; ".join(f"shard {shard}: {message}" for shard, message in failed.items())
            raise ShardUnavailable(
                f"{len(failed)} of {len(shards)} shards did not answer ({reasons}); retry, or "
                "set allow_partial to answer without them"
            )
        result = merge_partials(
            spec,
            partials,
            limits=settings.limits,
            missing_shards=failed,
            plugins=self._plugins,
            cut_after=cut_after,
        )
        answer_json = replace(result, stats=replace(result.stats, read_points=tuple(points)))
        document = answer_json.to_json()
        document["shard_errors"] = [
            {"shard": shard, "message": message} for shard, message in sorted(failed.items())
        ]
        return document

    def _spread_scans(self, shards: Sequence[ShardSpec]) -> dict[int, NodeId]:
        """Which replica scans each shard: as even a number per node as the replicas allow, so
        the scans run in parallel in several processes even when one node leads most shards.
        Ties go to the known leader (no read-point round trip), then to this node."""
        scans: Counter[NodeId] = Counter()
        chosen: dict[int, NodeId] = {}
        for shard in shards:
            leader = self._leader_node(shard.id)
            node = min(
                (node_of(replica) for replica in shard.replicas),
                key=lambda n: (scans[n], n != leader, n != self.node_id, n),
            )
            scans[node] += 1
            chosen[shard.id] = node
        return chosen

    async def _query_shard(
        self,
        shard: ShardSpec,
        scanner: NodeId,
        spec: QuerySpec,
        budget: int,
        ctx: RequestContext,
    ) -> _ShardAnswer:
        """Scan the shard on `scanner` (a follower first gets the leader's read point); if that
        node cannot, on the shard's leader, following leader changes."""
        plan = ShardPlan.for_shard(spec, shard.id, self.query_settings.limits)
        timeout_s = self.query_settings.timeout_s
        started = time.monotonic()
        answer: _ShardAnswer | None = None
        try:
            if scanner == self.node_id:
                answer = await asyncio.wait_for(self._query_here(plan, budget, True), timeout_s)
            else:
                answer = await self._query_remote(
                    self._url_of(scanner), plan, budget, ctx.hops + 1, timeout_s, follower=True
                )
        except InvalidRequest:
            raise
        except (KVError, PeerUnreachable, NotLeader) as error:
            log.info(
                "shard %d: node %d cannot scan it (%s); the leader will",
                *(shard.id, scanner, error),
            )
        except TimeoutError:
            raise ShardUnavailable(
                f"shard {shard.id} did not answer within the query timeout of {timeout_s:.0f}s"
            ) from None
        if answer is None:
            answer = await self._on_leader(
                shard,
                ctx,
                lambda: self._query_here(plan, budget),
                lambda url, hops, timeout: self._query_remote(url, plan, budget, hops, timeout),
                may_retry_remote=True,
                any_replica=spec.consistency is Consistency.STALE,
                work_timeout_s=timeout_s,
            )
        last = answer.partials[-1]  # every shard answer has at least one chunk
        elapsed = replace(last.stats, elapsed_s=time.monotonic() - started)
        answer.partials[-1] = replace(last, stats=elapsed)
        return answer

    async def _query_here(
        self, plan: ShardPlan, budget: int, follower: bool = False
    ) -> _ShardAnswer:
        events = await self._shard_events(plan, budget, follower)
        try:
            return await _ShardAnswer.collect(self.node_id, events)
        except (KVError, CorruptValueError, ValueError) as error:
            raise self.scan_failure(error, plan.shard) from error

    def scan_failure(self, error: BaseException, shard_id: int) -> KVError:
        """What a failed shard scan answers; a checksum failure quarantines this replica."""
        if isinstance(error, CorruptValueError):
            return self.quarantine.report(shard_id, error.key, str(error))
        return shard_failure(error, shard_id)

    async def _query_remote(
        self,
        url: str,
        plan: ShardPlan,
        budget: int,
        hops: int,
        timeout_s: float,
        *,
        follower: bool = False,
    ) -> _ShardAnswer:
        spec = plan.spec
        async with self._peers.open_stream(
            url,
            "query",
            msgpack.packb(plan.to_wire()),
            hops=hops,
            epoch=self.shard_map.epoch,
            timeout_s=timeout_s,
            params={
                "shard": str(plan.shard),
                "consistency": spec.consistency.value,
                "budget": str(budget),
                "follower": "1" if follower else "0",
            },
        ) as (node, stream):
            events = read_events(
                stream.readexactly,
                spec,
                settings=self.query_settings,
                plugins=self._plugins,
                error_of=error_from_code,
            )
            return await _ShardAnswer.collect(node, events)

    async def serve_internal_query(
        self,
        shard_id: int,
        plan_bytes: bytes,
        consistency: Consistency,
        budget: int,
        *,
        follower: bool,
    ) -> AsyncGenerator[ShardEvent, None]:
        """A shard plan sent by a coordinator: refuse it now (not leader, bad plan, no read
        point) or return the stream of its answer. `follower`: any replica may serve it, at
        the leader's read point."""
        try:
            plan = ShardPlan.from_wire(
                msgpack.unpackb(plan_bytes, use_list=False),
                self.query_settings.limits,
                self._plugins,
            )
        except (ValueError, TypeError, msgpack.UnpackException) as error:
            raise InvalidRequest(f"malformed shard plan: {error}") from error
        if plan.shard != shard_id or plan.spec.consistency is not consistency:
            raise InvalidRequest("the shard plan does not match the request parameters")
        leads = self._host.has_group(shard_id) and self._host.is_leader(shard_id)
        any_replica = consistency is Consistency.STALE or follower
        if not leads and not (any_replica and shard_id in self._shards):
            hint = self._leader_node(shard_id)
            raise NotLeaderHere(f"node {self.node_id} does not lead shard {shard_id}", hint)
        try:
            return await asyncio.wait_for(
                self._shard_events(plan, budget, follower), self._timeout_s
            )
        except NotLeader as error:
            raise NotLeaderHere(str(error), node_of(error.leader_hint)) from error
        except TimeoutError:
            raise ShardUnavailable(
                f"shard {shard_id} could not confirm a read point within {self._timeout_s:.0f}s"
            ) from None

    async def _shard_events(
        self, plan: ShardPlan, budget: int, follower: bool = False
    ) -> AsyncGenerator[ShardEvent, None]:
        machine = self._shards.get(plan.shard)
        if machine is None:
            raise NotLeaderHere(f"no replica of shard {plan.shard} on node {self.node_id}")
        self.quarantine.refuse_if_quarantined(plan.shard)
        if plan.spec.consistency is Consistency.LINEARIZABLE:
            if follower and not self._host.is_leader(plan.shard):
                await self._wait_applied(machine, await self._leader_read_point(plan.shard))
            else:
                await self._host.read_barrier(plan.shard)  # §6.4 ReadIndex: the read point
        return scan_shard(
            machine,
            plan,
            settings=self.query_settings,
            plugins=self._plugins,
            budget_bytes=budget,
            executor=self._scan_threads,
            must_hold=self._span_read_by(machine, "scan", b""),
            drop_outside=self._was_split(plan.shard),
            turns=self._scan_turns,
        )

    async def _leader_read_point(self, shard_id: int) -> int:
        """A follower read (§6.4.1): the leader confirms its leadership (ReadIndex) and names
        its applied index; once this replica has applied that far, its state is as new as any
        write acknowledged before the read began."""
        shard = self.shard_map.shard(shard_id)
        return await self._read(
            shard, Consistency.LINEARIZABLE, RequestContext(), "applied", b"", msgpack.unpackb
        )

    async def _wait_applied(self, machine: KVStateMachine, index: int) -> None:
        deadline = time.monotonic() + self._timeout_s
        while (applied := machine.applied_index()) < index:
            if time.monotonic() > deadline:
                raise ShardUnavailable(
                    f"shard {machine.shard_id}'s replica on node {self.node_id} stays behind "
                    f"the read point (applied {applied} < {index})"
                )
            await asyncio.sleep(0.002)

    async def snapshot_shard(self, shard_id: int) -> bytes:
        """A backup of one shard: its leader's snapshot() after a ReadIndex barrier, so it holds
        every write acknowledged before the call."""
        shard = self.shard_map.shard(shard_id)
        ctx = RequestContext()
        return await self._read(shard, Consistency.LINEARIZABLE, ctx, "snapshot", b"", _same)

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
        splits = [
            {"shard": split.shard, "child": split.child_id, "split_token": split.split_token}
            for split in shard_map.splits
        ]
        return {
            "cluster_id": "pyraftkv",
            "epoch": shard_map.epoch,
            "nodes": nodes,
            "shards": shards,
            "moves": moves,
            "splits": splits,
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

    async def ask_peer(self, node_id: NodeId, route: str, timeout_s: float) -> Any:
        """GET /v1/internal/{route} on a peer; its JSON answer."""
        return await self._peers.get_json(self._url_of(node_id), route, timeout_s=timeout_s)

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
                "quarantined": status.is_quarantined,
            }
            machine = self._shards.get(group_id)
            if machine is not None:  # what an automatic split looks at
                groups[str(group_id)]["key_count"] = machine.count()
        return {"node": self.node_id, "groups": groups}

    # ------------------------------------------------------------------ writes
    async def propose(
        self, shard_id: int, command: bytes, ctx: RequestContext, *, raise_failure: bool = True
    ) -> object:
        """Run a command on the shard's leader; returns its outcome or raises its failure
        (returns it, when not raise_failure)."""
        if shard_id == META_GROUP_ID:
            return await self.propose_meta(command, ctx)
        outcome = await self._on_leader(
            self.shard_map.shard(shard_id),
            ctx,
            lambda: self._propose_here(shard_id, command),
            lambda url, hops, timeout_s: self._forward_propose(
                url, shard_id, command, hops, timeout_s
            ),
            may_retry_remote=False,
        )
        if raise_failure and isinstance(outcome, Failed):
            raise outcome.to_error()
        return outcome

    async def propose_meta(
        self, command: bytes, ctx: RequestContext, *, raise_failure: bool = True
    ) -> object:
        """Run a command on the metadata group's leader; returns its apply result: a user
        command's str, or a map change's KeyVersion (the new epoch), or raises its Failed
        (returns it, when not raise_failure)."""
        outcome = await self._on_leader(
            self.shard_map.group(META_GROUP_ID),
            ctx,
            lambda: self._propose_here(META_GROUP_ID, command),
            lambda url, hops, timeout_s: self._forward_meta(url, command, hops, timeout_s),
            may_retry_remote=False,
        )
        if raise_failure and isinstance(outcome, Failed):
            raise outcome.to_error()
        return outcome

    async def _forward_meta(self, url: str, command: bytes, hops: int, timeout_s: float) -> object:
        payload = await self._forward_command(url, META_GROUP_ID, command, hops, timeout_s)
        result = msgpack.unpackb(payload)
        # A user command answers a scalar; a map change an encoded outcome (a list).
        return decode_outcome(payload) if isinstance(result, list) else result

    async def _forward_command(
        self, url: str, group_id: int, command: bytes, hops: int, timeout_s: float
    ) -> bytes:
        """POSTs a command for a group (a shard, or the metadata group) to the node at url."""
        return await self._peers.call(
            url,
            "propose",
            command,
            hops=hops,
            epoch=self.shard_map.epoch,
            timeout_s=timeout_s,
            params={"shard": str(group_id)},
        )

    # ------------------------------------------------------------------ users (auth.UserAdmin)
    async def put_user(self, user: User) -> None:
        await self.propose_meta(encode_put_user(user), RequestContext())

    async def delete_user(self, name: str) -> None:
        result = await self.propose_meta(encode_delete_user(name), RequestContext())
        if result == "absent":
            raise NotFound(f"there is no user {name!r}")
        if result == LAST_ADMIN_REFUSED:
            raise InvalidRequest(f"user {name!r} is the last admin; add another admin first")

    async def _propose_here(self, shard_id: int, command: bytes) -> object:
        try:
            return await self._host.propose(shard_id, command)
        except RaftOutcomeUnknown as error:
            raise OutcomeUnknown(str(error)) from error

    async def _forward_propose(
        self, url: str, shard_id: int, command: bytes, hops: int, timeout_s: float
    ) -> object:
        return decode_outcome(await self._forward_command(url, shard_id, command, hops, timeout_s))

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
        if local_ok and self._serves_here(shard.id):
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

    def _serves_here(self, shard_id: int) -> bool:
        return shard_id in self._shards and not self.quarantine.is_quarantined(shard_id)

    def read_here(self, shard_id: int, op: str, query: bytes) -> bytes:
        """Serve a read from this replica's applied state (the caller ensured consistency).
        A checksum failure quarantines the replica and answers ReplicaCorrupted."""
        machine = self._shards.get(shard_id)
        if machine is None:
            raise NotLeaderHere(f"no replica of shard {shard_id} on node {self.node_id}")
        self.quarantine.refuse_if_quarantined(shard_id)
        must_hold = self._span_read_by(machine, op, query)
        try:
            return _read_from(machine, op, query, must_hold, self._was_split(shard_id))
        except CorruptValueError as error:
            raise self.quarantine.report(shard_id, error.key, str(error)) from error
        except RangeMovedError as moved:
            start, end = moved.held
            if op == "get":
                message = f"key {query!r} left shard {machine.shard_id} in a split"
            else:
                message = (
                    f"shard {machine.shard_id} split: it holds tokens [{start}, {end}), the map "
                    f"(epoch {self.shard_map.epoch}) gives it {must_hold}"
                )
            raise StaleShardMap(message + "; refresh the map") from None

    def _was_split(self, shard_id: int) -> bool:
        """The map shows shard_id split: a replica of it that has not applied that split yet
        (a lagging follower, serving a stale read) still holds keys the child serves now, and
        a scan there leaves them out instead of returning them twice."""
        return any(split.shard == shard_id for split in self.shard_map.finished_splits)

    def _span_read_by(
        self, machine: KVStateMachine, op: str, query: bytes
    ) -> tuple[int, int] | None:
        """The tokens a get or scan needs this replica to hold, checked in the read's own
        transaction: a get its key's; a scan the whole range the map gives the shard (a replica
        that handed part of it to a split child, the map here not showing the child yet,
        refuses)."""
        if op == "get":
            try:
                token = key_token(query.decode())
            except UnicodeDecodeError as error:
                raise InvalidRequest("a key must be UTF-8") from error
            return token, token + 1
        if op == "scan":
            try:
                spec = self.shard_map.shard(machine.shard_id)
            except KeyError:
                message = f"shard {machine.shard_id} is not in this node's map yet"
                raise StaleShardMap(message) from None
            return spec.start_token, spec.end_token
        return None

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
        if local_ok and self._serves_here(shard_id):
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
        if shard_id == META_GROUP_ID:
            try:
                check_meta_command(command)
            except ValueError as error:
                raise InvalidRequest(str(error)) from error
            ctx = RequestContext(hops=hops)
            return await self.propose_meta(command, ctx, raise_failure=False)
        try:
            decode_command(command)  # refuse garbage before it takes a slot in the Raft log
        except ValueError as error:
            raise InvalidRequest(f"malformed command: {error}") from error
        # The outcome, failures included, goes back to the forwarding node to judge.
        ctx = RequestContext(hops=hops)
        return await self.propose(shard_id, command, ctx, raise_failure=False)

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
        work_timeout_s: float | None = None,
    ) -> T:
        """Run `here` if this node leads the shard, else `remote` on the node that does;
        follow leader changes until the request deadline, then answer 503. Finding the leader
        takes at most the request timeout; the work itself, `work_timeout_s` if given."""
        deadline = time.monotonic() + self._timeout_s
        hint = NO_NODE
        last_problem = "no leader known"
        for attempt in itertools.count():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            host = self._host
            # A quarantined replica is no replica here: ask the others.
            local = host.has_group(shard.id) and not self.quarantine.is_quarantined(shard.id)
            if local and (host.is_leader(shard.id) or (any_replica and shard.id in self._shards)):
                try:
                    return await asyncio.wait_for(here(), timeout=work_timeout_s or remaining)
                except (NotLeader, ProposalDropped) as error:
                    last_problem = f"leadership moved ({type(error).__name__})"
                except TimeoutError as error:
                    if may_retry_remote:  # a read: nothing happened, report unavailable
                        last_problem = "it did not answer in time"
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
                        return await remote(url, ctx.hops + 1, work_timeout_s or remaining)
                    except NotLeaderHere as error:
                        hint = error.leader_hint if error.leader_hint != target else NO_NODE
                        last_problem = f"node {target} does not lead shard {shard.id}"
                    except PeerUnreachable:
                        hint = NO_NODE
                        last_problem = f"node {target} is unreachable"
                    except StaleShardMap:
                        await self.refresh_map()  # then retry with the fresh replicas
                        fresh = self.shard_map.group(shard.id)
                        if (fresh.start_token, fresh.end_token) != (
                            shard.start_token,
                            shard.end_token,
                        ):
                            raise  # split: the caller finds the keys' shards again
                        shard = fresh
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
                        self._leader_node(shard.id) if local else NO_NODE,
                    )
            pause = _RETRY_PAUSE_S[min(attempt, len(_RETRY_PAUSE_S) - 1)]
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        raise ShardUnavailable(
            f"shard {shard.id} has no reachable leader ({last_problem}); "
            "a majority of its replicas may be down or partitioned: retry shortly",
            retry_after_s=1,
        )

    def _leader_node(self, shard_id: int) -> NodeId:
        """The node whose replica leads the shard, as far as this node's replica knows."""
        if not self._host.has_group(shard_id):
            return NO_NODE
        return node_of(self._host.leader_id(shard_id))

    def _pick_target(self, shard: ShardSpec, hint: NodeId, local: bool, attempt: int) -> NodeId:
        if local:
            leader = self._leader_node(shard.id)
            if leader not in (NO_NODE, self.node_id):
                return leader
            return NO_NODE  # no leader known yet: wait for the election
        if hint != NO_NODE:
            return hint
        others = [node_of(r) for r in shard.replicas if node_of(r) != self.node_id]
        return others[attempt % len(others)] if others else NO_NODE


@dataclass(slots=True)
class _ShardAnswer:
    node: NodeId  # the node that scanned the shard
    partials: list[Partial]
    applied_index: int
    last_row_key: str | None  # set when rows stopped at the byte budget: the page ends there

    @classmethod
    async def collect(cls, node: NodeId, events: AsyncGenerator[ShardEvent, None]) -> _ShardAnswer:
        partials: list[Partial] = []
        async with contextlib.aclosing(events):
            async for event in events:
                if not isinstance(event, ShardDone):
                    partials.append(event)
                    continue
                last_key = None
                if event.truncated:
                    rows = [p.rows for p in partials if isinstance(p, RowsPartial) and p.rows]
                    last_key = rows[-1][-1][0] if rows else None
                return cls(node, partials, event.applied_index, last_key)
        raise ShardUnavailable(f"node {node}'s answer ended before it was complete")


def _read_from(
    machine: KVStateMachine,
    op: str,
    query: bytes,
    must_hold: tuple[int, int] | None = None,
    drop_outside: bool = False,
) -> bytes:
    if op == "get":
        try:
            key = query.decode()
        except UnicodeDecodeError as error:
            raise InvalidRequest("a key must be UTF-8") from error
        found = machine.get(key, must_hold=must_hold)
        return encode_key_values([found] if found else [])
    if op == "scan":
        prefix, start, end, after, limit = _decode_scan_query(query)
        scanned = machine.scan(
            prefix, start, end, after, limit, must_hold=must_hold, drop_outside=drop_outside
        )
        return encode_key_values(scanned)
    if op == "applied":  # a read point for a follower read
        packed: bytes = msgpack.packb(machine.applied_index())
        return packed
    if op == "snapshot":  # a backup: data and applied index from one read transaction
        return machine.snapshot()
    raise InvalidRequest(f"unknown read operation {op!r}")


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


def _expect(kind: type[T], outcome: object, ctx: RequestContext, failures: set[str]) -> T:
    """The outcome, when of the kind the request produces; raises the failures it can have.
    Anything else can only be the outcome recorded for the request's Idempotency-Key by a
    different kind of request (the state machine answers a repeated key with its record)."""
    if isinstance(outcome, Failed) and outcome.code in {*failures, FAILED_INVALID}:
        raise outcome.to_error()
    if not isinstance(outcome, kind):
        raise InvalidRequest(
            f"Idempotency-Key {ctx.idempotency_key!r} was first used by a different kind of "
            "request, whose outcome it holds; use a new key for a new request"
        )
    return outcome


def _same(payload: bytes) -> bytes:
    return payload


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
