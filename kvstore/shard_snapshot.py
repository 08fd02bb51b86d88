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
_FORMAT = 2  # 2 adds the shard's token range (format 1: a shard never split)
_FORMATS = (1, 2)
_LENGTH = struct.Struct(">I")

Record = tuple[bytes, int, bytes]  # (key, version or entry index, value or outcome)
TokenRange = tuple[int, int]  # [start, end) of the key tokens a shard holds


def encode_shard_snapshot(
    shard_id: int,
    applied: int,
    data: Sequence[Record],
    idem: Sequence[Record],
    token_range: TokenRange | None = None,  # None: never split, the shard's range is the map's
) -> bytes:
    # As [start, last]: the ring's end (2**64) does not fit msgpack's integers.
    inclusive = None if token_range is None else (token_range[0], token_range[1] - 1)
    payload: bytes = msgpack.packb((_FORMAT, shard_id, applied, data, idem, inclusive))
    return _DIGEST.pack(xxhash.xxh64_intdigest(payload)) + payload


def parse_shard_snapshot(blob: bytes, shard_id: int) -> tuple[int, list[Record], list[Record]]:
    """(applied index, data, idempotency records) of a KVStateMachine.snapshot() blob of
    shard_id, checksum verified; ValueError otherwise."""
    applied, data, idem, _ = parse_shard_snapshot_with_range(blob, shard_id)
    return applied, data, idem


def parse_shard_snapshot_with_range(
    blob: bytes, shard_id: int
) -> tuple[int, list[Record], list[Record], TokenRange | None]:
    """parse_shard_snapshot, plus the token range the shard kept after a split (None: never
    split)."""
    if len(blob) < _DIGEST.size:
        raise ValueError("snapshot too short")
    payload = blob[_DIGEST.size :]
    if xxhash.xxh64_intdigest(payload) != _DIGEST.unpack_from(blob)[0]:
        raise ValueError(f"shard {shard_id}: snapshot failed its checksum")
    try:
        form, blob_shard_id, applied, data, idem, *rest = msgpack.unpackb(payload, use_list=False)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"shard {shard_id}: malformed snapshot: {exc}") from exc
    if form not in _FORMATS or blob_shard_id != shard_id or len(rest) != form - 1:
        raise ValueError(f"snapshot of shard {blob_shard_id} (format {form}), not {shard_id}")
    if type(applied) is not int or not isinstance(data, tuple) or not isinstance(idem, tuple):
        raise ValueError(f"shard {shard_id}: malformed snapshot header")
    inclusive = rest[0] if rest else None
    if inclusive is not None and not (
        isinstance(inclusive, tuple)
        and len(inclusive) == 2
        and all(type(t) is int for t in inclusive)
        and 0 <= inclusive[0] <= inclusive[1]
    ):
        raise ValueError(f"shard {shard_id}: malformed token range {inclusive!r:.100}")
    token_range = None if inclusive is None else (inclusive[0], inclusive[1] + 1)
    records = [_triple(item) for item in data]
    return applied, records, [_triple(item) for item in idem], token_range


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
