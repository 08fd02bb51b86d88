"""Query execution without I/O. A shard runs execute_on_rows (or iter_partials, to stream in
bounded chunks) over its rows in key order: decode each value once, filter, then project rows or
pre-aggregate into mergeable states. The coordinator runs merge_partials: a k-way ordered merge
of rows honoring limit and cursor, or a combine of aggregate states, plus summed stats.

Nothing here awaits, reads a clock or touches LMDB: the executor owns those and fills
ShardStats.elapsed_s; decode_partial fills bytes_moved from the payload it decodes.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from typing import Any, Final

import msgpack
import orjson

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
    top_level_name,
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

RowBatches = Iterable[Sequence[tuple[bytes, bytes]]]  # (UTF-8 key, value) rows in key order
_ABOVE_EVERY_KEY: Final = b"\xff"  # no UTF-8 text starts with byte 0xff
# orjson reads an integer past 64 bits as a float this large or larger (json keeps it exact).
_ORJSON_INT_LIMIT: Final = float(1 << 63)
_MAY_BE_ROUNDED: Final = (float, list, dict)  # types of values _exactly must look at


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


def reads_values(spec: QuerySpec) -> bool:
    """Whether the query reads stored values at all: a count filtered by key only does not,
    and its shard scans keys alone (values never read are not checksum-verified either)."""
    read_fields = [*spec.group_by, *(a.field for a in spec.aggregates.values() if a.field)]
    return (
        spec.is_select
        or compile_where(spec.where).document_test is not None
        or any(path != KEY_FIELD for path in read_fields)
        or any(a.fn is AggregateFn.PLUGIN for a in spec.aggregates.values())
    )


def key_bounds(spec: QuerySpec) -> tuple[bytes, bytes]:
    """[lower, upper) of the UTF-8 keys in the spec's range: start, prefix and the cursor fold
    into one lower bound, end and the prefix's successor into one upper bound, so a scanned row
    costs two comparisons. UTF-8 byte order is code point order: bytes compare as str would."""
    after = b"" if spec.after_key is None else spec.after_key.encode() + b"\0"
    lower = max((spec.start or "").encode(), (spec.prefix or "").encode(), after)
    upper = _ABOVE_EVERY_KEY
    if spec.end is not None:
        upper = min(upper, spec.end.encode())
    if spec.prefix:
        prefix = spec.prefix.encode()  # its last byte is never 0xff (UTF-8 has none)
        upper = min(upper, prefix[:-1] + bytes((prefix[-1] + 1,)))
    return lower, upper


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

    projections = None
    if spec.select is not None and spec.select != "*":
        projections = tuple((path, make_getter(path)) for path in spec.select)
    return _Compiled(
        where=where,
        needs_document=reads_values(spec),
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


def _row_order_error(key: bytes, previous: bytes | None) -> AssertionError:
    return AssertionError(f"shard rows out of key order: {key!r} after {previous!r}")


def _matching(
    spec: QuerySpec, compiled: _Compiled, batches: RowBatches, counters: _Counters
) -> Iterator[tuple[str, bytes, Any]]:
    """(key, raw value, document) of each row in range passing where; stops past the range."""
    lower, upper = key_bounds(spec)
    key_test, document_test = compiled.where.key_test, compiled.where.document_test
    needs_document = compiled.needs_document
    previous: bytes | None = None
    for batch in batches:
        for key, raw in batch:
            if previous is not None and key <= previous:
                raise _row_order_error(key, previous)
            previous = key
            counters.rows_scanned += 1
            counters.bytes_scanned += len(raw)
            if key >= upper:
                return
            if key < lower:
                continue
            text = key.decode()
            if key_test is not None and not key_test(text):
                continue
            document: Any = NOT_JSON
            if needs_document:
                document = decode_document(raw)
                if document is NOT_JSON:
                    counters.rows_not_json += 1
            if document_test is not None and (document is NOT_JSON or not document_test(document)):
                continue
            counters.rows_matched += 1
            yield text, raw, document


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
    batches: RowBatches,
    chunk_rows: int,
    chunk_bytes: int,
) -> Iterator[RowsPartial]:
    """Up to limit + 1 rows (one more than a page tells the coordinator another page exists),
    in chunks closed at chunk_rows rows or once they hold chunk_bytes of values."""
    counters = _Counters()
    wanted = plan.spec.limit + 1
    chunk: list[Row] = []
    size = 0
    for key, raw, document in _matching(plan.spec, compiled, batches, counters):
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


def _exactly(getter: FieldGetter, key: str, raw: bytes, value: Any) -> Any:
    """`value`, read from a document orjson decoded; read again from the strict decoding when
    orjson may have rounded it: a float past 2^63 (an integer past 64 bits), or an array or
    object that may hold one. Exact values (the common case) cost this one call, never."""
    kind = type(value)
    if kind is float and -_ORJSON_INT_LIMIT < value < _ORJSON_INT_LIMIT:
        return value
    return getter(key, decode_document(raw))


_first: Final = itemgetter(0)
_second: Final = itemgetter(1)
# A group's states; per aggregate, the integers summed and how many; its rows matched; per
# aggregate, the strings counted for a top_k (the TopK's own dict; {} for the others).
_Run = tuple[list[AggregateState], list[int], list[int], list[int], list[dict[str, int]]]


def _in_range(batch: Sequence[tuple[bytes, bytes]], lower: bytes, upper: bytes) -> range:
    """The positions of a batch's rows within [lower, upper): two binary searches, and none
    for a batch wholly inside (rows within a batch are in key order: a cursor's)."""
    start = 0 if batch[0][0] >= lower else bisect.bisect_left(batch, lower, key=_first)
    stop = len(batch) if batch[-1][0] < upper else bisect.bisect_left(batch, upper, key=_first)
    return range(start, max(start, stop))


def _pre_aggregate(plan: ShardPlan, compiled: _Compiled, batches: RowBatches) -> AggregatesPartial:
    """One pass, fused: every aggregate query runs here, and its cost per row is what a query's
    throughput is (docs/query.md, Performance). So no generator between rows; range bounds by
    binary search per batch, none per row (a count by key touches no row at all); top-level
    fields read inline; integer sums added in plain lists and handed to their Sum once; and
    values decoded by orjson alone: where orjson differs from the strict decoding (integers past
    64 bits) a value it yields says so, and _exactly reads it again. A where on fields or a
    plugin sees whole documents, so those decode every row strictly."""
    spec = plan.spec
    grouped = GroupedAggregates(compiled.new_states, plan.max_groups)
    group_getters = compiled.group_getters
    single_group = group_getters[0] if len(group_getters) == 1 else None
    single_name = top_level_name(spec.group_by[0]) if single_group is not None else None
    sums = (AggregateFn.SUM, AggregateFn.AVG)
    # Per aggregate fed a field: its index, the field's name when top-level, its getter, whether
    # it sums, and for a top_k how many strings it counts before folding them (else 0).
    feeds = tuple(
        (
            index,
            None if aggregate.field is None else top_level_name(aggregate.field),
            feed,
            aggregate.fn in sums,
            state.strings_held if isinstance(state, TopK) else 0,
        )
        for index, (aggregate, feed, state) in enumerate(
            zip(spec.aggregates.values(), compiled.feeds, compiled.new_states(), strict=True)
        )
        if feed is not None
    )
    counted = tuple(i for i, feed in enumerate(compiled.feeds) if feed is None)
    lower, upper = key_bounds(spec)
    key_test, document_test = compiled.where.key_test, compiled.where.document_test
    needs_document = compiled.needs_document
    plugin = any(a.fn is AggregateFn.PLUGIN for a in spec.aggregates.values())
    strict = document_test is not None or plugin
    fields = [*spec.group_by, *(a.field for a in spec.aggregates.values())]
    reads_key = key_test is not None or plugin or KEY_FIELD in fields
    counts_only = not (needs_document or reads_key or group_getters or feeds)
    loads, lenient_error = orjson.loads, orjson.JSONDecodeError
    size = len(compiled.feeds)
    # Integers are summed in a group's plain lists (cheaper than a call to Sum.add per row),
    # and rows matched counted for the counts by row; both go to the states at the end.
    runs: dict[GroupKey, _Run] = {}

    def run_of(group_key: GroupKey) -> _Run:
        run = runs.get(group_key)
        if run is None:
            states = grouped.states_for(group_key)
            strings = [state.strings if isinstance(state, TopK) else {} for state in states]
            run = runs[group_key] = (states, [0] * size, [0] * size, [0], strings)
        return run

    # Group values repeat: a string's run is found once (only strings: in a dict,
    # True == 1 == 1.0, and those must stay apart).
    runs_of_strings: dict[str, _Run] = {}
    no_group = run_of(()) if not group_getters else None
    scanned = matched = not_json = scanned_bytes = 0
    previous: bytes | None = None
    document: Any = NOT_JSON
    text = ""
    for batch in batches:
        if not batch:
            continue
        if previous is not None and batch[0][0] <= previous:
            raise _row_order_error(batch[0][0], previous)
        previous = batch[-1][0]
        rows = _in_range(batch, lower, upper)
        past_end = rows.stop < len(batch)
        if rows.start or past_end:  # rows read and skipped: the range starts or ends here
            for _key, raw in batch[: rows.start]:
                scanned_bytes += len(raw)
            if past_end:
                scanned_bytes += len(batch[rows.stop][1])
        scanned += rows.stop + past_end
        scanned_bytes += sum(map(len, map(_second, batch[rows.start : rows.stop])))
        matched += len(rows)  # less each row skipped below
        if not counts_only:
            for key, raw in itertools.islice(batch, rows.start, rows.stop):
                if reads_key:
                    text = key.decode()
                    if key_test is not None and not key_test(text):
                        matched -= 1
                        continue
                if needs_document:
                    if strict:
                        document = decode_document(raw)
                    else:
                        try:
                            document = loads(raw)
                        except lenient_error:
                            document = decode_document(raw)
                    if document is NOT_JSON:
                        not_json += 1
                        if document_test is not None:
                            matched -= 1
                            continue
                    elif document_test is not None and not document_test(document):
                        matched -= 1
                        continue
                is_object = type(document) is dict
                if no_group is not None:
                    run = no_group
                elif single_group is not None:
                    if single_name is not None:
                        value = document.get(single_name, MISSING) if is_object else MISSING
                    else:
                        value = single_group(text, document)
                    if type(value) is str:
                        found = runs_of_strings.get(value)
                        if found is None:
                            found = runs_of_strings[value] = run_of((_group_text(value),))
                        run = found
                    else:
                        if not strict and type(value) in _MAY_BE_ROUNDED:
                            value = _exactly(single_group, text, raw, value)
                        run = run_of((_group_text(value),))
                else:
                    run = run_of(
                        tuple(
                            _group_text(
                                value
                                if strict or type(value) not in _MAY_BE_ROUNDED
                                else _exactly(get, text, raw, value)
                            )
                            for get in group_getters
                            for value in (get(text, document),)
                        )
                    )
                states, int_totals, int_counts, rows_matched, strings = run
                if counted:
                    rows_matched[0] += 1
                for index, name, feed, is_sum, strings_held in feeds:
                    if name is not None:
                        value = document.get(name, MISSING) if is_object else MISSING
                    else:
                        value = feed(text, document)
                    if value is None or value is MISSING:
                        continue
                    if type(value) is int:
                        if is_sum:
                            int_totals[index] += value
                            int_counts[index] += 1
                            continue
                    elif type(value) is str:
                        if strings_held:  # TopK.add, inlined
                            counts = strings[index]
                            counts[value] = counts.get(value, 0) + 1
                            if len(counts) > strings_held:
                                top = states[index]
                                assert isinstance(top, TopK), top
                                top.fold_strings()
                            continue
                    elif not strict and type(value) in _MAY_BE_ROUNDED:
                        value = _exactly(feed, text, raw, value)
                        if value is None or value is MISSING:
                            continue
                    states[index].add(value)
        if past_end:
            break
    if counts_only:
        assert no_group is not None
        no_group[3][0] = matched
    for states, int_totals, int_counts, rows_matched, _strings in runs.values():
        for index in counted:
            count = states[index]
            assert isinstance(count, Count), count
            count.add_rows(rows_matched[0])
        for index, _name, _feed, is_sum, _strings_held in feeds:
            if is_sum and int_counts[index]:
                total = states[index]
                assert isinstance(total, Sum), total
                total.add_integers(int_totals[index], int_counts[index])
    stats = ShardStats(scanned, matched, not_json, scanned_bytes)
    return AggregatesPartial(plan.shard, grouped, stats)


def rows_as_batches(rows: Iterable[tuple[str, bytes]]) -> RowBatches:
    """(str key, value) rows as the batches a shard scan hands over, lazily, one row each."""
    return (((key.encode(), value),) for key, value in rows)


def execute_on_rows(
    plan: ShardPlan, rows: Iterable[tuple[str, bytes]], plugins: PluginRegistry | None = None
) -> Partial:
    """The shard side, in one partial. `rows` are (key, value bytes) in ascending key order, as
    a shard scan yields them; rows outside the spec's range are skipped, and reading stops past
    its end (and, for select, after limit + 1 matching rows)."""
    unbounded = 1 << 62
    chunks = iter_partials(
        plan,
        rows_as_batches(rows),
        max_items_per_chunk=unbounded,
        max_chunk_bytes=unbounded,
        plugins=plugins,
    )
    return next(chunks)


def iter_partials(
    plan: ShardPlan,
    batches: RowBatches,
    *,
    max_items_per_chunk: int,
    max_chunk_bytes: int = 1 << 20,
    plugins: PluginRegistry | None = None,
) -> Iterator[Partial]:
    """The shard side, streamed in bounded chunks: select rows are sent as soon as a chunk holds
    max_items_per_chunk rows or max_chunk_bytes of keys and values (a single bigger row goes
    alone); aggregate groups, max_items_per_chunk per chunk, after the scan. Each chunk carries
    its share of the stats; merge_partials takes them all, from every shard, in any order.
    `batches`: the shard's rows as a scan hands them over (ReadView.row_batches)."""
    if max_items_per_chunk < 1 or max_chunk_bytes < 1:
        raise ValueError("max_items_per_chunk and max_chunk_bytes must be positive")
    compiled = _compile(plan.spec, plugins)
    if plan.phase is Phase.SCAN_ROWS:
        yield from _scan_rows(plan, compiled, batches, max_items_per_chunk, max_chunk_bytes)
        return
    whole = _pre_aggregate(plan, compiled, batches)
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
    "key_bounds",
    "merge_partials",
    "partial_from_wire",
    "partial_to_wire",
    "reads_values",
    "rows_as_batches",
]
