"""Query execution without I/O. A shard runs execute_on_rows (or iter_partials, to stream in
bounded chunks) over its rows in key order: decode each value once, filter, then project rows or
pre-aggregate into mergeable states. The coordinator runs merge_partials: a k-way ordered merge
of rows honoring limit and cursor, or a combine of aggregate states, plus summed stats.

Nothing here awaits, reads a clock or touches LMDB: the executor owns those and fills
ShardStats.elapsed_s; decode_partial fills bytes_moved from the payload it decodes.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any

import msgpack

from kvstore.errors import ShardUnavailable
from kvstore.query.documents import (
    KEY_FIELD,
    MISSING,
    NOT_JSON,
    FieldGetter,
    canonical_text,
    decode_document,
    from_canonical_text,
    make_getter,
    value_order,
)
from kvstore.query.plugins import PluginRegistry
from kvstore.query.predicates import CompiledWhere, compile_where
from kvstore.query.reducers import (
    AggregateState,
    Avg,
    Count,
    CountDistinct,
    GroupedAggregates,
    GroupKey,
    Max,
    Min,
    PluginState,
    Sum,
    TopK,
)
from kvstore.query.results import (
    JSON_ENCODER,
    WIRE_VERSION,
    AggregatesPartial,
    Partial,
    QueryResult,
    QueryStats,
    Row,
    RowsPartial,
    ShardStats,
)
from kvstore.query.spec import (
    DEFAULT_LIMITS,
    Aggregate,
    AggregateFn,
    QueryLimits,
    QuerySpec,
    encode_cursor,
    parse_query,
)


class Phase(enum.Enum):
    SCAN_ROWS = "scan_rows"  # select: filter, project, return rows in key order
    PRE_AGGREGATE = "pre_aggregate"  # aggregates: filter, map, return one state per group


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """What one shard leader executes. It crosses the wire as the spec's canonical JSON, which
    the shard parses again under its own limits and plugins (so it re-validates)."""

    spec: QuerySpec
    phase: Phase
    shard: int
    max_groups: int = DEFAULT_LIMITS.max_groups

    def __post_init__(self) -> None:
        if (self.phase is Phase.SCAN_ROWS) != self.spec.is_select:
            raise ValueError(f"phase {self.phase.value} does not run this query")

    @classmethod
    def for_shard(
        cls, spec: QuerySpec, shard: int, limits: QueryLimits = DEFAULT_LIMITS
    ) -> ShardPlan:
        phase = Phase.SCAN_ROWS if spec.is_select else Phase.PRE_AGGREGATE
        return cls(spec, phase, shard, limits.max_groups)

    def to_wire(self) -> tuple[Any, ...]:
        spec_json = json.dumps(self.spec.to_json(), separators=(",", ":"))
        return (WIRE_VERSION, self.phase.value, self.shard, self.max_groups, spec_json)

    @classmethod
    def from_wire(
        cls,
        wire: Sequence[Any],
        limits: QueryLimits = DEFAULT_LIMITS,
        plugins: PluginRegistry | None = None,
    ) -> ShardPlan:
        version, phase, shard, max_groups, spec_json = wire
        if version != WIRE_VERSION or type(shard) is not int or type(max_groups) is not int:
            raise ValueError(f"malformed shard plan: {wire!r:.200}")
        return cls(
            parse_query(json.loads(spec_json), limits, plugins), Phase(phase), shard, max_groups
        )


# ---- compiling a spec ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Compiled:
    where: CompiledWhere
    needs_document: bool
    projections: tuple[tuple[str, FieldGetter], ...] | None  # None: whole values ("*")
    group_getters: tuple[FieldGetter, ...]
    feeds: tuple[FieldGetter | None, ...]  # per aggregate; None: count rows
    new_states: Callable[[], list[AggregateState]]
    decode_states: Callable[[Sequence[Any]], list[AggregateState]]


def _plugin_getter(map_fn: Callable[[str, Any], Any]) -> FieldGetter:
    return lambda key, document: MISSING if document is NOT_JSON else map_fn(key, document)


def _state_kit(
    aggregate: Aggregate, threshold: int, plugins: PluginRegistry | None
) -> tuple[FieldGetter | None, Callable[[], AggregateState], Callable[[Any], AggregateState]]:
    getter = None if aggregate.field is None else make_getter(aggregate.field)
    fn = aggregate.fn
    if fn is AggregateFn.PLUGIN:
        plugin = (plugins or PluginRegistry()).get(aggregate.plugin or "")
        reduce_fn = plugin.reduce_fn
        return (
            _plugin_getter(plugin.map_fn),
            lambda: PluginState(reduce_fn),
            lambda wire: PluginState.from_wire(wire, reduce_fn),
        )
    if fn is AggregateFn.COUNT_DISTINCT:
        return (
            getter,
            lambda: CountDistinct(threshold),
            lambda wire: CountDistinct.from_wire(wire, threshold),
        )
    if fn is AggregateFn.TOP_K:
        k, capacity = aggregate.k or 10, aggregate.capacity or 256
        return getter, lambda: TopK(k, capacity), lambda wire: TopK.from_wire(wire, k, capacity)
    simple: dict[AggregateFn, Any] = {
        AggregateFn.COUNT: Count,
        AggregateFn.SUM: Sum,
        AggregateFn.AVG: Avg,
        AggregateFn.MIN: Min,
        AggregateFn.MAX: Max,
    }
    cls = simple[fn]
    return getter, cls, cls.from_wire


def _compile(spec: QuerySpec, plugins: PluginRegistry | None) -> _Compiled:
    where = compile_where(spec.where)
    kits = [
        _state_kit(aggregate, spec.approximate_distinct_threshold, plugins)
        for aggregate in spec.aggregates.values()
    ]
    makers = tuple(kit[1] for kit in kits)
    decoders = tuple(kit[2] for kit in kits)

    def new_states() -> list[AggregateState]:
        return [make() for make in makers]

    def decode_states(wires: Sequence[Any]) -> list[AggregateState]:
        if len(wires) != len(decoders):
            raise ValueError(f"expected {len(decoders)} aggregate states, got {len(wires)}")
        return [decode(wire) for decode, wire in zip(decoders, wires, strict=True)]

    read_fields = [*spec.group_by, *(a.field for a in spec.aggregates.values() if a.field)]
    needs_document = (
        spec.is_select
        or where.document_test is not None
        or any(path != KEY_FIELD for path in read_fields)
        or any(a.fn is AggregateFn.PLUGIN for a in spec.aggregates.values())
    )
    projections = None
    if spec.select is not None and spec.select != "*":
        projections = tuple((path, make_getter(path)) for path in spec.select)
    return _Compiled(
        where=where,
        needs_document=needs_document,
        projections=projections,
        group_getters=tuple(make_getter(path) for path in spec.group_by),
        feeds=tuple(kit[0] for kit in kits),
        new_states=new_states,
        decode_states=decode_states,
    )


# ---- the shard side -------------------------------------------------------------------------


class _Counters:
    __slots__ = ("bytes_scanned", "rows_matched", "rows_not_json", "rows_scanned")

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.rows_scanned = self.rows_matched = self.rows_not_json = self.bytes_scanned = 0

    def take(self) -> ShardStats:
        """The stats since the last take (each chunk carries its own share)."""
        stats = ShardStats(
            self.rows_scanned, self.rows_matched, self.rows_not_json, self.bytes_scanned
        )
        self._reset()
        return stats


def _matching(
    spec: QuerySpec, compiled: _Compiled, rows: Iterable[tuple[str, bytes]], counters: _Counters
) -> Iterator[tuple[str, bytes, Any]]:
    """(key, raw value, document) of each row in range passing where; stops past the range."""
    start, end, prefix, after = spec.start, spec.end, spec.prefix, spec.after_key
    key_test, document_test = compiled.where.key_test, compiled.where.document_test
    needs_document = compiled.needs_document
    previous: str | None = None
    for key, raw in rows:
        if previous is not None and key <= previous:
            raise AssertionError(f"shard rows out of key order: {key!r} after {previous!r}")
        previous = key
        counters.rows_scanned += 1
        counters.bytes_scanned += len(raw)
        if end is not None and key >= end:
            break
        if prefix is not None and not key.startswith(prefix):
            if key > prefix:
                break  # keys having a prefix are contiguous in key order
            continue
        if (start is not None and key < start) or (after is not None and key <= after):
            continue
        if key_test is not None and not key_test(key):
            continue
        document: Any = NOT_JSON
        if needs_document:
            document = decode_document(raw)
            if document is NOT_JSON:
                counters.rows_not_json += 1
        if document_test is not None and (document is NOT_JSON or not document_test(document)):
            continue
        counters.rows_matched += 1
        yield key, raw, document


def _project(compiled: _Compiled, key: str, raw: bytes, document: Any) -> bytes | None:
    if document is NOT_JSON:
        return None
    if compiled.projections is None:
        return bytes(raw)
    projected = {}
    for path, getter in compiled.projections:
        value = getter(key, document)
        if value is not MISSING:
            projected[path] = value
    return JSON_ENCODER.encode(projected).encode("utf-8")


def _scan_rows(
    plan: ShardPlan,
    compiled: _Compiled,
    rows: Iterable[tuple[str, bytes]],
    chunk_rows: int,
    chunk_bytes: int,
) -> Iterator[RowsPartial]:
    """Up to limit + 1 rows (one more than a page tells the coordinator another page exists),
    in chunks closed at chunk_rows rows or once they hold chunk_bytes of values."""
    counters = _Counters()
    wanted = plan.spec.limit + 1
    chunk: list[Row] = []
    size = 0
    for key, raw, document in _matching(plan.spec, compiled, rows, counters):
        value = _project(compiled, key, raw, document)
        chunk.append((key, value))
        wanted -= 1
        if wanted == 0:
            break
        size += len(key) + (0 if value is None else len(value))
        if len(chunk) == chunk_rows or size >= chunk_bytes:
            yield RowsPartial(plan.shard, tuple(chunk), counters.take())
            chunk, size = [], 0
    yield RowsPartial(plan.shard, tuple(chunk), counters.take())


def _group_text(value: Any) -> str:
    return "" if value is MISSING else canonical_text(value)


def _pre_aggregate(
    plan: ShardPlan, compiled: _Compiled, rows: Iterable[tuple[str, bytes]]
) -> AggregatesPartial:
    counters = _Counters()
    grouped = GroupedAggregates(compiled.new_states, plan.max_groups)
    groups, group_getters, feeds = grouped.groups, compiled.group_getters, compiled.feeds
    if not group_getters:  # one group: no per-row group key, and rows counted in bulk
        states = grouped.states_for(())
        fed = [(state, feed) for state, feed in zip(states, feeds, strict=True) if feed]
        matched = 0
        for key, _raw, document in _matching(plan.spec, compiled, rows, counters):
            matched += 1
            for state, feed in fed:
                value = feed(key, document)
                if value is not None and value is not MISSING:
                    state.add(value)
        for state, maybe_feed in zip(states, feeds, strict=True):
            if maybe_feed is None:
                assert isinstance(state, Count), state
                state.add_rows(matched)
        return AggregatesPartial(plan.shard, grouped, counters.take())
    # Group values repeat: a string's group key is built once (only strings: in a dict,
    # True == 1 == 1.0, and those must stay apart).
    string_keys: dict[str, GroupKey] = {}
    for key, _raw, document in _matching(plan.spec, compiled, rows, counters):
        if len(group_getters) == 1:
            value = group_getters[0](key, document)
            if type(value) is str:
                group_key = string_keys.get(value) or string_keys.setdefault(
                    value, (_group_text(value),)
                )
            else:
                group_key = (_group_text(value),)
        else:
            group_key = tuple(_group_text(get(key, document)) for get in group_getters)
        states = groups.get(group_key) or grouped.states_for(group_key)
        for state, getter in zip(states, feeds, strict=True):
            if getter is None:
                state.add(None)
            else:
                value = getter(key, document)
                if value is not None and value is not MISSING:
                    state.add(value)
    return AggregatesPartial(plan.shard, grouped, counters.take())


def execute_on_rows(
    plan: ShardPlan, rows: Iterable[tuple[str, bytes]], plugins: PluginRegistry | None = None
) -> Partial:
    """The shard side, in one partial. `rows` are (key, value bytes) in ascending key order, as
    a shard scan yields them; rows outside the spec's range are skipped, and reading stops past
    its end (and, for select, after limit + 1 matching rows)."""
    unbounded = 1 << 62
    chunks = iter_partials(
        plan, rows, max_items_per_chunk=unbounded, max_chunk_bytes=unbounded, plugins=plugins
    )
    return next(chunks)


def iter_partials(
    plan: ShardPlan,
    rows: Iterable[tuple[str, bytes]],
    *,
    max_items_per_chunk: int,
    max_chunk_bytes: int = 1 << 20,
    plugins: PluginRegistry | None = None,
) -> Iterator[Partial]:
    """The shard side, streamed in bounded chunks: select rows are sent as soon as a chunk holds
    max_items_per_chunk rows or max_chunk_bytes of keys and values (a single bigger row goes
    alone); aggregate groups, max_items_per_chunk per chunk, after the scan. Each chunk carries
    its share of the stats; merge_partials takes them all, from every shard, in any order."""
    if max_items_per_chunk < 1 or max_chunk_bytes < 1:
        raise ValueError("max_items_per_chunk and max_chunk_bytes must be positive")
    compiled = _compile(plan.spec, plugins)
    if plan.phase is Phase.SCAN_ROWS:
        yield from _scan_rows(plan, compiled, rows, max_items_per_chunk, max_chunk_bytes)
        return
    whole = _pre_aggregate(plan, compiled, rows)
    items = list(whole.groups.groups.items())
    for offset in range(0, max(len(items), 1), max_items_per_chunk):
        part = GroupedAggregates(compiled.new_states, plan.max_groups)
        part.groups.update(items[offset : offset + max_items_per_chunk])
        is_last = offset + max_items_per_chunk >= len(items)
        yield AggregatesPartial(plan.shard, part, whole.stats if is_last else ShardStats())


# ---- the wire -------------------------------------------------------------------------------


def partial_to_wire(partial: Partial) -> tuple[Any, ...]:
    if isinstance(partial, RowsPartial):
        return ("rows", partial.shard, partial.rows, partial.stats.to_wire())
    return ("aggregates", partial.shard, partial.groups.to_wire(), partial.stats.to_wire())


def partial_from_wire(
    spec: QuerySpec,
    wire: Sequence[Any],
    *,
    limits: QueryLimits = DEFAULT_LIMITS,
    plugins: PluginRegistry | None = None,
) -> Partial:
    kind, shard, body, stats_wire = wire
    if type(shard) is not int:
        raise ValueError(f"malformed partial: shard {shard!r} is not an int")
    stats = ShardStats.from_wire(stats_wire)
    if kind == "rows" and spec.is_select:
        rows = tuple((key, value) for key, value in body)
        if not all(type(k) is str and (v is None or type(v) is bytes) for k, v in rows):
            raise ValueError("malformed rows partial: rows are (str, bytes | None)")
        return RowsPartial(shard, rows, stats)
    if kind == "aggregates" and not spec.is_select:
        compiled = _compile(spec, plugins)
        groups = GroupedAggregates.from_wire(
            body, compiled.new_states, compiled.decode_states, limits.max_groups
        )
        return AggregatesPartial(shard, groups, stats)
    raise ValueError(f"a {kind!r} partial does not answer this query")


def encode_partial(partial: Partial) -> bytes:
    return bytes(msgpack.packb(partial_to_wire(partial), use_bin_type=True))


def decode_partial(
    spec: QuerySpec,
    payload: bytes,
    *,
    limits: QueryLimits = DEFAULT_LIMITS,
    plugins: PluginRegistry | None = None,
) -> Partial:
    """Decode a partial and record its payload size as stats.bytes_moved."""
    wire = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
    partial = partial_from_wire(spec, wire, limits=limits, plugins=plugins)
    return replace(partial, stats=replace(partial.stats, bytes_moved=len(payload)))


# ---- the coordinator side -------------------------------------------------------------------


def _row_json(key: str, value: bytes | None) -> dict[str, Any]:
    if value is None:
        return {"key": key, "not_json": True}
    return {"key": key, "value": json.loads(value.decode("utf-8"))}


def _group_sort_key(key: GroupKey) -> tuple[tuple[int, Any], ...]:
    return tuple(value_order(MISSING if text == "" else from_canonical_text(text)) for text in key)


def merge_partials(
    spec: QuerySpec,
    partials: Sequence[Partial],
    *,
    limits: QueryLimits = DEFAULT_LIMITS,
    missing_shards: Iterable[int] = (),
    plugins: PluginRegistry | None = None,
    cut_after: str | None = None,
) -> QueryResult:
    """The coordinator side: every partial (all chunks of every shard that answered) in, the
    answer out. Shards that did not answer fail the query unless spec.allow_partial.

    cut_after: some shard stopped sending rows early (its byte budget ran out) after this key,
    so rows past it cannot be ordered yet: the page ends there and next_cursor continues."""
    missing = tuple(sorted(set(missing_shards)))
    if missing and not spec.allow_partial:
        raise ShardUnavailable(
            f"shards {', '.join(map(str, missing))} did not answer; retry, or set "
            "allow_partial to answer without them"
        )
    stats = QueryStats.of(partials)
    if spec.is_select:
        runs = []
        for partial in partials:
            if not isinstance(partial, RowsPartial):
                raise AssertionError("an aggregates partial does not answer a select query")
            runs.append(partial.rows)
        merged = list(itertools.islice(heapq.merge(*runs, key=itemgetter(0)), spec.limit + 1))
        orderable = merged if cut_after is None else [r for r in merged if r[0] <= cut_after]
        page = orderable[: spec.limit]
        more = len(merged) > spec.limit or cut_after is not None
        next_cursor = encode_cursor(page[-1][0]) if more and page else None
        rows = tuple(_row_json(key, value) for key, value in page)
        return QueryResult(rows, next_cursor, (), stats, missing)

    compiled = _compile(spec, plugins)
    total = GroupedAggregates(compiled.new_states, limits.max_groups)
    for partial in partials:
        if not isinstance(partial, AggregatesPartial):
            raise AssertionError("a rows partial does not answer an aggregate query")
        total.merge(partial.groups)
    if not spec.group_by:
        total.states_for(())  # a query without group_by has its one group even over no rows
    names = tuple(spec.aggregates)
    groups = []
    for key in sorted(total.groups, key=_group_sort_key):
        group = {
            path: from_canonical_text(text)
            for path, text in zip(spec.group_by, key, strict=True)
            if text != ""
        }
        results = {
            name: state.result() for name, state in zip(names, total.groups[key], strict=True)
        }
        groups.append({"group": group, "aggregates": results})
    return QueryResult((), None, tuple(groups), stats, missing)


__all__ = [
    "Phase",
    "ShardPlan",
    "decode_partial",
    "encode_partial",
    "execute_on_rows",
    "iter_partials",
    "merge_partials",
    "partial_from_wire",
    "partial_to_wire",
]
