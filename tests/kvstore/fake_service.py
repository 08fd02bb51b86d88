"""An in-memory KVService for HTTP tests: one global version counter, two "shards".

It follows the docstrings of kvstore.service: a version is the (fake) Raft index of a key's last
write, so every write takes the next number and none is reused; a transaction is one entry, so
all its writes share one version. Keys starting with "other-shard/" live on a second shard, which
is all CrossShardTxn needs. Successful writes are remembered by idempotency key: a retry returns
the first outcome without writing again, even for a different request (as the state machine).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from kvstore.errors import (
    CrossShardTxn,
    InvalidRequest,
    KVError,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
)
from kvstore.query import ShardPlan, execute_on_rows, merge_partials, parse_query
from kvstore.query.spec import QuerySpec
from kvstore.service import (
    CompareOp,
    CompareTarget,
    Consistency,
    KeyValue,
    KeyVersion,
    Limits,
    RequestContext,
    ScanPage,
    TxnCompare,
    TxnOp,
    TxnOpKind,
    TxnOpResult,
    TxnRequest,
    TxnResult,
)

_Outcome = TypeVar("_Outcome")
OTHER_SHARD_PREFIX = "other-shard/"
_CURSOR_PREFIX = b"after:"


@dataclass(frozen=True)
class Call:
    """One call the HTTP layer made, for tests that check what was passed through."""

    method: str
    args: dict[str, Any]
    ctx: RequestContext | None


@dataclass
class FakeKVService:
    limits: Limits = field(default_factory=Limits)
    # Raised by every service call while set (to test error mapping).
    failure: BaseException | None = None
    ready: tuple[bool, str] = (True, "")
    status: dict[str, Any] = field(
        default_factory=lambda: {"node_id": 1, "shards": [{"shard_id": 0, "leader_id": 1}]}
    )
    calls: list[Call] = field(default_factory=list)
    cluster_status_gate: asyncio.Event | None = None
    cluster_status_entered: asyncio.Queue[None] | None = None
    # Invariant: every stored version <= last_version.
    last_version: int = 0
    _data: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    _remembered: dict[str, tuple[tuple[Any, ...], Any]] = field(default_factory=dict)

    # --- helpers for tests ---

    def shard_of(self, key: str) -> int:
        return 1 if key.startswith(OTHER_SHARD_PREFIX) else 0

    def stored(self, key: str) -> tuple[bytes, int] | None:
        return self._data.get(key)

    # --- KVService ---

    async def get(self, key: str, consistency: Consistency, ctx: RequestContext) -> KeyValue:
        self._enter("get", ctx, key=key, consistency=consistency)
        found = self._data.get(key)
        if found is None:
            raise NotFound(f"key {key!r} not found")
        return KeyValue(key, found[0], found[1])

    async def put(
        self, key: str, value: bytes, if_version: int | None, ctx: RequestContext
    ) -> KeyVersion:
        self._enter("put", ctx, key=key, value=value, if_version=if_version)
        self._check_key(key)
        if len(value) > self.limits.max_value_bytes:
            raise PayloadTooLarge("value too large")

        def write() -> KeyVersion:
            self._check_version(key, if_version)
            version = self._next_version()
            self._data[key] = (value, version)
            return KeyVersion(key, version)

        return self._once(ctx, ("put", key, value, if_version), write)

    async def delete(self, key: str, if_version: int | None, ctx: RequestContext) -> KeyVersion:
        self._enter("delete", ctx, key=key, if_version=if_version)

        def write() -> KeyVersion:
            if key not in self._data:  # as the state machine: absence first, then if_version
                raise NotFound(f"key {key!r} not found")
            self._check_version(key, if_version)
            found = self._data.pop(key)
            self._next_version()  # a delete is a log entry too
            return KeyVersion(key, found[1])

        return self._once(ctx, ("delete", key, if_version), write)

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
        self._enter(
            "scan",
            ctx,
            prefix=prefix,
            start=start,
            end=end,
            limit=limit,
            cursor=cursor,
            consistency=consistency,
        )
        after = None if cursor is None else _decode_cursor(cursor)
        # NB: str order is code point order, which equals UTF-8 byte order.
        keys = sorted(
            key
            for key in self._data
            if key.startswith(prefix)
            and (start is None or key >= start)
            and (end is None or key < end)
            and (after is None or key > after)
        )
        page = keys[:limit]
        items = tuple(KeyValue(key, *self._data[key]) for key in page)
        next_cursor = _encode_cursor(page[-1]) if len(keys) > limit else None
        return ScanPage(items, next_cursor)

    async def txn(self, request: TxnRequest, ctx: RequestContext) -> TxnResult:
        self._enter("txn", ctx, request=request)
        keys = [c.key for c in request.compare]
        keys += [op.key for op in (*request.success, *request.failure)]
        if len({self.shard_of(key) for key in keys}) > 1:
            raise CrossShardTxn("the transaction's keys span more than one shard")

        def run() -> TxnResult:
            succeeded = all(self._holds(compare) for compare in request.compare)
            ops = request.success if succeeded else request.failure
            has_writes = any(op.kind is not TxnOpKind.GET for op in ops)
            version = self._next_version() if has_writes else 0  # one entry: one index
            return TxnResult(succeeded, tuple(self._apply(op, version) for op in ops))

        return self._once(ctx, ("txn", request), run)

    def parse_query(self, doc: Any) -> QuerySpec:
        return parse_query(doc)

    async def query(self, spec: QuerySpec, ctx: RequestContext) -> dict[str, Any]:
        """The real query engine over this fake's data as one shard."""
        self._enter("query", ctx, spec=spec)
        rows = [(key, self._data[key][0]) for key in sorted(self._data)]
        partial = execute_on_rows(ShardPlan.for_shard(spec, 0), rows)
        return merge_partials(spec, [partial]).to_json()

    async def batch_put(
        self, items: Sequence[tuple[str, bytes]], ctx: RequestContext
    ) -> list[int | KVError]:
        self._enter("batch_put", ctx, items=list(items))
        version_by_shard: dict[int, int] = {}  # one entry per shard: one version
        results: list[int | KVError] = []
        for key, value in items:
            shard = self.shard_of(key)
            if shard not in version_by_shard:
                version_by_shard[shard] = self._next_version()
            self._data[key] = (value, version_by_shard[shard])
            results.append(version_by_shard[shard])
        return results

    async def cluster_status(self) -> dict[str, Any]:
        self._enter("cluster_status", None)
        if self.cluster_status_entered is not None:
            self.cluster_status_entered.put_nowait(None)
        if self.cluster_status_gate is not None:  # lets a test hold requests in flight
            await self.cluster_status_gate.wait()
        return self.status

    def is_ready(self) -> tuple[bool, str]:
        return self.ready

    # --- internals ---

    def _enter(self, method: str, ctx: RequestContext | None, **args: Any) -> None:
        self.calls.append(Call(method, args, ctx))
        if self.failure is not None:
            raise self.failure

    def _check_key(self, key: str) -> None:
        if not key or "\x00" in key:
            raise InvalidRequest("bad key")
        if len(key.encode("utf-8")) > self.limits.max_key_bytes:
            raise PayloadTooLarge("key too large")

    def _next_version(self) -> int:
        self.last_version += 1
        return self.last_version

    def _version_of(self, key: str) -> int:
        found = self._data.get(key)
        return 0 if found is None else found[1]

    def _check_version(self, key: str, if_version: int | None) -> None:
        current = self._version_of(key)
        if if_version is not None and if_version != current:
            raise PreconditionFailed(
                f"key {key!r} is at version {current}, not {if_version}", current
            )

    def _once(
        self, ctx: RequestContext, fingerprint: tuple[Any, ...], write: Callable[[], _Outcome]
    ) -> _Outcome:
        key = ctx.idempotency_key
        if key is not None and key in self._remembered:
            _, outcome = self._remembered[key]  # as the state machine: the first outcome
            return cast(_Outcome, outcome)
        outcome = write()
        if key is not None:
            self._remembered[key] = (fingerprint, outcome)
        return outcome

    def _holds(self, compare: TxnCompare) -> bool:
        found = self._data.get(compare.key)
        if compare.target is CompareTarget.VERSION:
            actual: Any = self._version_of(compare.key)
            expected: Any = compare.version
        elif found is None:  # an absent value never equals anything
            return compare.op is CompareOp.NOT_EQUAL
        else:
            actual, expected = found[0], compare.value
        match compare.op:
            case CompareOp.EQUAL:
                return bool(actual == expected)
            case CompareOp.NOT_EQUAL:
                return bool(actual != expected)
            case CompareOp.LESS:
                return bool(actual < expected)
            case CompareOp.GREATER:
                return bool(actual > expected)

    def _apply(self, op: TxnOp, version: int) -> TxnOpResult:
        match op.kind:
            case TxnOpKind.PUT:
                self._data[op.key] = (op.value, version)
                return TxnOpResult(op.kind, op.key, version)
            case TxnOpKind.DELETE:
                found = self._data.pop(op.key, None)
                return TxnOpResult(op.kind, op.key, 0 if found is None else found[1])
            case TxnOpKind.GET:
                found = self._data.get(op.key)
                if found is None:
                    return TxnOpResult(op.kind, op.key, 0, None)
                return TxnOpResult(op.kind, op.key, found[1], found[0])


def _encode_cursor(last_key: str) -> str:
    return base64.urlsafe_b64encode(_CURSOR_PREFIX + last_key.encode("utf-8")).decode("ascii")


def _decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii"))
        if not raw.startswith(_CURSOR_PREFIX):
            raise ValueError(cursor)
        return raw[len(_CURSOR_PREFIX) :].decode("utf-8")
    except (ValueError, binascii.Error):
        raise InvalidRequest("cursor is not one this service issued") from None
