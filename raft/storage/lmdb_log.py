"""The Raft logs of many groups (one per shard) in one LMDB environment: one fsync per batch.

LmdbLogStore owns the environment and the write side: `write()` persists every group's share of
a Ready in one transaction. LmdbGroupStorage is one group's read side (raft.core's LogStorage);
it answers positions and recent terms from memory. Every record carries a checksum verified on
read: storage never returns a silently wrong answer.

Exception                          (both stop the node: recovery beats limping on)
├── CorruptLogError(group_id, index)   a stored record failed its checksum or is missing
└── StorageFullError(path)             the disk is full; free space, then restart
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, NewType, Self, TypeVar

import lmdb
import msgpack
import xxhash

from raft.core.errors import Compacted
from raft.core.messages import ConfState, Entry, EntryKind, HardState, Snapshot, SnapshotMeta
from raft.core.storage import bootstrap_state, limit_size
from raft.core.types import LogIndex, NodeId, Term

GroupId = NewType("GroupId", int)

_T = TypeVar("_T")

# Named databases, prefixed so the application can open its own in the same environment.
_LOG_DB = b"raft.log"  # (group, index) -> sealed (index, term, kind, data)
_STATE_DB = b"raft.state"  # (group, record) -> sealed hard state / snapshot meta
_SNAP_DB = b"raft.snap"  # group -> sealed (snapshot index, data)
_MAX_DBS = 64  # ours plus the application's

# Big-endian keys sort by group, then index: one group's log is a contiguous key range.
_LOG_KEY = struct.Struct(">QQ")
_STATE_KEY = struct.Struct(">QB")
_SNAP_KEY = struct.Struct(">Q")
_DIGEST = struct.Struct(">Q")  # xxh64 of the msgpack payload, seeded with the group id
_HARD_STATE = 0  # record tags, in the state key and again inside the payload
_SNAPSHOT_META = 1
_MAX_U64 = (1 << 64) - 1

# Per group, the newest entries stay in memory: a leader re-reads them to replicate.
_TAIL_MAX_ENTRIES = 1024
_TAIL_MAX_BYTES = 256 << 10
_MAX_MAP_SIZE_BYTES = 1 << 40  # the map is address space, not disk; stop doubling here


class CorruptLogError(Exception):
    """A stored record failed its checksum, or a record the log needs is missing."""

    def __init__(
        self, group_id: GroupId, index: LogIndex | None, record: str = "log entry"
    ) -> None:
        at = "" if index is None else f" at index {index}"
        super().__init__(f"group {group_id}: corrupt {record}{at} in the Raft log store")
        self.group_id = group_id
        self.index = index
        self.record = record


class StorageFullError(Exception):
    """Nothing more can be written to the store at `path`."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"Raft log store at {path} is full: {detail}")
        self.path = path


@dataclass(frozen=True, slots=True)
class GroupWrite:
    """One group's share of a Ready, persisted in this order: snapshot, entries, hard_state."""

    group_id: GroupId
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()  # truncates any existing suffix from entries[0].index
    snapshot: Snapshot | None = None  # received from the leader: replaces the group's whole log

    def __post_init__(self) -> None:
        if not 0 <= self.group_id <= _MAX_U64:
            raise ValueError(f"group id out of range: {self.group_id}")
        for previous, entry in itertools.pairwise(self.entries):
            if entry.index != previous.index + 1:
                raise ValueError(f"entries not contiguous: {entry.index} after {previous.index}")


# --- Record encoding: msgpack tuples behind an xxh64 digest. ---


def _seal(payload: bytes, group_id: int) -> bytes:
    return _DIGEST.pack(xxhash.xxh64_intdigest(payload, group_id)) + payload


def _unseal(value: bytes | None, group_id: int) -> Any:
    """The decoded payload, or None when the value is missing or fails its checksum."""
    if value is None or len(value) < _DIGEST.size:
        return None
    payload = memoryview(value)[_DIGEST.size :]
    if xxhash.xxh64_intdigest(payload, group_id) != _DIGEST.unpack_from(value)[0]:
        return None
    return msgpack.unpackb(payload, use_list=False)


def _encode_entry(group_id: int, entry: Entry) -> bytes:
    payload = msgpack.packb((entry.index, entry.term, entry.kind.value, entry.data))
    return _seal(payload, group_id)


def _decode_entry(group_id: GroupId, index: int, value: bytes | None) -> Entry:
    fields = _unseal(value, group_id)
    if fields is None or fields[0] != index:
        raise CorruptLogError(group_id, LogIndex(index))
    _, term, kind, data = fields
    return Entry(Term(term), LogIndex(index), data, EntryKind(kind))


def _encode_hard_state(group_id: int, hard_state: HardState) -> bytes:
    payload = (_HARD_STATE, hard_state.term, hard_state.voted_for, hard_state.commit)
    return _seal(msgpack.packb(payload), group_id)


def _decode_hard_state(group_id: GroupId, value: bytes) -> HardState:
    fields = _unseal(value, group_id)
    if fields is None or fields[0] != _HARD_STATE:
        raise CorruptLogError(group_id, None, "hard state")
    _, term, voted_for, commit = fields
    return HardState(Term(term), NodeId(voted_for), LogIndex(commit))


def _encode_meta(group_id: int, meta: SnapshotMeta) -> bytes:
    voters, learners = sorted(meta.conf.voters), sorted(meta.conf.learners)
    payload = (_SNAPSHOT_META, meta.index, meta.term, voters, learners)
    return _seal(msgpack.packb(payload), group_id)


def _decode_meta(group_id: GroupId, value: bytes) -> SnapshotMeta:
    fields = _unseal(value, group_id)
    if fields is None or fields[0] != _SNAPSHOT_META:
        raise CorruptLogError(group_id, None, "snapshot meta")
    _, index, term, voters, learners = fields
    conf = ConfState(frozenset(map(NodeId, voters)), frozenset(map(NodeId, learners)))
    return SnapshotMeta(LogIndex(index), Term(term), conf)


@dataclass(frozen=True, slots=True)
class _Databases:
    env: lmdb.Environment
    log: lmdb._Database
    state: lmdb._Database
    snap: lmdb._Database


def _put_snapshot(
    txn: lmdb.Transaction[bytes], dbs: _Databases, group_id: int, meta: SnapshotMeta, data: bytes
) -> None:
    txn.put(_STATE_KEY.pack(group_id, _SNAPSHOT_META), _encode_meta(group_id, meta), db=dbs.state)
    sealed_data = _seal(msgpack.packb((meta.index, data)), group_id)
    txn.put(_SNAP_KEY.pack(group_id), sealed_data, db=dbs.snap)


def _delete_log(
    txn: lmdb.Transaction[bytes], dbs: _Databases, group_id: int, low: int, high: int
) -> None:
    """Delete one group's entries [low, high] (a cursor range delete)."""
    if low > high:
        return
    cursor = txn.cursor(db=dbs.log)
    end = _LOG_KEY.pack(group_id, high)
    if not cursor.set_range(_LOG_KEY.pack(group_id, low)):
        return
    while True:
        key = cursor.key()
        if not key or key > end or not cursor.delete():  # delete() moves to the next key
            return


# --- One group's log. ---


@dataclass(frozen=True, slots=True)
class _LogView:
    """One group's cached state as of a commit. Replaced whole: a reader never sees half a write."""

    hard_state: HardState
    meta: SnapshotMeta
    last_index: LogIndex
    is_persisted: bool  # the group has a snapshot meta record in LMDB
    # Terms of entries [terms_from, last_index] as runs: run k starts at run_starts[k].
    # Invariant: run_starts[0] == terms_from, or both runs are empty and
    # terms_from == last_index + 1. Older terms (only after a restart) are read from LMDB.
    terms_from: int
    run_starts: tuple[int, ...]
    run_terms: tuple[Term, ...]
    # The newest entries, ending at last_index; bounded by _TAIL_MAX_ENTRIES and _TAIL_MAX_BYTES.
    tail: tuple[Entry, ...]
    tail_bytes: int

    @classmethod
    def empty(cls, hard_state: HardState, meta: SnapshotMeta, is_persisted: bool) -> _LogView:
        """A log with no entries after `meta`."""
        return cls(hard_state, meta, meta.index, is_persisted, meta.index + 1, (), (), (), 0)

    def restarted_at(self, meta: SnapshotMeta) -> _LogView:
        """The log now starts, empty, right after `meta` (a snapshot received from the leader)."""
        return _LogView.empty(self.hard_state, meta, is_persisted=True)

    def appended(self, entries: tuple[Entry, ...]) -> _LogView:
        """Entries starting in (meta.index, last_index + 1], replacing the suffix they overlap."""
        first = entries[0].index
        terms_from = self.terms_from
        if first <= terms_from:
            terms_from, starts, terms = first, [], []
        else:
            keep = bisect_right(self.run_starts, first - 1)
            starts, terms = list(self.run_starts[:keep]), list(self.run_terms[:keep])
        for entry in entries:
            if not terms or terms[-1] != entry.term:
                starts.append(entry.index)
                terms.append(entry.term)

        tail, tail_bytes = self.tail, self.tail_bytes
        cut = first - (self.last_index + 1 - len(tail))
        if cut >= 0:
            tail_bytes -= sum(entry.size_bytes for entry in tail[cut:])
            tail = tail[:cut] + entries
        else:
            tail_bytes, tail = 0, entries
        tail_bytes += sum(entry.size_bytes for entry in entries)
        drop = max(0, len(tail) - _TAIL_MAX_ENTRIES)
        tail_bytes -= sum(entry.size_bytes for entry in tail[:drop])
        while tail_bytes > _TAIL_MAX_BYTES:
            tail_bytes -= tail[drop].size_bytes
            drop += 1
        return _LogView(
            self.hard_state,
            self.meta,
            entries[-1].index,
            self.is_persisted,
            terms_from,
            tuple(starts),
            tuple(terms),
            tail[drop:] if drop else tail,
            tail_bytes,
        )

    def compacted(self, meta: SnapshotMeta) -> _LogView:
        """An application snapshot at meta.index (within the log): entries up to it are gone."""
        new_first = meta.index + 1
        terms_from, starts, terms = self.terms_from, self.run_starts, self.run_terms
        if new_first > self.last_index:
            terms_from, starts, terms = new_first, (), ()
        elif new_first > terms_from:
            drop = bisect_right(starts, new_first) - 1
            terms_from, starts, terms = new_first, (new_first, *starts[drop + 1 :]), terms[drop:]
        tail, tail_bytes = self.tail, self.tail_bytes
        drop = new_first - (self.last_index + 1 - len(tail))
        if drop > 0:
            tail_bytes -= sum(entry.size_bytes for entry in tail[:drop])
            tail = tail[drop:]
        return _LogView(
            self.hard_state,
            meta,
            self.last_index,
            True,
            terms_from,
            starts,
            terms,
            tail,
            tail_bytes,
        )


def _load_view(dbs: _Databases, group_id: GroupId) -> _LogView:
    """A group's persisted state, read on its first use after open."""
    with dbs.env.begin() as txn:
        meta_value = txn.get(_STATE_KEY.pack(group_id, _SNAPSHOT_META), db=dbs.state)
        hard_state_value = txn.get(_STATE_KEY.pack(group_id, _HARD_STATE), db=dbs.state)
        cursor = txn.cursor(db=dbs.log)
        # The group's first and last keys bracket its log.
        first_key = cursor.key() if cursor.set_range(_LOG_KEY.pack(group_id, 0)) else b""
        if group_id < _MAX_U64 and cursor.set_range(_LOG_KEY.pack(group_id + 1, 0)):
            has_last = cursor.prev()
        else:
            has_last = cursor.last()
        last_key, last_value = cursor.item() if has_last else (b"", b"")
    has_log = first_key[: _SNAP_KEY.size] == _SNAP_KEY.pack(group_id)
    if meta_value is None:
        if hard_state_value is not None or has_log:
            raise CorruptLogError(group_id, None, "snapshot meta (missing)")
        return _LogView.empty(HardState(), SnapshotMeta(), is_persisted=False)
    meta = _decode_meta(group_id, meta_value)
    hard_state = HardState()
    if hard_state_value is not None:
        hard_state = _decode_hard_state(group_id, hard_state_value)
    if not has_log:
        return _LogView.empty(hard_state, meta, is_persisted=True)
    _, first_index = _LOG_KEY.unpack(first_key)
    _, last_index = _LOG_KEY.unpack(last_key)
    if first_index != meta.index + 1:
        raise CorruptLogError(group_id, LogIndex(first_index), "log start (not after snapshot)")
    last = _decode_entry(group_id, last_index, last_value)
    runs = ((last.index,), (last.term,))
    return _LogView(hard_state, meta, last.index, True, last.index, *runs, (last,), last.size_bytes)


class LmdbGroupStorage:
    """One group's log as the core reads it (LogStorage), answered from memory where it can.

    Invariant: the log database holds exactly this group's entries (meta.index, last_index].
    Reads are safe while another thread writes, except those that reach LMDB (old terms and
    entries, snapshot()) for the very group being written.
    """

    __slots__ = ("_dbs", "_view", "group_id")

    def __init__(self, dbs: _Databases, group_id: GroupId, view: _LogView) -> None:
        self._dbs = dbs
        self.group_id = group_id
        self._view = view

    def initial_state(self) -> tuple[HardState, ConfState]:
        view = self._view
        return view.hard_state, view.meta.conf

    def first_index(self) -> LogIndex:
        return LogIndex(self._view.meta.index + 1)

    def last_index(self) -> LogIndex:
        return self._view.last_index

    def term(self, index: LogIndex) -> Term:
        view = self._view
        meta = view.meta
        if index <= meta.index:
            if index == meta.index:
                return meta.term
            raise Compacted(f"index {index} is compacted (snapshot at {meta.index})")
        if index > view.last_index:
            raise IndexError(f"index {index} beyond last index {view.last_index}")
        if index >= view.terms_from:
            starts = view.run_starts
            if index >= starts[-1]:
                return view.run_terms[-1]
            return view.run_terms[bisect_right(starts, index) - 1]
        with self._dbs.env.begin(db=self._dbs.log) as txn:
            value = txn.get(_LOG_KEY.pack(self.group_id, index))
        return _decode_entry(self.group_id, index, value).term

    def entries(self, low: LogIndex, high: LogIndex, max_bytes: int | None = None) -> list[Entry]:
        view = self._view
        offset, last_index = view.meta.index, view.last_index
        if low <= offset:
            raise Compacted(f"index {low} is compacted (snapshot at {offset})")
        if high > last_index + 1:
            raise IndexError(f"entries up to {high - 1} requested, last is {last_index}")
        if low >= high:
            return []
        tail = view.tail
        tail_start = last_index + 1 - len(tail)
        if low >= tail_start:
            return limit_size(list(tail[low - tail_start : high - tail_start]), max_bytes)
        stored_high = min(high, tail_start)
        result = self._read_entries(low, stored_high, max_bytes)
        if high > tail_start and len(result) == stored_high - low:
            result.extend(tail[: high - tail_start])
        return limit_size(result, max_bytes)

    def snapshot(self) -> Snapshot:
        view = self._view
        if not view.is_persisted:
            return Snapshot(view.meta)
        with self._dbs.env.begin(db=self._dbs.snap) as txn:
            value = txn.get(_SNAP_KEY.pack(self.group_id))
        fields = _unseal(value, self.group_id)
        if fields is None or fields[0] != view.meta.index:
            raise CorruptLogError(self.group_id, view.meta.index, "snapshot data")
        data: bytes = fields[1]
        return Snapshot(view.meta, data)

    def _read_entries(self, low: int, high: int, max_bytes: int | None) -> list[Entry]:
        """Entries [low, high) from LMDB, stopping after the first one that exceeds max_bytes."""
        group_id = self.group_id
        result: list[Entry] = []
        total_bytes = 0
        index = low
        with self._dbs.env.begin(db=self._dbs.log) as txn:
            cursor = txn.cursor()
            if cursor.set_key(_LOG_KEY.pack(group_id, low)):
                for key, value in cursor.iternext():
                    if key != _LOG_KEY.pack(group_id, index):
                        break
                    entry = _decode_entry(group_id, index, value)
                    result.append(entry)
                    index += 1
                    total_bytes += entry.size_bytes
                    if index == high or (max_bytes is not None and total_bytes > max_bytes):
                        return result
        raise CorruptLogError(group_id, LogIndex(index), "log entry (missing)")


def must_be_durable(write: GroupWrite, persisted: HardState) -> bool:
    """Log entries, snapshots, term and vote must survive an OS crash before we act on them
    (acks, votes). The commit index need not (§3.8: it is volatile state, relearnt from the
    leader), nor the applied state committed beside it: the log replays it."""
    if write.entries or write.snapshot is not None:
        return True
    new = write.hard_state
    return new is not None and (new.term, new.voted_for) != (persisted.term, persisted.voted_for)


# --- The store: one environment, many groups. ---


class LmdbLogStore:
    """Every group's log in one LMDB environment; each `write()` is one transaction, one fsync.

    Writes may come from any thread (a lock serializes them, caches included); see
    LmdbGroupStorage for concurrent reads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size_bytes: int = 256 << 20,
        sync: bool = True,
    ) -> None:
        self._path = os.fspath(path)
        self._sync = sync
        os.makedirs(self._path, exist_ok=True)
        # metasync=False (MDB_NOMETASYNC): a commit flushes its data pages but not the meta page
        # that makes it current, so an OS crash may undo the last commit but never corrupts the
        # file (LMDB keeps ACI). Commits that must be durable (log entries, hard state) are then
        # followed by an explicit sync; an apply-only commit is not: the log replays it. That
        # saves one of the two flushes of the commit that follows every commit on a leader.
        self._env = env = lmdb.open(
            self._path,
            map_size=map_size_bytes,
            subdir=True,
            max_dbs=_MAX_DBS,
            sync=sync,
            metasync=False,
        )
        self._lock = threading.RLock()  # held from staging a write until its caches are installed
        self._groups: dict[GroupId, LmdbGroupStorage] = {}
        self._is_closed = False

        def open_dbs(txn: lmdb.Transaction[bytes]) -> _Databases:
            log = env.open_db(_LOG_DB, txn=txn)
            state = env.open_db(_STATE_DB, txn=txn)
            return _Databases(env, log, state, env.open_db(_SNAP_DB, txn=txn))

        try:
            self._dbs = self._transact(open_dbs)
        except BaseException:
            env.close()
            raise

    @property
    def env(self) -> lmdb.Environment:
        """The shared environment, so the application can keep its own named dbs in it."""
        return self._env

    def group(self, group_id: GroupId) -> LmdbGroupStorage:
        group = self._groups.get(group_id)
        if group is not None:
            return group
        if not 0 <= group_id <= _MAX_U64:
            raise ValueError(f"group id out of range: {group_id}")
        with self._lock:
            group = self._groups.get(group_id)
            if group is None:
                group = LmdbGroupStorage(self._dbs, group_id, _load_view(self._dbs, group_id))
                self._groups[group_id] = group
            return group

    def group_ids(self) -> list[GroupId]:
        """Groups with persisted state, in order (what to restart)."""
        found: list[GroupId] = []
        with self._env.begin(db=self._dbs.state) as txn:
            cursor = txn.cursor()
            positioned = cursor.first()
            while positioned:
                group_id, _ = _STATE_KEY.unpack(cursor.key())
                found.append(GroupId(group_id))
                if group_id == _MAX_U64:
                    break
                positioned = cursor.set_range(_STATE_KEY.pack(group_id + 1, 0))
        return found

    def bootstrap(self, group_id: GroupId, conf: ConfState) -> None:
        """Start a brand-new group with membership `conf`, exactly as `MemoryStorage(conf)` does
        (bootstrap_state); a no-op if the group has any state or `conf` has no voters."""
        with self._lock:
            if self.group(group_id)._view.is_persisted or not conf.voters:
                return
            hard_state, entries = bootstrap_state(conf)
            self.write([GroupWrite(group_id, hard_state, tuple(entries))])

    def write(
        self,
        writes: Iterable[GroupWrite],
        extra: Callable[[lmdb.Transaction[bytes]], None] | None = None,
    ) -> None:
        """Persist all `writes` and `extra(txn)` in one transaction: one commit, one fsync.

        `extra` is the application's own writes; it runs again if the map must grow, so it
        must only write through `txn`. The groups' caches change only after the commit.
        """
        batch = tuple(writes)
        with self._lock:
            groups = {write.group_id: self.group(write.group_id) for write in batch}

            def build(txn: lmdb.Transaction[bytes]) -> dict[GroupId, _LogView]:
                views: dict[GroupId, _LogView] = {}
                for write in batch:
                    view = views.get(write.group_id)
                    if view is None:
                        view = groups[write.group_id]._view
                    views[write.group_id] = self._stage_write(txn, write, view)
                if extra is not None:
                    extra(txn)
                return views

            durable = any(must_be_durable(w, groups[w.group_id]._view.hard_state) for w in batch)
            for group_id, view in self._transact(build, durable=durable).items():
                groups[group_id]._view = view

    def create_snapshot(
        self, group_id: GroupId, index: LogIndex, conf: ConfState, data: bytes
    ) -> None:
        """Record the application's snapshot at `index` (<= last_index) and compact behind it."""
        with self._lock:
            group = self.group(group_id)
            view = group._view
            if index <= view.meta.index:
                return
            if index > view.last_index:
                raise AssertionError(f"snapshot at {index} beyond last index {view.last_index}")
            meta = SnapshotMeta(index, group.term(index), conf)

            def build(txn: lmdb.Transaction[bytes]) -> None:
                _put_snapshot(txn, self._dbs, group_id, meta, data)
                _delete_log(txn, self._dbs, group_id, view.meta.index + 1, index)

            self._transact(build)
            group._view = view.compacted(meta)

    def drop_group(self, group_id: GroupId) -> None:
        """Delete all of a group's data (its replica left this node); its storage goes stale."""

        def build(txn: lmdb.Transaction[bytes]) -> None:
            _delete_log(txn, self._dbs, group_id, 0, _MAX_U64)
            txn.delete(_STATE_KEY.pack(group_id, _HARD_STATE), db=self._dbs.state)
            txn.delete(_STATE_KEY.pack(group_id, _SNAPSHOT_META), db=self._dbs.state)
            txn.delete(_SNAP_KEY.pack(group_id), db=self._dbs.snap)

        with self._lock:
            self._transact(build)
            self._groups.pop(group_id, None)

    def close(self) -> None:
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            if not self._sync:
                self._env.sync(True)
            self._env.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals --

    def _stage_write(
        self, txn: lmdb.Transaction[bytes], write: GroupWrite, view: _LogView
    ) -> _LogView:
        """Put one GroupWrite into `txn`; returns the group's view once that commits."""
        group_id, dbs = write.group_id, self._dbs
        snapshot = write.snapshot
        if snapshot is not None and snapshot.meta.index > view.meta.index:
            _delete_log(txn, dbs, group_id, view.meta.index + 1, view.last_index)
            _put_snapshot(txn, dbs, group_id, snapshot.meta, snapshot.data)
            view = view.restarted_at(snapshot.meta)
        entries = write.entries
        if entries and entries[0].index <= view.meta.index:
            entries = entries[view.meta.index + 1 - entries[0].index :]  # already in the snapshot
        if entries:
            first = entries[0].index
            if first > view.last_index + 1:
                raise AssertionError(
                    f"group {group_id}: gap in log: appending {first} after {view.last_index}"
                )
            txn.cursor(db=dbs.log).putmulti(
                [(_LOG_KEY.pack(group_id, e.index), _encode_entry(group_id, e)) for e in entries]
            )
            _delete_log(txn, dbs, group_id, entries[-1].index + 1, view.last_index)
            view = view.appended(entries)
        hard_state = write.hard_state
        if hard_state is not None:
            key = _STATE_KEY.pack(group_id, _HARD_STATE)
            txn.put(key, _encode_hard_state(group_id, hard_state), db=dbs.state)
            view = replace(view, hard_state=hard_state)
        if not view.is_persisted and (entries or hard_state is not None):
            _put_snapshot(txn, dbs, group_id, view.meta, b"")  # marks the group as existing
            view = replace(view, is_persisted=True)
        return view

    def _transact(
        self, build: Callable[[lmdb.Transaction[bytes]], _T], *, durable: bool = True
    ) -> _T:
        """Run `build` in one write transaction and commit; grow the map and retry when full.
        `durable=False`: an OS crash may undo this commit (a process crash never does)."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    result = build(txn)
                if durable and self._sync:
                    self._env.sync(True)  # flushes the meta page metasync=False left behind
                return result
            except lmdb.MapFullError:
                self._grow_map()
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                self._env.set_mapsize(0)
            except lmdb.DiskError as exc:
                raise StorageFullError(self._path, f"the disk is full ({exc})") from exc
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise StorageFullError(self._path, f"the disk is full ({exc})") from exc

    def _grow_map(self) -> None:
        # NB: LMDB remaps in place and does not check for readers: no read transaction of this
        # process (ours or the application's) may be open meanwhile. Size the map generously.
        map_size = self._env.info()["map_size"]
        if map_size >= _MAX_MAP_SIZE_BYTES:
            raise StorageFullError(self._path, f"the LMDB map reached {map_size} bytes")
        self._env.set_mapsize(min(map_size * 2, _MAX_MAP_SIZE_BYTES))
