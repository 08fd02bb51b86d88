"""Durable Raft log storage: the write side the runtime drives after each Ready.

The core only sees the read-only `LogStorage` protocol; this package implements it on LMDB.
"""

from __future__ import annotations

from raft.storage.lmdb_log import (
    CorruptLogError,
    GroupId,
    GroupWrite,
    LmdbGroupStorage,
    LmdbLogStore,
    StorageFullError,
)

__all__ = [
    "CorruptLogError",
    "GroupId",
    "GroupWrite",
    "LmdbGroupStorage",
    "LmdbLogStore",
    "StorageFullError",
]
