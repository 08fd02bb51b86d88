"""KVStateMachine: applies one shard's committed commands to LMDB, serves its reads, snapshots it.

Many shards share one environment: every key in the kv.* databases starts with the shard id
(8 bytes, big-endian), so a shard is one contiguous key range per database. Durable state is
written only through the transaction the runtime passes in (it may retry it): nothing lives in
memory. Every stored record carries a checksum verified on read; a mismatch raises
CorruptValueError(shard_id, key) rather than answering wrongly. With a ValueCipher, values
(and recorded outcomes) are sealed with AES-GCM before the checksum, which covers the sealed
bytes; reads, scans, snapshots and data_hash see plaintext, so replicas with different keys
(or none) still compare equal.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import lmdb
import xxhash

from kvstore.commands import (
    FAILED_INVALID,
    FAILED_NOT_FOUND,
    FAILED_PRECONDITION,
    FAILED_WRONG_SHARD,
    BatchWritten,
    Delete,
    Failed,
    HashCheck,
    Outcome,
    Put,
    PutBatch,
    ReplicaHash,
    Restored,
    RestoreShard,
    SplitApplied,
    SplitShard,
    Txn,
    decode_command,
    decode_outcome,
    encode_outcome,
)
from kvstore.encryption import ValueCipher
from kvstore.service import (
    CompareOp,
    CompareTarget,
    KeyValue,
    KeyVersion,
    TxnCompare,
    TxnOp,
    TxnOpKind,
    TxnOpResult,
    TxnResult,
)
from kvstore.shard_snapshot import (
    Record,
    TokenRange,
    content_digest,
    encode_shard_snapshot,
    parse_shard_snapshot,
    parse_shard_snapshot_with_range,
)
from kvstore.sharding import TOKEN_SPACE, key_token
from raft.core.messages import Entry, EntryKind, Snapshot
from raft.core.types import LogIndex

_DATA_DB = b"kv.data"  # shard + stored key -> record(version) [+ full key] + value
_META_DB = b"kv.meta"  # shard -> (applied index, key count, checksum)
_IDEM_DB = b"kv.idem"  # shard + stored idempotency key -> record(entry index) + outcome
_IDEM_BY_INDEX_DB = b"kv.idem_by_index"  # shard + entry index -> idempotency key (eviction)
_CHECK_DB = b"kv.check"  # shard + entry index of a HashCheck -> this replica's ReplicaHash
_CHECKS_KEPT = 16  # per shard; older results are deleted when a new one is stored

_SHARD = struct.Struct(">Q")
_INDEX = struct.Struct(">Q")
_SHARD_BYTES = _SHARD.size
# version (or entry index), then xxh64(full key + value) seeded with it, so a flipped version
# fails the checksum too.
_RECORD = struct.Struct(">QQ")
_KEY_LENGTH = struct.Struct(">I")  # long keys only: the full key follows the record header
_META = struct.Struct(">QQ")  # applied index, key count; then their xxh64 seeded with the shard
# shard + this -> the [start, last] tokens the shard keeps since a split (absent: never split)
_RANGE_SUFFIX = b"range"
_RANGE = struct.Struct(">QQ")
_META_NAME = "(shard metadata)"  # what CorruptValueError names for a bad kv.meta record
_HASHED_RECORD = struct.Struct(">IQI")  # key length, version, value length; then key, value
_MAX_U64 = (1 << 64) - 1
# Set in a record's version field when its value is sealed (versions are Raft indexes < 2^63).
_ENCRYPTED_FLAG = 1 << 63

# LMDB keys stop at 511 bytes. Longer keys are stored as their first 480 bytes, a 0xff marker
# (never part of UTF-8) and an xxh128 of the whole key: byte order stays right except among long
# keys sharing their first 480 bytes, which sit adjacent and are re-sorted when read.
_INLINE_KEY_BYTES = 480
_LONG_KEY_MARK = b"\xff"
_LONG_HEAD_BYTES = _SHARD_BYTES + _INLINE_KEY_BYTES
_LONG_LMDB_KEY_BYTES = _LONG_HEAD_BYTES + 1 + 16

_first = itemgetter(0)


class RangeMovedError(Exception):
    """A read needed tokens this replica no longer holds (a split handed them over)."""

    def __init__(self, held: tuple[int, int]) -> None:
        super().__init__(f"this replica holds tokens [{held[0]}, {held[1]})")
        self.held = held


class CorruptValueError(Exception):
    """A stored record failed its checksum or does not belong to its key. Stops the node."""

    def __init__(
        self, shard_id: int, key: str, detail: str = "stored value failed its checksum"
    ) -> None:
        shown = key if len(key) <= 200 else key[:200] + "..."
        super().__init__(f"shard {shard_id}: key {shown!r}: {detail}")
        self.shard_id = shard_id
        self.key = key


def _stored_key(prefix: bytes, key: bytes) -> bytes:
    if len(key) <= _INLINE_KEY_BYTES:
        return prefix + key
    return prefix + key[:_INLINE_KEY_BYTES] + _LONG_KEY_MARK + xxhash.xxh128_digest(key)


def _seal(
    key: bytes, version: int, value: bytes, cipher: ValueCipher | None, prefix: bytes
) -> bytes:
    if cipher is not None:
        value = cipher.seal(value, _associated_data(prefix, version, key))
        version |= _ENCRYPTED_FLAG
    header = _RECORD.pack(version, xxhash.xxh64_intdigest(key + value, version))
    if len(key) <= _INLINE_KEY_BYTES:
        return header + value
    return header + _KEY_LENGTH.pack(len(key)) + key + value


@dataclass(frozen=True, slots=True)
class KVDatabases:
    """The kv.* database handles. Open them once, before the Raft host runs: env.open_db
    holds the GIL while it waits for LMDB's write lock, so opening one while the host's
    thread writes deadlocks the process."""

    data: Any
    meta: Any
    idem: Any
    idem_by_index: Any
    checks: Any

    @classmethod
    def open(cls, env: lmdb.Environment) -> KVDatabases:
        return cls(
            env.open_db(_DATA_DB),
            env.open_db(_META_DB),
            env.open_db(_IDEM_DB),
            env.open_db(_IDEM_BY_INDEX_DB),
            env.open_db(_CHECK_DB),
        )


RowBatch = list[tuple[bytes, bytes]]  # (UTF-8 key, value) pairs in key order
ROWS_PER_BATCH = 512  # rows a scan hands over at once: one generator hop per batch, not per row
BATCH_BYTES = 1 << 20  # and value bytes: a batch holds this much plus at most one more value


def _bounded_batches(
    rows: Iterator[tuple[bytes, bytes]], batch: RowBatch, size: int
) -> Iterator[RowBatch]:
    """`rows` appended to `batch` (which holds `size` value bytes), handed over in batches of at
    most ROWS_PER_BATCH rows and about BATCH_BYTES."""
    for row in rows:
        batch.append(row)
        size += len(row[1])
        if len(batch) == ROWS_PER_BATCH or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclass(frozen=True, slots=True)
class ReadView:
    """One shard as of one LMDB read transaction: every row at exactly `applied_index`.

    row_batches(low, values): the rows from a key (UTF-8 bytes) on, in key order, in lists of
    up to ROWS_PER_BATCH rows and about BATCH_BYTES of values (memory stays bounded whatever
    the values' size); it may start a little before `low` (callers skip those). Every value
    is checked against its checksum and decrypted. values=False reads keys only, each paired
    with b"": a value that is never read is not verified either (a count by key reads none)."""

    applied_index: int
    row_batches: Callable[[bytes, bool], Iterator[RowBatch]]


def _associated_data(prefix: bytes, version: int, key: bytes) -> bytes:
    return prefix + _INDEX.pack(version) + key


class KVStateMachine:
    """One shard's KV data: raft.runtime.host.StateMachine plus the reads the API serves.

    Versions are Raft indexes: a key's version is the index of the entry that last wrote it
    (0: absent), so they never repeat and compare-and-set has no ABA problem.
    Idempotency: a command whose key was recorded by an entry within the last
    `idempotency_window_entries` indexes (index > current - window) returns the recorded
    outcome and changes nothing. The window must be the same on every replica.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        shard_id: int,
        *,
        idempotency_window_entries: int = 100_000,
        dbs: KVDatabases | None = None,  # required once the Raft host runs: see KVDatabases
        cipher: ValueCipher | None = None,
    ) -> None:
        if not 0 <= shard_id <= _MAX_U64:
            raise ValueError(f"shard id out of range: {shard_id}")
        if idempotency_window_entries < 1:
            raise ValueError(f"idempotency window must be >= 1, got {idempotency_window_entries}")
        self.shard_id = shard_id
        self.idempotency_window_entries = idempotency_window_entries
        self._env = env
        self._prefix = _SHARD.pack(shard_id)
        self._cipher = cipher  # None: new values are stored in the clear
        dbs = dbs or KVDatabases.open(env)
        self._data = dbs.data
        self._meta = dbs.meta
        self._idem = dbs.idem
        self._idem_by_index = dbs.idem_by_index
        self._checks = dbs.checks

    # ------------------------------------------------------------------ StateMachine

    def applied_index(self) -> LogIndex:
        with self._env.begin() as txn:
            return self._read_meta(txn)[0]

    def apply(self, txn: lmdb.Transaction[bytes], entries: Sequence[Entry]) -> list[object]:
        """One outcome per entry (None for no-ops and membership changes). Writes only via txn."""
        applied, key_count = self._read_meta(txn)
        batch = _Batch(self, txn, key_count)
        results: list[object] = []
        for entry in entries:
            if entry.index <= applied:
                raise AssertionError(
                    f"shard {self.shard_id}: entry {entry.index} applied again (at {applied})"
                )
            applied = entry.index
            if entry.kind is not EntryKind.NORMAL or not entry.data:
                results.append(None)
            else:
                results.append(batch.apply(entry))
        if entries:
            self._evict_idempotency_records(txn, applied)
            self._write_meta(txn, applied, batch.key_count)
        return results

    def snapshot(self) -> bytes:
        """Data, idempotency records, applied index and (after a split) the token range, from
        one read transaction."""
        with self._env.begin() as txn:
            applied, _ = self._read_meta(txn)
            token_range = self._read_range(txn) if self._has_split(txn) else None
            data = list(self._records(txn.cursor(db=self._data), self._prefix))
            idem = []
            cursor = txn.cursor(db=self._idem)
            if cursor.set_range(self._prefix):
                for stored, raw in cursor.iternext():
                    if not stored.startswith(self._prefix):
                        break
                    idem.append(self._open(stored, raw))
        return encode_shard_snapshot(self.shard_id, applied, data, idem, token_range)

    def restore(self, txn: lmdb.Transaction[bytes], snapshot: Snapshot) -> None:
        """Replace this shard's state (and only this shard's) by `snapshot`."""
        data, idem, token_range = self._parse_snapshot(snapshot)
        for db in (self._data, self._idem, self._idem_by_index):
            _delete_range(txn.cursor(db=db), self._prefix)
        if token_range is None:
            txn.delete(self._prefix + _RANGE_SUFFIX, db=self._meta)
        else:
            self._write_range(txn, *token_range)
        prefix = self._prefix
        txn.cursor(db=self._data).putmulti(
            [
                (_stored_key(prefix, key), self._seal(key, version, value))
                for key, version, value in data
            ]
        )
        for key, index, outcome in idem:
            txn.put(_stored_key(prefix, key), self._seal(key, index, outcome), db=self._idem)
            txn.put(prefix + _INDEX.pack(index), key, db=self._idem_by_index)
        self._write_meta(txn, snapshot.meta.index, len(data))

    def clear(self) -> None:
        """Delete this shard's whole state on this node (its replica left), so a later replica
        of the shard here starts empty, as a new replica id must."""
        with self._env.begin(write=True) as txn:
            for db in (self._data, self._idem, self._idem_by_index, self._checks):
                _delete_range(txn.cursor(db=db), self._prefix)
            txn.delete(self._prefix, db=self._meta)
            txn.delete(self._prefix + _RANGE_SUFFIX, db=self._meta)

    # ------------------------------------------------------------------ reads

    def get(self, key: str, *, must_hold: tuple[int, int] | None = None) -> KeyValue | None:
        """must_hold: raise RangeMovedError unless this replica holds that token span, checked
        in the read's own transaction (a split committing in between cannot slip past)."""
        with self._env.begin(db=self._data) as txn:
            self._require_range(txn, must_hold, drop_outside=False)
            found = self._lookup(txn, key)
        return None if found is None else KeyValue(key, found[1], found[0])

    def scan(
        self,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        *,
        must_hold: tuple[int, int] | None = None,
        drop_outside: bool = False,
    ) -> list[KeyValue]:
        """Keys k with k.startswith(prefix), start <= k < end, k > after (each when given), in
        UTF-8 byte order (which is code point order), at most `limit` of them. must_hold: as
        for get; drop_outside: leave out the keys outside must_hold (see _require_range)."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        prefix_bytes = prefix.encode()
        end_bytes = None if end is None else end.encode()
        after_bytes = None if after is None else after.encode()
        low = prefix_bytes
        if start is not None:
            low = max(low, start.encode())
        if after_bytes is not None:
            low = max(low, after_bytes)
        found: list[KeyValue] = []
        if limit == 0:
            return found
        with self._env.begin(db=self._data) as txn:
            keep = self._require_range(txn, must_hold, drop_outside)
            first = self._prefix + low[:_INLINE_KEY_BYTES]  # at or before the first match
            for key, version, value in self._records(txn.cursor(), first):
                if key < low or (after_bytes is not None and key <= after_bytes):
                    continue
                if not key.startswith(prefix_bytes):
                    break  # keys with the prefix are one contiguous range, and it is behind us
                if end_bytes is not None and key >= end_bytes:
                    break
                text = key.decode()
                if keep is not None and not keep[0] <= key_token(text) < keep[1]:
                    continue
                found.append(KeyValue(text, value, version))
                if len(found) >= limit:
                    break
        return found

    @contextlib.contextmanager
    def read_view(
        self, *, must_hold: tuple[int, int] | None = None, drop_outside: bool = False
    ) -> Iterator[ReadView]:
        """A consistent snapshot for long reads (queries): LMDB's MVCC keeps the rows of this
        read transaction unchanged while writes go on, so a scan sees one applied index.
        must_hold, drop_outside: as for scan, checked in this same transaction."""
        with self._env.begin() as txn:
            keep = self._require_range(txn, must_hold, drop_outside)
            applied, _ = self._read_meta(txn)

            def kept_batches(low: bytes, values: bool = True) -> Iterator[RowBatch]:
                assert keep is not None
                for batch in row_batches(low, values):
                    kept = [row for row in batch if keep[0] <= key_token(row[0].decode()) < keep[1]]
                    if kept:
                        yield kept

            def row_batches(low: bytes, values: bool = True) -> Iterator[RowBatch]:
                # The scan loop of queries, most of a query's cost per row: _records with _open
                # inlined for short keys, each batch cut by islice (a long key hands the rest
                # of the scan to _records, which sorts their runs).
                prefix, header, digest = self._prefix, _RECORD.size, xxhash.xxh64_intdigest
                unpack, long_key, encrypted = (
                    _RECORD.unpack_from,
                    _LONG_LMDB_KEY_BYTES,
                    _ENCRYPTED_FLAG,
                )
                # Above every stored key of this shard, below those of the next (the last
                # shard id has no next: 9 bytes of 0xff are above any of its keys' prefixes).
                past_shard = (
                    _SHARD.pack(self.shard_id + 1) if self.shard_id < _MAX_U64 else b"\xff" * 9
                )
                cursor = txn.cursor(db=self._data)
                if not cursor.set_range(prefix + low[:_INLINE_KEY_BYTES]):
                    return
                stored_rows: Iterator[tuple[bytes, bytes]] = (
                    cursor.iternext()
                    if values
                    else zip(cursor.iternext(values=False), itertools.repeat(b""))
                )
                while True:
                    batch: RowBatch = []
                    append = batch.append
                    size = 0  # value bytes in the batch
                    for stored, raw in itertools.islice(stored_rows, ROWS_PER_BATCH):
                        if stored >= past_shard:  # a comparison: cheaper than startswith
                            break
                        if len(stored) == long_key:  # the first of its run: hand over
                            rest = (
                                (key, value if values else b"")
                                for key, _version, value in self._records(
                                    txn.cursor(db=self._data), stored
                                )
                            )
                            yield from _bounded_batches(rest, batch, size)
                            return
                        key = stored[_SHARD_BYTES:]
                        if values:
                            value = raw[header:]
                            try:
                                version, checksum = unpack(raw)
                            except struct.error:
                                self._open(stored, raw)  # raises CorruptValueError: truncated
                            if digest(key + value, version) != checksum:
                                self._open(stored, raw)  # raises CorruptValueError, saying why
                            if version & encrypted:
                                value = self._unseal(stored, key, version ^ encrypted, value)
                            raw = value
                            size += len(value)
                        append((key, raw))
                        if size >= BATCH_BYTES:
                            break
                    else:
                        if len(batch) == ROWS_PER_BATCH:
                            yield batch
                            continue
                    if size >= BATCH_BYTES:  # cut by its bytes: the shard goes on
                        yield batch
                        continue
                    if batch:  # the cursor left the shard, or reached the end of the data
                        yield batch
                    return

            yield ReadView(applied, row_batches if keep is None else kept_batches)

    def count(self) -> int:
        with self._env.begin() as txn:
            return self._read_meta(txn)[1]

    def data_hash(self) -> tuple[int, int]:
        """(applied index, xxh64 over every (key, version, value) in key order): replicas at the
        same applied index must agree."""
        with self._env.begin() as txn:
            applied, _ = self._read_meta(txn)
            return applied, self._hash_data(txn)[1]

    def check_result(self, index: int) -> ReplicaHash | None:
        """What this replica found applying the HashCheck at `index` (None: not applied here,
        or dropped as one of the older results)."""
        with self._env.begin(db=self._checks) as txn:
            raw = txn.get(self._prefix + _INDEX.pack(index))
        if raw is None:
            return None
        try:
            outcome = decode_outcome(raw)
        except ValueError:
            outcome = None
        if not isinstance(outcome, ReplicaHash):
            raise CorruptValueError(self.shard_id, "(check result)", "not a check result")
        return outcome

    def _hash_data(self, txn: lmdb.Transaction[bytes]) -> tuple[int, int]:
        """(key count, xxh64 over every (key, version, value) in key order); CorruptValueError
        if a record fails its checksum."""
        hasher = xxhash.xxh64()
        count = 0
        for key, version, value in self._records(txn.cursor(db=self._data), self._prefix):
            hasher.update(_HASHED_RECORD.pack(len(key), version, len(value)))
            hasher.update(key)
            hasher.update(value)
            count += 1
        return count, hasher.intdigest()

    def _record_check(self, txn: lmdb.Transaction[bytes], index: int) -> ReplicaHash:
        # NB: hashes the whole shard inside the apply transaction, pausing every group of this
        # node for O(shard size); fine for the data sizes this store targets.
        try:
            key_count, digest = self._hash_data(txn)
            result = ReplicaHash(index, key_count, digest)
        except CorruptValueError as error:
            result = ReplicaHash(index, 0, 0, error.key)
        txn.put(self._prefix + _INDEX.pack(index), encode_outcome(result), db=self._checks)
        stored: list[bytes] = []
        cursor = txn.cursor(db=self._checks)
        if cursor.set_range(self._prefix):
            for stored_key in cursor.iternext(values=False):
                if not stored_key.startswith(self._prefix):
                    break
                stored.append(stored_key)
        for stored_key in stored[:-_CHECKS_KEPT]:  # oldest first (big-endian indexes)
            txn.delete(stored_key, db=self._checks)
        return result

    # ------------------------------------------------------------------ records

    def _lookup(self, txn: lmdb.Transaction[bytes], key: str) -> tuple[int, bytes] | None:
        """(version, value) of `key`, checksum verified; None when absent."""
        key_bytes = key.encode()
        stored = _stored_key(self._prefix, key_bytes)
        raw = txn.get(stored, db=self._data)
        if raw is None:
            return None
        found_key, version, value = self._open(stored, raw)
        if found_key != key_bytes:  # an xxh128 collision between two long keys
            raise CorruptValueError(self.shard_id, key, "stored under another key's hash")
        return version, value

    def _open(self, stored: bytes, raw: bytes) -> tuple[bytes, int, bytes]:
        """(full key, version, value) of a sealed record; CorruptValueError unless intact."""
        try:
            version, checksum = _RECORD.unpack_from(raw)
            if len(stored) == _LONG_LMDB_KEY_BYTES:
                (length,) = _KEY_LENGTH.unpack_from(raw, _RECORD.size)
                key_end = _RECORD.size + _KEY_LENGTH.size + length
                key = raw[_RECORD.size + _KEY_LENGTH.size : key_end]
                value = raw[key_end:]
                if len(key) != length or _stored_key(self._prefix, key) != stored:
                    raise CorruptValueError(self.shard_id, self._name(stored), "key mismatch")
            else:
                key, value = stored[_SHARD_BYTES:], raw[_RECORD.size :]
        except struct.error:
            raise CorruptValueError(self.shard_id, self._name(stored), "truncated") from None
        if xxhash.xxh64_intdigest(key + value, version) != checksum:
            raise CorruptValueError(self.shard_id, self._name(stored))
        if version & _ENCRYPTED_FLAG:
            version ^= _ENCRYPTED_FLAG
            value = self._unseal(stored, key, version, value)
        return key, version, value

    def _seal(self, key: bytes, version: int, value: bytes) -> bytes:
        return _seal(key, version, value, self._cipher, self._prefix)

    def _unseal(self, stored: bytes, key: bytes, version: int, sealed: bytes) -> bytes:
        if self._cipher is None:
            raise CorruptValueError(
                self.shard_id,
                self._name(stored),
                "value is encrypted at rest but this node has no [encryption] key_file",
            )
        try:
            return self._cipher.open(sealed, _associated_data(self._prefix, version, key))
        except ValueError as error:
            raise CorruptValueError(self.shard_id, self._name(stored), str(error)) from None

    def _name(self, stored: bytes) -> str:
        """The key a stored record is filed under, for error messages (a long key's head)."""
        body = stored[_SHARD_BYTES:]
        if len(stored) == _LONG_LMDB_KEY_BYTES:
            body = body[:_INLINE_KEY_BYTES]
        return body.decode(errors="replace")

    def _records(
        self, cursor: lmdb.Cursor[bytes], first: bytes
    ) -> Iterator[tuple[bytes, int, bytes]]:
        """This shard's (key, version, value) from stored key `first` on, in full-key order."""
        prefix = self._prefix
        if not cursor.set_range(first):
            return
        run: list[tuple[bytes, int, bytes]] = []  # long keys sharing their first 480 bytes
        run_head = b""
        for stored, raw in cursor.iternext():
            if not stored.startswith(prefix):
                break
            if len(stored) == _LONG_LMDB_KEY_BYTES:
                head = stored[:_LONG_HEAD_BYTES]
                if run and head != run_head:
                    run.sort(key=_first)
                    yield from run
                    run = []
                run_head = head
                run.append(self._open(stored, raw))
                continue
            if run:
                run.sort(key=_first)
                yield from run
                run = []
            yield self._open(stored, raw)
        run.sort(key=_first)
        yield from run

    # ------------------------------------------------------------------ meta and idempotency

    def _read_meta(self, txn: lmdb.Transaction[bytes]) -> tuple[LogIndex, int]:
        raw = txn.get(self._prefix, db=self._meta)
        if raw is None:
            return LogIndex(0), 0
        head = raw[: _META.size]
        if (
            len(raw) != _META.size + _INDEX.size
            or _INDEX.pack(xxhash.xxh64_intdigest(head, self.shard_id)) != raw[_META.size :]
        ):
            raise CorruptValueError(self.shard_id, _META_NAME, "shard metadata failed its checksum")
        applied, key_count = _META.unpack(head)
        return LogIndex(applied), key_count

    def token_range(self) -> tuple[int, int]:
        """The [start, end) of key tokens this replica holds: the whole ring until a split
        here handed part of it to another shard."""
        with self._env.begin(db=self._meta) as txn:
            return self._read_range(txn)

    def has_split_range(self) -> bool:
        """Whether this replica's range came from a split (its own, or the handover that
        created it as a child), rather than being the shard map's founding range."""
        with self._env.begin(db=self._meta) as txn:
            return self._has_split(txn)

    def _has_split(self, txn: lmdb.Transaction[bytes]) -> bool:
        return txn.get(self._prefix + _RANGE_SUFFIX, db=self._meta) is not None

    def _require_range(
        self, txn: lmdb.Transaction[bytes], span: tuple[int, int] | None, drop_outside: bool
    ) -> tuple[int, int] | None:
        """RangeMovedError unless this replica holds `span`. Returns the span to keep rows in
        when drop_outside and the replica holds more than it (a split parent that has not
        applied the split its caller's map shows: the keys above it are the child's now), else
        None (keep every row)."""
        if span is None:
            return None
        held = self._read_range(txn)
        if not held[0] <= span[0] < span[1] <= held[1]:
            raise RangeMovedError(held)
        return span if drop_outside and held != span else None

    def _read_range(self, txn: lmdb.Transaction[bytes]) -> tuple[int, int]:
        raw = txn.get(self._prefix + _RANGE_SUFFIX, db=self._meta)
        if raw is None:
            return 0, TOKEN_SPACE
        start, last = _RANGE.unpack(raw)
        return start, last + 1

    def _write_range(self, txn: lmdb.Transaction[bytes], start: int, end: int) -> None:
        txn.put(self._prefix + _RANGE_SUFFIX, _RANGE.pack(start, end - 1), db=self._meta)

    def _write_meta(self, txn: lmdb.Transaction[bytes], applied: int, key_count: int) -> None:
        head = _META.pack(applied, key_count)
        record = head + _INDEX.pack(xxhash.xxh64_intdigest(head, self.shard_id))
        txn.put(self._prefix, record, db=self._meta)

    def _find_outcome(
        self, txn: lmdb.Transaction[bytes], idempotency_key: str, index: int
    ) -> Outcome | None:
        """The outcome recorded for idempotency_key if it is still inside the window at index."""
        key = idempotency_key.encode()
        stored = _stored_key(self._prefix, key)
        raw = txn.get(stored, db=self._idem)
        if raw is None:
            return None
        found_key, recorded_at, outcome = self._open(stored, raw)
        if found_key != key:
            raise CorruptValueError(self.shard_id, idempotency_key, "idempotency key mismatch")
        if recorded_at <= index - self.idempotency_window_entries:
            return None  # expired; the batch's eviction deletes it
        return decode_outcome(outcome)

    def _record_outcome(
        self, txn: lmdb.Transaction[bytes], idempotency_key: str, index: int, outcome: Outcome
    ) -> None:
        key = idempotency_key.encode()
        record = self._seal(key, index, encode_outcome(outcome))
        txn.put(_stored_key(self._prefix, key), record, db=self._idem)
        txn.put(self._prefix + _INDEX.pack(index), key, db=self._idem_by_index)

    def _evict_idempotency_records(self, txn: lmdb.Transaction[bytes], applied: int) -> None:
        """Delete records made at index <= applied - window (a cursor range delete)."""
        horizon = applied - self.idempotency_window_entries
        if horizon < 1:
            return
        end = self._prefix + _INDEX.pack(horizon)
        cursor = txn.cursor(db=self._idem_by_index)
        if not cursor.set_range(self._prefix):
            return
        while True:
            position = cursor.key()
            if not position or position > end:
                return
            (index,) = _INDEX.unpack_from(position, _SHARD_BYTES)
            key = cursor.value()
            stored = _stored_key(self._prefix, key)
            raw = txn.get(stored, db=self._idem)
            # The key may have been recorded again since (after expiring): keep the newer one.
            if raw is not None and self._open(stored, raw)[1] == index:
                txn.delete(stored, db=self._idem)
            if not cursor.delete():  # moves to the next key
                return

    def _parse_snapshot(
        self, snapshot: Snapshot
    ) -> tuple[list[Record], list[Record], TokenRange | None]:
        applied, data, idem, token_range = parse_shard_snapshot_with_range(
            snapshot.data, self.shard_id
        )
        if applied != snapshot.meta.index:
            raise ValueError(f"snapshot data is at index {applied}, not {snapshot.meta.index}")
        return data, idem, token_range


def _delete_range(cursor: lmdb.Cursor[bytes], prefix: bytes) -> None:
    if not cursor.set_range(prefix):
        return
    while cursor.key().startswith(prefix) and cursor.delete():  # delete() moves to the next key
        pass


def _holds(op: CompareOp, left: int | bytes, right: int | bytes) -> bool:
    if op is CompareOp.EQUAL:
        return left == right
    if op is CompareOp.NOT_EQUAL:
        return left != right
    if op is CompareOp.LESS:
        return left < right  # type: ignore[operator]
    return left > right  # type: ignore[operator]


class _Batch:
    """One apply() call's work in its transaction. Lives only as long as that call."""

    def __init__(
        self, machine: KVStateMachine, txn: lmdb.Transaction[bytes], key_count: int
    ) -> None:
        self.machine = machine
        self.txn = txn
        self.key_count = key_count  # written back to kv.meta at the end of the batch

    def apply(self, entry: Entry) -> Outcome:
        machine, index = self.machine, entry.index
        try:
            command = decode_command(entry.data)
        except ValueError as exc:  # deterministic: every replica refuses the same bytes
            return Failed(FAILED_INVALID, f"entry {index} holds no valid command: {exc}", 0)
        if isinstance(command, HashCheck):
            return machine._record_check(self.txn, index)
        if isinstance(command, RestoreShard):
            return self._restore(command, index)
        if isinstance(command, SplitShard):
            return self._split(command, index)
        outside = self._key_outside_range(command)
        if outside is not None:
            message = f"key {outside!r} left shard {machine.shard_id} in a split; refresh the map"
            return Failed(FAILED_WRONG_SHARD, message, 0)
        idempotency_key = command.idempotency_key
        if idempotency_key is not None:
            recorded = machine._find_outcome(self.txn, idempotency_key, index)
            if recorded is not None:
                return recorded
        outcome = self._execute(command, index)
        if idempotency_key is not None:
            machine._record_outcome(self.txn, idempotency_key, index, outcome)
        return outcome

    def _execute(self, command: Put | Delete | Txn | PutBatch, index: int) -> Outcome:
        if isinstance(command, Put):
            return self._put(command, index)
        if isinstance(command, Delete):
            return self._delete(command)
        if isinstance(command, PutBatch):
            for key, value in command.items:
                self._write(key, value, index)
            return BatchWritten(index)
        return self._txn(command, index)

    def _key_outside_range(self, command: Put | Delete | Txn | PutBatch) -> str | None:
        start, end = self.machine._read_range(self.txn)
        if (start, end) == (0, TOKEN_SPACE):
            return None  # never split: every key the router sends here is ours
        if isinstance(command, Put | Delete):
            keys: list[str] = [command.key]
        elif isinstance(command, PutBatch):
            keys = [key for key, _ in command.items]
        else:
            request = command.request
            keys = [c.key for c in request.compare]
            keys += [op.key for op in (*request.success, *request.failure)]
        return next((key for key in keys if not start <= key_token(key) < end), None)

    def _split(self, command: SplitShard, index: int) -> Outcome:
        """Hand the keys at or above the split token, and copies of the idempotency records
        (a retried write then finds its outcome on either side), to the child shard."""
        machine, txn = self.machine, self.txn
        start, end = machine._read_range(txn)
        split = command.split_token
        if not start < split < end:
            message = f"split token {split} is not inside shard {machine.shard_id}'s range"
            return Failed(FAILED_INVALID, message, 0)
        child = KVStateMachine(
            machine._env,
            command.child_id,
            dbs=KVDatabases(
                machine._data, machine._meta, machine._idem, machine._idem_by_index, machine._checks
            ),
            cipher=machine._cipher,
        )
        moving = [
            (stored, key, version, value)
            for stored, key, version, value in _records(machine, txn, machine._data)
            if key_token(key.decode()) >= split
        ]
        for stored, _, _, _ in moving:
            txn.delete(stored, db=machine._data)
        self.key_count -= len(moving)
        machine._write_range(txn, start, split)
        if child._has_split(txn):
            # This replica of the child already exists (started empty and given a snapshot by
            # the child's leader, while this parent replica lagged): it must not be overwritten.
            return SplitApplied(index, len(moving), self.key_count)
        for _, key, version, value in moving:
            txn.put(
                _stored_key(child._prefix, key), child._seal(key, version, value), db=child._data
            )
        for _, key, entry_index, outcome in _records(machine, txn, machine._idem):
            txn.put(
                _stored_key(child._prefix, key),
                child._seal(key, entry_index, outcome),
                db=child._idem,
            )
            txn.put(child._prefix + _INDEX.pack(entry_index), key, db=child._idem_by_index)
        child._write_meta(txn, 0, len(moving))
        child._write_range(txn, split, end)
        return SplitApplied(index, len(moving), self.key_count)

    def _restore(self, command: RestoreShard, index: int) -> Outcome:
        machine = self.machine
        try:
            _, data, _ = parse_shard_snapshot(command.snapshot, machine.shard_id)
        except ValueError as exc:
            return Failed(FAILED_INVALID, f"not a backup of shard {machine.shard_id}: {exc}", 0)
        if self.key_count and not command.replace:
            message = f"shard {machine.shard_id} holds {self.key_count} keys; restore refused"
            return Failed(
                FAILED_PRECONDITION,
                message + " (restore with replace=true, kvctl --replace, to overwrite)",
                0,
            )
        prefix = machine._prefix
        for db in (machine._data, machine._idem, machine._idem_by_index):
            _delete_range(self.txn.cursor(db=db), prefix)
        # Versions are this log's indexes: restored keys take this entry's, so none repeats.
        self.txn.cursor(db=machine._data).putmulti(
            [(_stored_key(prefix, key), machine._seal(key, index, value)) for key, _, value in data]
        )
        self.key_count = len(data)
        return Restored(index, len(data), content_digest(data))

    def _put(self, command: Put, index: int) -> Outcome:
        if command.if_version is not None:
            current = self._version(command.key)
            if current != command.if_version:
                return _precondition_failed(command.key, current, command.if_version)
        self._write(command.key, command.value, index)
        return KeyVersion(command.key, index)

    def _delete(self, command: Delete) -> Outcome:
        key = command.key
        current = self._version(key)
        if current == 0:
            return Failed(FAILED_NOT_FOUND, f"key {key!r} not found", 0)
        if command.if_version is not None and current != command.if_version:
            return _precondition_failed(key, current, command.if_version)
        self._remove(key)
        return KeyVersion(key, current)

    def _txn(self, command: Txn, index: int) -> TxnResult:
        request = command.request
        succeeded = all(self._compare(compare) for compare in request.compare)
        ops = request.success if succeeded else request.failure
        return TxnResult(succeeded, tuple(self._txn_op(op, index) for op in ops))

    def _compare(self, compare: TxnCompare) -> bool:
        found = self.machine._lookup(self.txn, compare.key)
        if compare.target is CompareTarget.VERSION:
            return _holds(compare.op, 0 if found is None else found[0], compare.version)
        if found is None:  # an absent value only differs from everything
            return compare.op is CompareOp.NOT_EQUAL
        return _holds(compare.op, found[1], compare.value)

    def _txn_op(self, op: TxnOp, index: int) -> TxnOpResult:
        if op.kind is TxnOpKind.PUT:
            self._write(op.key, op.value, index)
            return TxnOpResult(TxnOpKind.PUT, op.key, index)
        if op.kind is TxnOpKind.DELETE:
            current = self._version(op.key)
            if current:
                self._remove(op.key)
            return TxnOpResult(TxnOpKind.DELETE, op.key, current)
        found = self.machine._lookup(self.txn, op.key)
        if found is None:
            return TxnOpResult(TxnOpKind.GET, op.key, 0, None)
        return TxnOpResult(TxnOpKind.GET, op.key, found[0], found[1])

    def _version(self, key: str) -> int:
        found = self.machine._lookup(self.txn, key)
        return 0 if found is None else found[0]

    def _write(self, key: str, value: bytes, index: int) -> None:
        key_bytes = key.encode()
        stored = _stored_key(self.machine._prefix, key_bytes)
        if (
            self.txn.replace(
                stored, self.machine._seal(key_bytes, index, value), db=self.machine._data
            )
            is None
        ):
            self.key_count += 1

    def _remove(self, key: str) -> None:
        stored = _stored_key(self.machine._prefix, key.encode())
        if self.txn.delete(stored, db=self.machine._data):
            self.key_count -= 1


def _records(
    machine: KVStateMachine, txn: lmdb.Transaction[bytes], db: Any
) -> list[tuple[bytes, bytes, int, bytes]]:
    """(stored key, full key, version, value) of every record of the machine's shard in db."""
    found = []
    cursor = txn.cursor(db=db)
    if cursor.set_range(machine._prefix):
        for stored, raw in cursor.iternext():
            if not stored.startswith(machine._prefix):
                break
            found.append((stored, *machine._open(stored, raw)))
    return found


def _precondition_failed(key: str, current: int, expected: int) -> Failed:
    message = f"key {key!r} is at version {current}, not {expected}"
    return Failed(FAILED_PRECONDITION, message, current)
