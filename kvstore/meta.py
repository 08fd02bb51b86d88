"""The metadata Raft group's state machine: the shard map, replicated so every node agrees on
it and changes to it are linearizable. Members serve it; other nodes cache a copy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lmdb
import msgpack

from kvstore.sharding import ShardMap
from raft.core.messages import Entry, EntryKind, Snapshot
from raft.core.types import LogIndex

_MAP_KEY = b"shard_map"
_APPLIED_KEY = b"applied"
_SET_MAP = 1


def encode_set_map(shard_map: ShardMap) -> bytes:
    packed: bytes = msgpack.packb((_SET_MAP, shard_map.encode()))
    return packed


class MetaStateMachine:
    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._db = env.open_db(b"meta.state")
        with env.begin(db=self._db) as txn:
            raw = txn.get(_MAP_KEY)
        self._map: ShardMap | None = ShardMap.decode(raw) if raw else None

    @property
    def shard_map(self) -> ShardMap | None:
        return self._map

    def initialize(self, shard_map: ShardMap) -> None:
        """Every founding node writes the same initial map before its meta replica starts."""
        if self._map is not None:
            return
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_MAP_KEY, shard_map.encode())
        self._map = shard_map

    def adopt(self, shard_map: ShardMap) -> bool:
        """Cache a newer map learned from a peer (this node's copy was stale). Returns whether
        it was newer. Deterministic apply is unaffected: Raft only ever moves the epoch up."""
        if self._map is not None and shard_map.epoch <= self._map.epoch:
            return False
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_MAP_KEY, shard_map.encode())
        self._map = shard_map
        return True

    def applied_index(self) -> LogIndex:
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(_APPLIED_KEY)
        return LogIndex(int.from_bytes(raw, "big") if raw else 0)

    def apply(self, txn: Any, entries: Sequence[Entry]) -> list[object]:
        results: list[object] = []
        for entry in entries:
            result: object = None
            if entry.kind is EntryKind.NORMAL and entry.data:
                tag, payload = msgpack.unpackb(entry.data)
                if tag != _SET_MAP:
                    raise AssertionError(f"unknown meta command {tag} at index {entry.index}")
                new_map = ShardMap.decode(payload)
                # Deterministic: only a newer epoch replaces the map.
                if self._map is None or new_map.epoch > self._map.epoch:
                    txn.put(_MAP_KEY, payload, db=self._db)
                    self._map = new_map
                result = self._map.epoch if self._map else 0
            results.append(result)
        if entries:
            txn.put(_APPLIED_KEY, entries[-1].index.to_bytes(8, "big"), db=self._db)
        return results

    def snapshot(self) -> bytes:
        return self._map.encode() if self._map else b""

    def restore(self, txn: Any, snapshot: Snapshot) -> None:
        if snapshot.data:
            txn.put(_MAP_KEY, snapshot.data, db=self._db)
            self._map = ShardMap.decode(snapshot.data)
        txn.put(_APPLIED_KEY, snapshot.meta.index.to_bytes(8, "big"), db=self._db)
