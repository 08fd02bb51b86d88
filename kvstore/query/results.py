"""The values a query produces: a shard's partials (rows or aggregate states, with stats) and
the coordinator's answer, with their msgpack-friendly wire forms. Pure data, no I/O."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

from kvstore.query.reducers import GroupedAggregates

WIRE_VERSION: Final = 1
JSON_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, slots=True)
class ShardStats:
    rows_scanned: int = 0  # rows the shard read
    rows_matched: int = 0  # rows passing range and where
    rows_not_json: int = 0  # among rows the query had to decode
    bytes_scanned: int = 0  # value bytes read
    bytes_moved: int = 0  # the partial's size on the wire (set by decode_partial)
    elapsed_s: float = 0.0  # set by the executor, which owns the clock

    def plus(self, other: ShardStats) -> ShardStats:
        return ShardStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_wire(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_wire(cls, wire: Sequence[Any]) -> ShardStats:
        if len(wire) != len(fields(cls)) or not all(type(x) in (int, float) for x in wire):
            raise ValueError(f"malformed shard stats: {wire!r:.200}")
        return cls(*wire)


Row = tuple[str, bytes | None]  # (key, the row's value as UTF-8 JSON; None: not JSON)


@dataclass(frozen=True, slots=True)
class RowsPartial:
    shard: int
    rows: tuple[Row, ...]  # Invariant: ascending keys
    stats: ShardStats


@dataclass(frozen=True, slots=True)
class AggregatesPartial:
    shard: int
    groups: GroupedAggregates
    stats: ShardStats


Partial = RowsPartial | AggregatesPartial


@dataclass(frozen=True, slots=True)
class ReadPoint:
    """Where a shard's answer was read: the node that scanned it and the applied index its
    snapshot held (every row of that shard's answer is as of exactly this index)."""

    shard: int
    node: int
    applied_index: int


@dataclass(frozen=True, slots=True)
class QueryStats:
    per_shard: tuple[tuple[int, ShardStats], ...] = ()  # ascending shard id
    read_points: tuple[ReadPoint, ...] = ()  # set by the coordinator, which knows them

    @classmethod
    def of(cls, partials: Iterable[Partial]) -> QueryStats:
        by_shard: dict[int, ShardStats] = {}
        for partial in partials:
            by_shard[partial.shard] = by_shard.get(partial.shard, ShardStats()).plus(partial.stats)
        return cls(tuple(sorted(by_shard.items())))

    def to_json(self) -> dict[str, Any]:
        total = ShardStats()
        for _, stats in self.per_shard:
            total = total.plus(stats)
        counts = ("rows_scanned", "rows_matched", "rows_not_json", "bytes_scanned", "bytes_moved")
        doc: dict[str, Any] = {"shards": len(self.per_shard)}
        doc.update((name, getattr(total, name)) for name in counts)
        points = {point.shard: point for point in self.read_points}
        doc["per_shard"] = [
            {"shard": shard}
            | {name: getattr(stats, name) for name in counts}
            | {"elapsed_ms": round(stats.elapsed_s * 1000, 3)}
            | (
                {"node": points[shard].node, "applied_index": points[shard].applied_index}
                if shard in points
                else {}
            )
            for shard, stats in self.per_shard
        ]
        return doc

    def to_wire(self) -> tuple[Any, ...]:
        return (
            tuple((shard, stats.to_wire()) for shard, stats in self.per_shard),
            tuple((p.shard, p.node, p.applied_index) for p in self.read_points),
        )

    @classmethod
    def from_wire(cls, wire: Sequence[Any]) -> QueryStats:
        per_shard, read_points = wire
        return cls(
            tuple((shard, ShardStats.from_wire(stats)) for shard, stats in per_shard),
            tuple(ReadPoint(*point) for point in read_points),
        )


@dataclass(frozen=True, slots=True)
class QueryResult:
    rows: tuple[dict[str, Any], ...]  # select: {"key", "value"} or {"key", "not_json": true}
    next_cursor: str | None  # select: pass back as cursor for the next page; None: no more
    groups: tuple[dict[str, Any], ...]  # aggregates: {"group": {...}, "aggregates": {...}}
    stats: QueryStats
    missing_shards: tuple[int, ...] = ()  # shards left out (only with allow_partial)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "next_cursor": self.next_cursor,
            "groups": list(self.groups),
            "stats": self.stats.to_json(),
            "missing_shards": list(self.missing_shards),
            "partial": bool(self.missing_shards),
        }

    def to_wire(self) -> tuple[Any, ...]:
        return (
            WIRE_VERSION,
            JSON_ENCODER.encode(self.rows),
            self.next_cursor,
            JSON_ENCODER.encode(self.groups),
            self.stats.to_wire(),
            self.missing_shards,
        )

    @classmethod
    def from_wire(cls, wire: Sequence[Any]) -> QueryResult:
        version, rows, next_cursor, groups, stats, missing = wire
        if version != WIRE_VERSION:
            raise ValueError(f"unknown query result version {version!r}")
        return cls(
            tuple(json.loads(rows)),
            next_cursor,
            tuple(json.loads(groups)),
            QueryStats.from_wire(stats),
            tuple(missing),
        )


__all__ = [
    "AggregatesPartial",
    "Partial",
    "QueryResult",
    "QueryStats",
    "ReadPoint",
    "Row",
    "RowsPartial",
    "ShardStats",
]
