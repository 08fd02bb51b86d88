"""The metadata Raft group's state machine: the shard map, replicated so every node agrees on
it and changes to it are linearizable. Members serve it; other nodes cache a copy. Changes
(kvstore.map_changes) apply deterministically, or are refused as a Failed outcome."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lmdb
import msgpack

from kvstore.commands import FAILED_PRECONDITION, Failed
from kvstore.map_changes import ChangeRefused, MapChange, apply_change, decode_change
from kvstore.service import KeyVersion
from kvstore.sharding import ShardMap
from raft.core.messages import Entry, EntryKind, Snapshot
from raft.core.types import LogIndex

_MAP_KEY = b"shard_map"
_APPLIED_KEY = b"applied"
_CACHE_KEY = b"learned_shard_map"
_SET_MAP = 1


SHARD_MAP_KEY = "(shard map)"  # what a change's KeyVersion names: its version is the epoch


def encode_set_map(shard_map: ShardMap) -> bytes:
    packed: bytes = msgpack.packb((_SET_MAP, shard_map.encode()))
    return packed


def decode_meta_command(data: bytes) -> ShardMap | MapChange:
    """Raises ValueError for anything that is not a meta command."""
    try:
        tag, *fields = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ValueError(f"malformed meta command: {error}") from error
    if tag == _SET_MAP:
        (payload,) = fields
        return ShardMap.decode(payload)
    if type(tag) is not int:
        raise ValueError("malformed meta command tag")
    return decode_change(tag, fields)


class MetaStateMachine:
    """The map this node's meta replica applied (_MAP_KEY, Raft state: only apply, restore
    and the founding initialize write it) and, apart, the newest map learned from peers
    (_CACHE_KEY): a node outside the meta group, or a member that lags, still routes by it."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._db = env.open_db(b"meta.state")
        with env.begin(db=self._db) as txn:
            raw, cached = txn.get(_MAP_KEY), txn.get(_CACHE_KEY)
        self._map: ShardMap | None = ShardMap.decode(raw) if raw else None
        self._cached: ShardMap | None = ShardMap.decode(cached) if cached else None

    @property
    def shard_map(self) -> ShardMap | None:
        """The newest map this node knows, applied or learned."""
        if self._cached is None or (self._map and self._map.epoch >= self._cached.epoch):
            return self._map
        return self._cached

    def initialize(self, shard_map: ShardMap) -> None:
        """Every founding node writes the same initial map before its meta replica starts."""
        if self.shard_map is not None:
            return
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_MAP_KEY, shard_map.encode())
        self._map = shard_map

    def adopt(self, shard_map: ShardMap) -> bool:
        """Cache a newer map learned from a peer (this node's copy was stale). Returns whether
        it was newer. The applied map, and so deterministic apply, is unaffected."""
        current = self.shard_map
        if current is not None and shard_map.epoch <= current.epoch:
            return False
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_CACHE_KEY, shard_map.encode())
        self._cached = shard_map
        return True

    def clear_applied(self) -> None:
        """A new meta replica starts here: it applies from a snapshot, never from the state
        of a replica this node hosted before. The learned map stays for routing meanwhile."""
        current = self.shard_map
        with self._env.begin(write=True, db=self._db) as txn:
            txn.delete(_APPLIED_KEY)
            txn.delete(_MAP_KEY)
            if current is not None:
                txn.put(_CACHE_KEY, current.encode())
        self._map, self._cached = None, current

    def applied_index(self) -> LogIndex:
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(_APPLIED_KEY)
        return LogIndex(int.from_bytes(raw, "big") if raw else 0)

    def apply(self, txn: Any, entries: Sequence[Entry]) -> list[object]:
        results: list[object] = []
        for entry in entries:
            result: object = None
            if entry.kind is EntryKind.NORMAL and entry.data:
                try:
                    command = decode_meta_command(entry.data)
                except ValueError as error:
                    raise AssertionError(f"meta entry {entry.index}: {error}") from error
                result = self._apply_one(txn, command)
            results.append(result)
        if entries:
            txn.put(_APPLIED_KEY, entries[-1].index.to_bytes(8, "big"), db=self._db)
        return results

    def _apply_one(self, txn: Any, command: ShardMap | MapChange) -> KeyVersion | Failed:
        # The map as of this txn, not self._map: apply may be re-run on a retried txn.
        raw = txn.get(_MAP_KEY, db=self._db)
        current = ShardMap.decode(raw) if raw else None
        if isinstance(command, ShardMap):
            new_map = command
        elif current is None:
            raise AssertionError("a map change reached a meta group with no map")
        else:
            try:
                new_map = apply_change(current, command)
            except ChangeRefused as error:
                return Failed(FAILED_PRECONDITION, str(error), current.epoch)
        # Deterministic: only a newer epoch replaces the map.
        if current is None or new_map.epoch > current.epoch:
            txn.put(_MAP_KEY, new_map.encode(), db=self._db)
            current = new_map
        self._map = current
        return KeyVersion(SHARD_MAP_KEY, current.epoch)

    def snapshot(self) -> bytes:
        return self._map.encode() if self._map else b""

    def restore(self, txn: Any, snapshot: Snapshot) -> None:
        if snapshot.data:
            txn.put(_MAP_KEY, snapshot.data, db=self._db)
            self._map = ShardMap.decode(snapshot.data)
        txn.put(_APPLIED_KEY, snapshot.meta.index.to_bytes(8, "big"), db=self._db)
