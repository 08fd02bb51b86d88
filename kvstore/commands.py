"""The commands a shard's Raft log carries, the outcomes applying them produces, and their codec.

Both travel as compact msgpack tuples led by a small int tag (no dicts: this is the hot path).
Decoding never trusts its input: anything malformed raises ValueError. Outcomes are stored for
idempotency, so their encoding is deterministic: every replica writes the same bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgpack

from kvstore.errors import InvalidRequest, KVError, NotFound, PreconditionFailed, StaleShardMap
from kvstore.service import (
    CompareOp,
    CompareTarget,
    KeyVersion,
    TxnCompare,
    TxnOp,
    TxnOpKind,
    TxnOpResult,
    TxnRequest,
    TxnResult,
)


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, not {type(value).__name__}")


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def _check_version(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    # bool is an int subclass; a True version is a caller bug, not version 1
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")


def _check_enum(name: str, value: object, enum_type: type[enum.Enum]) -> None:
    if not isinstance(value, enum_type):
        raise TypeError(f"{name} must be {enum_type.__name__}, not {type(value).__name__}")


def _check_idempotency_key(value: object) -> None:
    if value is not None:
        _check_str("idempotency_key", value)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    if_version: int | None = None  # 0: the key must be absent
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        _check_str("key", self.key)
        _check_bytes("value", self.value)
        _check_version("if_version", self.if_version, optional=True)
        _check_idempotency_key(self.idempotency_key)


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    if_version: int | None = None
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        _check_str("key", self.key)
        _check_version("if_version", self.if_version, optional=True)
        _check_idempotency_key(self.idempotency_key)


@dataclass(frozen=True, slots=True)
class Txn:
    request: TxnRequest
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request, TxnRequest):
            raise TypeError(f"request must be TxnRequest, not {type(self.request).__name__}")
        for compare in self.request.compare:
            if not isinstance(compare, TxnCompare):
                raise TypeError(f"compare must hold TxnCompare, not {type(compare).__name__}")
            _check_str("compare key", compare.key)
            _check_version("compare version", compare.version, optional=False)
            _check_bytes("compare value", compare.value)
            _check_enum("compare target", compare.target, CompareTarget)
            _check_enum("compare op", compare.op, CompareOp)
        for op in (*self.request.success, *self.request.failure):
            if not isinstance(op, TxnOp):
                raise TypeError(f"success/failure must hold TxnOp, not {type(op).__name__}")
            _check_str("op key", op.key)
            _check_bytes("op value", op.value)
            _check_enum("op kind", op.kind, TxnOpKind)
        _check_idempotency_key(self.idempotency_key)


@dataclass(frozen=True, slots=True)
class HashCheck:
    """Admin: every replica hashes its shard's data when it applies this entry, so all of them
    hash the same applied index (`kvctl check` then compares the hashes)."""


@dataclass(frozen=True, slots=True)
class RestoreShard:
    """Admin: replace the shard's data by a backup of it (a KVStateMachine.snapshot() blob)."""

    snapshot: bytes
    replace: bool = False  # False: refused unless the shard is empty

    def __post_init__(self) -> None:
        _check_bytes("snapshot", self.snapshot)
        if not isinstance(self.replace, bool):
            raise TypeError(f"replace must be bool, not {type(self.replace).__name__}")


@dataclass(frozen=True, slots=True)
class PutBatch:
    """Unconditional puts of keys of one shard, applied together at one index: the bulk-load
    path (POST /v1/batch), one Raft entry per shard instead of one per key."""

    items: tuple[tuple[str, bytes], ...]  # (key, value) in request order; a later one wins
    idempotency_key: None = None  # re-running a batch of plain puts leaves the same values

    def __post_init__(self) -> None:
        if not isinstance(self.items, tuple) or not self.items:
            raise TypeError("items must be a non-empty tuple of (key, value)")
        for item in self.items:
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError("items must hold (key, value) pairs")
            _check_str("key", item[0])
            _check_bytes("value", item[1])
        if self.idempotency_key is not None:
            raise TypeError("a batch carries no idempotency key")


_TOKEN_LIMIT = 1 << 64  # tokens are xxh64 values: 0 <= token < 2**64


@dataclass(frozen=True, slots=True)
class SplitShard:
    """Elastic: at this entry every replica hands the keys hashing at or above `split_token`
    (with the shard's idempotency records) to the new shard `child_id`, and keeps the rest; so
    all replicas agree on both halves. See docs/architecture.md, "Shard split"."""

    child_id: int
    split_token: int

    def __post_init__(self) -> None:
        for name, value in (("child_id", self.child_id), ("split_token", self.split_token)):
            if type(value) is not int or not 0 < value < _TOKEN_LIMIT:
                raise ValueError(f"{name} must be an integer in (0, 2**64), got {value!r}")


Command = Put | Delete | Txn | HashCheck | RestoreShard | PutBatch | SplitShard

FAILED_PRECONDITION: Final = "precondition_failed"
FAILED_NOT_FOUND: Final = "not_found"
FAILED_INVALID: Final = "invalid_request"  # the entry held no valid command
FAILED_WRONG_SHARD: Final = "stale_shard_map"  # a key this shard handed over in a split
_FAILURE_CODES = frozenset(
    {FAILED_PRECONDITION, FAILED_NOT_FOUND, FAILED_INVALID, FAILED_WRONG_SHARD}
)


@dataclass(frozen=True, slots=True)
class Failed:
    """A command that applied as a deterministic refusal: every replica computes the same one."""

    code: str  # one of the FAILED_* codes, equal to the matching KVError's `code`
    message: str
    current_version: int = 0  # the key's version when it was refused (0: absent)

    def __post_init__(self) -> None:
        if self.code not in _FAILURE_CODES:
            raise ValueError(f"unknown failure code {self.code!r}")
        _check_str("message", self.message)
        _check_version("current_version", self.current_version, optional=False)

    def to_error(self) -> KVError:
        """The exception the proposer raises to its caller."""
        if self.code == FAILED_PRECONDITION:
            return PreconditionFailed(self.message, self.current_version)
        if self.code == FAILED_NOT_FOUND:
            return NotFound(self.message)
        if self.code == FAILED_WRONG_SHARD:
            return StaleShardMap(self.message)
        return InvalidRequest(self.message)


@dataclass(frozen=True, slots=True)
class ReplicaHash:
    """What one replica found when it applied the HashCheck at `index`."""

    index: int
    key_count: int
    digest: int  # xxh64 over every (key, version, value) in key order; 0 if corrupt_key is set
    corrupt_key: str | None = None  # the first record that failed its checksum

    def __post_init__(self) -> None:
        for name in ("index", "key_count", "digest"):
            _check_version(name, getattr(self, name), optional=False)
        if self.corrupt_key is not None:
            _check_str("corrupt_key", self.corrupt_key)


@dataclass(frozen=True, slots=True)
class Restored:
    """A RestoreShard applied: every restored key now has version `index`."""

    index: int
    key_count: int
    content_digest: int  # xxh64 over every (key, value): equals the backup's, versions aside

    def __post_init__(self) -> None:
        for name in ("index", "key_count", "content_digest"):
            _check_version(name, getattr(self, name), optional=False)


@dataclass(frozen=True, slots=True)
class BatchWritten:
    """A PutBatch applied: every key in it now has this version (the entry's index)."""

    version: int

    def __post_init__(self) -> None:
        _check_version("version", self.version, optional=False)


@dataclass(frozen=True, slots=True)
class SplitApplied:
    """A SplitShard applied: `moved_keys` went to the child shard, `kept_keys` stayed."""

    index: int
    moved_keys: int
    kept_keys: int

    def __post_init__(self) -> None:
        for name in ("index", "moved_keys", "kept_keys"):
            _check_version(name, getattr(self, name), optional=False)


Outcome = KeyVersion | TxnResult | Failed | ReplicaHash | Restored | BatchWritten | SplitApplied
_E = TypeVar("_E", bound=enum.Enum)

# --- Wire tags and enum numbering. Append only: these bytes live in logs and snapshots. ---

_PUT, _DELETE, _TXN, _HASH_CHECK, _RESTORE_SHARD, _PUT_BATCH, _SPLIT_SHARD = 1, 2, 3, 4, 5, 6, 7
_KEY_VERSION, _FAILED, _TXN_RESULT, _REPLICA_HASH, _RESTORED, _BATCH_WRITTEN = 1, 2, 3, 4, 5, 6
_SPLIT_APPLIED = 7
_TARGETS = (CompareTarget.VERSION, CompareTarget.VALUE)
_OPS = (CompareOp.EQUAL, CompareOp.NOT_EQUAL, CompareOp.LESS, CompareOp.GREATER)
_KINDS = (TxnOpKind.PUT, TxnOpKind.DELETE, TxnOpKind.GET)
_TARGET_CODES = {target: code for code, target in enumerate(_TARGETS)}
_OP_CODES = {op: code for code, op in enumerate(_OPS)}
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}


def encode_command(command: Command) -> bytes:
    if isinstance(command, Put):
        fields: tuple[Any, ...] = (
            _PUT,
            command.key,
            command.value,
            command.if_version,
            command.idempotency_key,
        )
    elif isinstance(command, Delete):
        fields = (_DELETE, command.key, command.if_version, command.idempotency_key)
    elif isinstance(command, Txn):
        request = command.request
        fields = (
            _TXN,
            [
                (c.key, _TARGET_CODES[c.target], _OP_CODES[c.op], c.version, c.value)
                for c in request.compare
            ],
            [(_KIND_CODES[op.kind], op.key, op.value) for op in request.success],
            [(_KIND_CODES[op.kind], op.key, op.value) for op in request.failure],
            command.idempotency_key,
        )
    elif isinstance(command, HashCheck):
        fields = (_HASH_CHECK,)
    elif isinstance(command, RestoreShard):
        fields = (_RESTORE_SHARD, command.snapshot, command.replace)
    elif isinstance(command, PutBatch):
        fields = (_PUT_BATCH, command.items)
    elif isinstance(command, SplitShard):
        fields = (_SPLIT_SHARD, command.child_id, command.split_token)
    else:
        raise TypeError(f"not a command: {command!r}")
    packed: bytes = msgpack.packb(fields)
    return packed


def decode_command(data: bytes) -> Command:
    """The command in `data`; ValueError if it is not exactly one well-formed command."""
    fields = _unpack(data)
    try:
        tag = fields[0]
        if tag == _PUT:
            _, key, value, if_version, idempotency_key = fields
            return Put(key, value, if_version, idempotency_key)
        if tag == _DELETE:
            _, key, if_version, idempotency_key = fields
            return Delete(key, if_version, idempotency_key)
        if tag == _TXN:
            _, compares, success, failure, idempotency_key = fields
            request = TxnRequest(
                compare=tuple(
                    TxnCompare(key, _member(_TARGETS, target), _member(_OPS, op), version, value)
                    for key, target, op, version, value in compares
                ),
                success=tuple(_decode_op(op) for op in success),
                failure=tuple(_decode_op(op) for op in failure),
            )
            return Txn(request, idempotency_key)
        if tag == _HASH_CHECK:
            (_,) = fields
            return HashCheck()
        if tag == _RESTORE_SHARD:
            _, snapshot, replace = fields
            return RestoreShard(snapshot, replace)
        if tag == _PUT_BATCH:
            _, items = fields
            return PutBatch(items)
        if tag == _SPLIT_SHARD:
            _, child_id, split_token = fields
            return SplitShard(child_id, split_token)
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"malformed command: {exc}") from exc
    raise ValueError(f"unknown command tag {tag!r}")


def _decode_op(fields: Any) -> TxnOp:
    kind, key, value = fields
    return TxnOp(_member(_KINDS, kind), key, value)


def _member(table: tuple[_E, ...], code: object) -> _E:
    """table[code] for a wire enum code; bools and negative indexes are not codes."""
    if type(code) is not int or not 0 <= code < len(table):
        raise ValueError(f"bad enum code {code!r}")
    return table[code]


def encode_outcome(outcome: Outcome) -> bytes:
    if isinstance(outcome, KeyVersion):
        fields: tuple[Any, ...] = (_KEY_VERSION, outcome.key, outcome.version)
    elif isinstance(outcome, Failed):
        fields = (_FAILED, outcome.code, outcome.message, outcome.current_version)
    elif isinstance(outcome, TxnResult):
        fields = (
            _TXN_RESULT,
            outcome.succeeded,
            [(_KIND_CODES[r.kind], r.key, r.version, r.value) for r in outcome.results],
        )
    elif isinstance(outcome, ReplicaHash):
        fields = (
            _REPLICA_HASH,
            outcome.index,
            outcome.key_count,
            outcome.digest,
            outcome.corrupt_key,
        )
    elif isinstance(outcome, Restored):
        fields = (_RESTORED, outcome.index, outcome.key_count, outcome.content_digest)
    elif isinstance(outcome, BatchWritten):
        fields = (_BATCH_WRITTEN, outcome.version)
    elif isinstance(outcome, SplitApplied):
        fields = (_SPLIT_APPLIED, outcome.index, outcome.moved_keys, outcome.kept_keys)
    else:
        raise TypeError(f"not an outcome: {outcome!r}")
    packed: bytes = msgpack.packb(fields)
    return packed


def decode_outcome(data: bytes) -> Outcome:
    """The outcome in `data`; ValueError if it is not exactly one well-formed outcome."""
    fields = _unpack(data)
    try:
        tag = fields[0]
        if tag == _KEY_VERSION:
            _, key, version = fields
            _check_str("key", key)
            _check_version("version", version, optional=False)
            return KeyVersion(key, version)
        if tag == _FAILED:
            _, code, message, current_version = fields
            return Failed(code, message, current_version)
        if tag == _TXN_RESULT:
            _, succeeded, results = fields
            if not isinstance(succeeded, bool):
                raise TypeError("succeeded must be bool")
            return TxnResult(succeeded, tuple(_decode_op_result(r) for r in results))
        if tag == _REPLICA_HASH:
            _, index, key_count, digest, corrupt_key = fields
            return ReplicaHash(index, key_count, digest, corrupt_key)
        if tag == _RESTORED:
            _, index, key_count, content_digest = fields
            return Restored(index, key_count, content_digest)
        if tag == _BATCH_WRITTEN:
            _, version = fields
            return BatchWritten(version)
        if tag == _SPLIT_APPLIED:
            _, index, moved_keys, kept_keys = fields
            return SplitApplied(index, moved_keys, kept_keys)
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"malformed outcome: {exc}") from exc
    raise ValueError(f"unknown outcome tag {tag!r}")


def _decode_op_result(fields: Any) -> TxnOpResult:
    kind, key, version, value = fields
    _check_str("key", key)
    _check_version("version", version, optional=False)
    if value is not None:
        _check_bytes("value", value)
    return TxnOpResult(_member(_KINDS, kind), key, version, value)


def _unpack(data: bytes) -> tuple[Any, ...]:
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False)
    except (ValueError, TypeError) as exc:  # msgpack's own errors are ValueErrors
        raise ValueError(f"not a msgpack record: {exc}") from exc
    if not isinstance(fields, tuple) or not fields:
        raise ValueError(f"expected a non-empty tuple, got {type(fields).__name__}")
    return fields
