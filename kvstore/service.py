"""The narrow interface the HTTP API needs from the node (implemented by kvstore.router), and
the values crossing it. http_api depends on this, never on the Raft or routing code."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvstore.query.spec import QuerySpec

from kvstore.errors import KVError


class Consistency(enum.Enum):
    LINEARIZABLE = "linearizable"  # ReadIndex on the shard leader (the default)
    STALE = "stale"  # any replica's applied state; may lag


@dataclass(frozen=True, slots=True)
class Limits:
    max_key_bytes: int = 4096
    max_value_bytes: int = 1 << 20
    max_scan_limit: int = 10_000
    default_scan_limit: int = 1000
    max_txn_ops: int = 128
    # A restored shard travels as one Raft entry: keep it well under the transport's frame cap.
    max_shard_backup_bytes: int = 32 << 20
    # Protect the node from one greedy or stuck client (requests beyond: 429) and from a flood
    # of idle sockets (connections beyond are closed at accept).
    max_requests_in_flight_per_client: int = 256
    max_client_connections: int = 1024
    max_batch_puts: int = 10_000  # POST /v1/batch: puts per request
    max_batch_bytes: int = 16 << 20  # POST /v1/batch: the JSON body

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {value!r}")
        if self.default_scan_limit > self.max_scan_limit:
            raise ValueError("limits.default_scan_limit must not exceed limits.max_scan_limit")


@dataclass(frozen=True, slots=True)
class KeyVersion:
    key: str
    version: int  # the shard's Raft index of the key's last write; never reused (no ABA)


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    version: int


@dataclass(frozen=True, slots=True)
class ScanPage:
    items: tuple[KeyValue, ...]
    next_cursor: str | None  # pass back as `cursor` to get the next page; None: no more


class CompareTarget(enum.Enum):
    VERSION = "version"  # compare the key's version (0 = absent)
    VALUE = "value"  # compare the key's value bytes (absent never equals)


class CompareOp(enum.Enum):
    EQUAL = "=="
    NOT_EQUAL = "!="
    LESS = "<"
    GREATER = ">"


@dataclass(frozen=True, slots=True)
class TxnCompare:
    key: str
    target: CompareTarget
    op: CompareOp
    version: int = 0
    value: bytes = b""


class TxnOpKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"
    GET = "get"


@dataclass(frozen=True, slots=True)
class TxnOp:
    kind: TxnOpKind
    key: str
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class TxnRequest:
    compare: tuple[TxnCompare, ...] = ()
    success: tuple[TxnOp, ...] = ()
    failure: tuple[TxnOp, ...] = ()


@dataclass(frozen=True, slots=True)
class TxnOpResult:
    kind: TxnOpKind
    key: str
    version: int = 0  # put: new version; delete: version deleted (0: was absent); get: version
    value: bytes | None = None  # get only; None when absent


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    results: tuple[TxnOpResult, ...] = ()


# A request crosses at most this many node-to-node forwards (any node -> replica -> leader, plus
# one leader change on the way); a client may claim at most MAX_HOPS - 1 already happened.
MAX_HOPS = 3


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Per-request facts the router needs: forwarding hops (to stop loops) and dedup key."""

    hops: int = 0
    idempotency_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class KVService(Protocol):
    limits: Limits

    async def get(self, key: str, consistency: Consistency, ctx: RequestContext) -> KeyValue:
        """Raises NotFound."""
        ...

    async def put(
        self, key: str, value: bytes, if_version: int | None, ctx: RequestContext
    ) -> KeyVersion:
        """Raises PreconditionFailed when if_version is given and differs (0 = must be absent)."""
        ...

    async def delete(self, key: str, if_version: int | None, ctx: RequestContext) -> KeyVersion:
        """Returns the version deleted. Raises NotFound, PreconditionFailed."""
        ...

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
        """Keys in [start, end) having `prefix`, in key order across all shards, after cursor."""
        ...

    async def txn(self, request: TxnRequest, ctx: RequestContext) -> TxnResult:
        """Raises CrossShardTxn when the keys span shards."""
        ...

    def parse_query(self, doc: Any) -> QuerySpec:
        """A query's decoded JSON body, validated against this node's limits and plugins;
        raises InvalidRequest."""
        ...

    async def query(self, spec: QuerySpec, ctx: RequestContext) -> dict[str, Any]:
        """Run a query (docs/query.md); the answer as JSON."""

    async def batch_put(
        self, items: Sequence[tuple[str, bytes]], ctx: RequestContext
    ) -> list[int | KVError]:
        """Unconditional puts, one Raft entry per shard; one result per item, in order: the
        key's new version, or the error that kept its shard's entry from committing."""
        ...

    async def cluster_status(self) -> dict[str, Any]: ...

    def is_ready(self) -> tuple[bool, str]:
        """(ready, reason): ready once the shard map is loaded and local shards know a leader."""
        ...
