"""The bytes of one shard's snapshot (KVStateMachine.snapshot()): what Raft sends to a lagging
replica and what a backup file holds. A msgpack tuple behind an xxh64 checksum of it; parsing
verifies the checksum and the shard id before anything else, and trusts nothing inside.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import xxhash

_DIGEST = struct.Struct(">Q")
_FORMAT = 1
_LENGTH = struct.Struct(">I")

Record = tuple[bytes, int, bytes]  # (key, version or entry index, value or outcome)


def encode_shard_snapshot(
    shard_id: int, applied: int, data: Sequence[Record], idem: Sequence[Record]
) -> bytes:
    payload: bytes = msgpack.packb((_FORMAT, shard_id, applied, data, idem))
    return _DIGEST.pack(xxhash.xxh64_intdigest(payload)) + payload


def parse_shard_snapshot(blob: bytes, shard_id: int) -> tuple[int, list[Record], list[Record]]:
    """(applied index, data, idempotency records) of a KVStateMachine.snapshot() blob of
    shard_id, checksum verified; ValueError otherwise."""
    if len(blob) < _DIGEST.size:
        raise ValueError("snapshot too short")
    payload = blob[_DIGEST.size :]
    if xxhash.xxh64_intdigest(payload) != _DIGEST.unpack_from(blob)[0]:
        raise ValueError(f"shard {shard_id}: snapshot failed its checksum")
    try:
        form, blob_shard_id, applied, data, idem = msgpack.unpackb(payload, use_list=False)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"shard {shard_id}: malformed snapshot: {exc}") from exc
    if form != _FORMAT or blob_shard_id != shard_id:
        raise ValueError(f"snapshot of shard {blob_shard_id} (format {form}), not {shard_id}")
    if type(applied) is not int or not isinstance(data, tuple) or not isinstance(idem, tuple):
        raise ValueError(f"shard {shard_id}: malformed snapshot header")
    return applied, [_triple(item) for item in data], [_triple(item) for item in idem]


def backup_summary(blob: bytes, shard_id: int) -> tuple[int, int, int]:
    """(applied index, key count, content digest) of a snapshot() blob of shard_id, the
    facts a backup manifest records; ValueError unless the blob is intact and of that shard."""
    applied, data, _ = parse_shard_snapshot(blob, shard_id)
    return applied, len(data), content_digest(data)


def content_digest(data: Sequence[Record]) -> int:
    """xxh64 over every (key, value) in key order, versions left out: a restore keeps the
    data but gives every key a new version."""
    hasher = xxhash.xxh64()
    for key, _, value in data:
        hasher.update(_LENGTH.pack(len(key)) + key + _LENGTH.pack(len(value)))
        hasher.update(value)
    return hasher.intdigest()


def _triple(item: Any) -> Record:
    if not isinstance(item, tuple) or len(item) != 3:
        raise ValueError(f"malformed snapshot record {item!r:.100}")
    key, number, blob = item
    if not (isinstance(key, bytes) and isinstance(number, int) and isinstance(blob, bytes)):
        raise ValueError(f"malformed snapshot record {item!r:.100}")
    return key, number, blob
