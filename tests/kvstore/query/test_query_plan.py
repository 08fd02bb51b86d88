"""Shard execution and coordinator merge: for random documents and random queries, splitting the
rows into random shards (streamed in random chunks, sent through msgpack, merged in random
order) answers exactly what one pass over all rows does, and what a naive reference computes."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import replace

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from kvstore.errors import InvalidRequest, ShardUnavailable
from kvstore.query.documents import (
    MISSING,
    NOT_JSON,
    canonical_text,
    decode_document,
    from_canonical_text,
    value_order,
)
from kvstore.query.plan import (
    Phase,
    ShardPlan,
    decode_partial,
    encode_partial,
    execute_on_rows,
    iter_partials,
    merge_partials,
    partial_from_wire,
    partial_to_wire,
    rows_as_batches,
)
from kvstore.query.plugins import PluginRegistry
from kvstore.query.results import QueryResult, RowsPartial, ShardStats
from kvstore.query.spec import AggregateFn, Op, QueryLimits, encode_cursor, parse_query

# ---- a naive reference, written straight from the documented semantics --------------------------


def ref_get(key, document, path):
    if path == "$key":
        return key
    if document is NOT_JSON:
        return MISSING
    value = document
    for segment in path.split("."):
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        elif (
            isinstance(value, list)
            and segment.isdigit()
            and (segment == "0" or segment[0] != "0")
            and int(segment) < len(value)
        ):
            value = value[int(segment)]
        else:
            return MISSING
    return value


def identity(value):
    """Hashable JSON identity: 1 == 1.0, true != 1."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, list):
        return ("array", tuple(identity(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((name, identity(item)) for name, item in value.items()))
    return (type(value).__name__, value)


def ref_predicate(predicate, key, document):
    if predicate.field != "$key" and document is NOT_JSON:
        return False
    value = ref_get(key, document, predicate.field)
    op, literal = predicate.op, predicate.value
    if op is Op.EXISTS:
        return (value is not MISSING) == literal
    if value is MISSING:
        return False
    if op is Op.EQ:
        return identity(value) == identity(literal)
    if op is Op.NE:
        return identity(value) != identity(literal)
    if op is Op.IN:
        return any(identity(value) == identity(item) for item in literal)
    if op is Op.PREFIX:
        return isinstance(value, str) and value.startswith(literal)
    kinds = {identity(value)[0], identity(literal)[0]}
    if kinds not in ({"number"}, {"str"}):
        return False
    return {
        Op.LT: value < literal,
        Op.LE: value <= literal,
        Op.GT: value > literal,
        Op.GE: value >= literal,
    }[op]


def ref_matching(spec, rows):
    after = spec.after_key
    for key, raw in sorted(rows):
        if spec.prefix is not None and not key.startswith(spec.prefix):
            continue
        if spec.start is not None and key < spec.start:
            continue
        if spec.end is not None and key >= spec.end:
            continue
        if after is not None and key <= after:
            continue
        document = decode_document(raw)
        if all(ref_predicate(p, key, document) for p in spec.where):
            yield key, document


def ref_select(spec, rows):
    """Every matching row after the cursor, in key order (the page is a prefix of it)."""
    out = []
    for key, document in ref_matching(spec, rows):
        if document is NOT_JSON:
            out.append({"key": key, "not_json": True})
        elif spec.select == "*":
            out.append({"key": key, "value": document})
        else:
            projected = {}
            for path in spec.select:
                value = ref_get(key, document, path)
                if value is not MISSING:
                    projected[path] = value
            out.append({"key": key, "value": projected})
    return out


def normal(value):
    return from_canonical_text(canonical_text(value))


APPROXIMATE = object()  # the reference's "check the approximate flag instead"


def ref_aggregate(spec, rows):
    """Group results as the answer should hold them."""
    groups = defaultdict(list)
    shown = {}  # identity -> the group's values as the answer shows them
    for key, document in ref_matching(spec, rows):
        values = [ref_get(key, document, path) for path in spec.group_by]
        group_id = tuple(("missing",) if v is MISSING else identity(v) for v in values)
        shown[group_id] = tuple(MISSING if v is MISSING else normal(v) for v in values)
        groups[group_id].append((key, document))
    if not spec.group_by and not groups:
        groups[()], shown[()] = [], ()
    answer = []
    for group_id in sorted(groups, key=lambda g: tuple(value_order(v) for v in shown[g])):
        members, group_key = groups[group_id], shown[group_id]
        results = {}
        for name, aggregate in spec.aggregates.items():
            if aggregate.field is None:
                values = [None] * len(members)
            else:
                values = [ref_get(key, doc, aggregate.field) for key, doc in members]
                values = [v for v in values if v is not MISSING and v is not None]
            results[name] = ref_result(spec, aggregate, values)
        group = {
            path: v for path, v in zip(spec.group_by, group_key, strict=False) if v is not MISSING
        }
        answer.append({"group": group, "aggregates": results})
    return answer


def ref_result(spec, aggregate, values):
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    ints = [v for v in numbers if isinstance(v, int)]
    floats = [v for v in numbers if isinstance(v, float)]
    total = math.fsum([*floats, float(sum(ints))]) if floats else sum(ints)
    strings = [v for v in values if isinstance(v, str)]
    fn = aggregate.fn
    if fn is AggregateFn.COUNT:
        return len(values)
    if fn is AggregateFn.SUM:
        return total
    if fn is AggregateFn.AVG:
        return total / len(numbers) if numbers else None
    if fn is AggregateFn.MIN:
        return min(numbers, key=lambda v: (v, isinstance(v, float)), default=min(strings or [None]))
    if fn is AggregateFn.MAX:
        return max(numbers, key=lambda v: (v, isinstance(v, int)), default=max(strings or [None]))
    if fn is AggregateFn.COUNT_DISTINCT:
        distinct = len({identity(v) for v in values})
        if distinct > spec.approximate_distinct_threshold:
            return APPROXIMATE
        return {"value": distinct, "approximate": False, "relative_error": 0.0}
    if fn is AggregateFn.TOP_K:
        return ("truth", Counter(canonical_text(v) for v in values))
    raise AssertionError(fn)


def check_top_k(got, truth, k):
    error = got["max_error"]
    assert got["approximate"] == (error > 0)
    assert error <= sum(truth.values()) / 2  # capacity >= 1: N / (capacity + 1)
    expected = sorted(
        ((from_canonical_text(text), n) for text, n in truth.items()),
        key=lambda item: (-item[1], value_order(item[0])),
    )
    if not got["approximate"]:
        assert got["items"] == [{"value": v, "count": n} for v, n in expected[:k]]
        return
    for item in got["items"]:
        true_count = truth[canonical_text(item["value"])]
        assert true_count - error <= item["count"] <= true_count


def check_groups(spec, got, expected, one_pass):
    assert [g["group"] for g in got] == [g["group"] for g in expected]
    for got_group, want, single in zip(got, expected, one_pass, strict=True):
        for name, aggregate in spec.aggregates.items():
            value, wanted = got_group["aggregates"][name], want["aggregates"][name]
            if aggregate.fn is AggregateFn.TOP_K:
                event(f"top_k approximate: {value['approximate']}")
                check_top_k(value, wanted[1], aggregate.k)
                if not value["approximate"]:
                    assert value == single["aggregates"][name]
                continue
            assert value == single["aggregates"][name]  # any split = one pass, exactly
            if aggregate.fn is AggregateFn.COUNT_DISTINCT:
                event(f"count_distinct approximate: {wanted is APPROXIMATE}")
            if wanted is APPROXIMATE:
                assert value["approximate"] is True
            else:
                assert value == wanted
                assert type(value) is type(wanted)


# ---- random data and queries ----------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.5, -1.5, 2.0, 1e16, 10**20])
    | st.sampled_from(["", "x", "y", "xy"])
)
DOCUMENTS = st.fixed_dictionaries(
    {},
    optional={
        "a": SCALARS,
        "b": SCALARS | st.lists(SCALARS, max_size=2),
        "n": st.fixed_dictionaries({}, optional={"a": SCALARS}),
        "l": st.lists(SCALARS, max_size=2),
    },
)
VALUES = st.one_of(
    DOCUMENTS.map(lambda doc: json.dumps(doc).encode()),
    DOCUMENTS.map(lambda doc: json.dumps(doc).encode()),
    SCALARS.map(lambda value: json.dumps(value).encode()),
    st.sampled_from([b"\xff", b"not json", b"NaN", b'{"a": 1', b""]),
)
KEYSPACE = sorted(
    "".join(letters) for size in range(1, 6) for letters in itertools.product("ab/1", repeat=size)
)


@st.composite
def rows_of(draw, max_size=60):
    """Rows sorted by key; sizes spread evenly (big shards matter most)."""
    size = draw(st.integers(0, max_size))
    picks = draw(st.sets(st.integers(0, len(KEYSPACE) - 1), min_size=size, max_size=size))
    return [(KEYSPACE[index], draw(VALUES)) for index in sorted(picks)]


ROWS = rows_of()
FIELDS = ["a", "b", "n.a", "l.0", "$key"]


@st.composite
def predicates(draw):
    field = draw(st.sampled_from(FIELDS))
    op = draw(st.sampled_from(list(Op)))
    if op is Op.EXISTS:
        field = "a" if field == "$key" else field
        return {"field": field, "op": "exists", "value": draw(st.booleans())}
    if field == "$key" or op is Op.PREFIX:
        value = draw(st.text(alphabet="ab/1xy", max_size=2))
        if op is Op.IN:
            value = [value, draw(st.text(alphabet="ab/1", max_size=3))]
        return {"field": field, "op": op.value, "value": value}
    if op is Op.IN:
        return {"field": field, "op": "in", "value": draw(st.lists(SCALARS, min_size=1))}
    if op in (Op.EQ, Op.NE):
        return {"field": field, "op": op.value, "value": draw(SCALARS | st.lists(SCALARS))}
    value = draw(st.integers(-3, 3) | st.sampled_from([0.5, 2.0, "", "x", "xy"]))
    return {"field": field, "op": op.value, "value": value}


@st.composite
def query_documents(draw, *, select=None):
    doc: dict = {
        "where": draw(st.lists(predicates(), max_size=draw(st.sampled_from([0, 0, 1, 3]))))
    }
    bound = st.text(alphabet="ab/1", max_size=2)
    range_kind = draw(st.sampled_from(["none", "none", "prefix", "start", "end", "both"]))
    if range_kind == "prefix":
        doc["prefix"] = draw(bound)
    elif range_kind == "both":
        low, high = sorted([draw(bound), draw(bound)])
        if low < high:
            doc["start"], doc["end"] = low, high
    elif range_kind != "none":
        doc[range_kind] = draw(bound)
    if select if select is not None else draw(st.booleans()):
        fields = st.lists(st.sampled_from(FIELDS[:-1]), min_size=1, max_size=3, unique=True)
        doc["select"] = draw(st.just("*") | fields)
        doc["limit"] = draw(st.integers(1, 8))
        if draw(st.integers(0, 3)) == 0:
            doc["cursor"] = encode_cursor(draw(st.text(alphabet="ab/1", max_size=3)))
        return doc
    doc["group_by"] = draw(st.lists(st.sampled_from(["a", "n.a", "$key"]), max_size=2, unique=True))
    aggregates = {}
    for index in range(draw(st.integers(1, 5))):
        fn = draw(st.sampled_from([f.value for f in AggregateFn if f is not AggregateFn.PLUGIN]))
        aggregate: dict = {"fn": fn, "field": draw(st.sampled_from(FIELDS))}
        if fn == "count" and draw(st.booleans()):
            del aggregate["field"]
        if fn == "top_k":
            aggregate["k"] = draw(st.integers(1, 3))
            if draw(st.booleans()):
                aggregate["capacity"] = aggregate["k"] + draw(st.integers(0, 2))
        aggregates[f"{fn}{index}"] = aggregate
    doc["aggregates"] = aggregates
    doc["approximate_distinct_threshold"] = draw(st.integers(1, 6))
    return doc


def split(rows, rng, shard_count):
    shards = [[] for _ in range(shard_count)]
    for row in rows:
        rng.choice(shards).append(row)
    return shards


DEFAULT = QueryLimits()


def random_batches(rows, rng):
    """Rows as a shard scan hands them over: UTF-8 keys, in batches of random sizes."""
    encoded = [(key.encode(), value) for key, value in rows]
    cuts = sorted(rng.sample(range(1, len(encoded)), rng.randint(0, max(len(encoded) - 1, 0))))
    return [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)], strict=True)]


def run_sharded(spec, rows, rng, *, plugins=None, limits=DEFAULT):
    """Random shards, random scan batches and chunk sizes, through msgpack, merged in a random
    order."""
    partials = []
    for shard, shard_rows in enumerate(split(rows, rng, rng.randint(1, 4))):
        plan = ShardPlan.for_shard(spec, shard, limits)
        for partial in iter_partials(
            plan,
            random_batches(shard_rows, rng),
            max_items_per_chunk=rng.randint(1, 5),
            max_chunk_bytes=rng.choice([1, 30, 1 << 20]),
            plugins=plugins,
        ):
            payload = encode_partial(partial)
            partials.append(decode_partial(spec, payload, limits=limits, plugins=plugins))
    rng.shuffle(partials)
    return merge_partials(spec, partials, limits=limits, plugins=plugins)


def run_one_pass(spec, rows, *, plugins=None):
    partial = execute_on_rows(ShardPlan.for_shard(spec, 0), rows, plugins)
    return merge_partials(spec, [partial], plugins=plugins)


@settings(max_examples=400, deadline=None)
@given(rows=ROWS, doc=query_documents(), seed=st.integers(0, 2**32))
def test_any_split_into_shards_answers_what_one_pass_and_the_reference_do(rows, doc, seed):
    spec = parse_query(doc)
    merged = run_sharded(spec, rows, random.Random(seed))
    one_pass = run_one_pass(spec, rows)
    if spec.is_select:
        everything = ref_select(spec, rows)
        assert merged.rows == one_pass.rows == tuple(everything[: spec.limit])
        assert merged.next_cursor == one_pass.next_cursor
        more = len(everything) > spec.limit
        event(f"select: another page: {more}")
        last = everything[spec.limit - 1]["key"] if more else None
        assert merged.next_cursor == (encode_cursor(last) if more else None)
        assert merged.groups == ()
        return
    assert merged.rows == ()
    assert merged.next_cursor is None
    check_groups(spec, merged.groups, ref_aggregate(spec, rows), one_pass.groups)
    stats = merged.stats.to_json()
    assert stats["rows_matched"] == len(list(ref_matching(spec, rows)))
    assert stats["rows_matched"] == one_pass.stats.to_json()["rows_matched"]


@settings(max_examples=150, deadline=None)
@given(
    rows=ROWS,
    field=st.sampled_from(["$key", "b", "a"]),
    group_by=st.sampled_from([[], ["a"]]),
    k=st.integers(1, 3),
    extra=st.integers(0, 2),
    threshold=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_approximate_aggregates_keep_their_guarantees_across_splits(
    rows, field, group_by, k, extra, threshold, seed
):
    spec = parse_query(
        {
            "group_by": group_by,
            "aggregates": {
                "d": {"fn": "count_distinct", "field": field},
                "t": {"fn": "top_k", "field": field, "k": k, "capacity": k + extra},
            },
            "approximate_distinct_threshold": threshold,
        }
    )
    merged = run_sharded(spec, rows, random.Random(seed))
    one_pass = run_one_pass(spec, rows)
    check_groups(spec, merged.groups, ref_aggregate(spec, rows), one_pass.groups)


@settings(max_examples=150, deadline=None)
@given(rows=ROWS, doc=query_documents(select=True), seed=st.integers(0, 2**32))
def test_paging_with_the_cursor_visits_every_matching_row_once_in_key_order(rows, doc, seed):
    rng = random.Random(seed)
    doc.pop("cursor", None)
    everything = ref_select(parse_query(doc), rows)
    seen = []
    for _ in range(len(rows) + 2):
        result = run_sharded(parse_query(doc), rows, rng)
        assert len(result.rows) <= doc["limit"]
        seen.extend(result.rows)
        if result.next_cursor is None:
            break
        assert result.rows, "a next_cursor always follows a non-empty page"
        doc["cursor"] = result.next_cursor
    assert seen == everything


def test_non_json_values_are_rows_with_a_flag_and_have_no_fields():
    rows = [("k1", b'{"a": 1}'), ("k2", b"\x00\xff"), ("k3", b"7")]
    result = run_one_pass(parse_query({"select": ["a"]}), rows)
    assert result.rows == (
        {"key": "k1", "value": {"a": 1}},
        {"key": "k2", "not_json": True},
        {"key": "k3", "value": {}},
    )
    result = run_one_pass(
        parse_query(
            {
                "group_by": ["a"],
                "aggregates": {"n": {"fn": "count"}, "s": {"fn": "sum", "field": "a"}},
            }
        ),
        rows,
    )
    assert result.groups == (
        {"group": {}, "aggregates": {"n": 2, "s": 0}},
        {"group": {"a": 1}, "aggregates": {"n": 1, "s": 1}},
    )
    assert result.stats.to_json()["rows_not_json"] == 1
    none = run_one_pass(
        parse_query({"select": "*", "where": [{"field": "a", "op": "!=", "value": 2}]}), rows
    )
    assert none.rows == ({"key": "k1", "value": {"a": 1}},)


def test_integers_past_64_bits_stay_exact_in_every_aggregate():
    """The aggregate loop decodes with orjson alone, which reads such an integer as a float;
    each value it feeds must still be the exact one (here, floats would make 2**70 + 1 and
    2**70 + 2 one value, and lose the + 1 of the sum)."""
    big = 2**70
    docs = [
        {"g": big + 1, "v": big + 1, "l": [big + 1]},
        {"g": big + 1, "v": big + 2, "l": [big + 2]},
        {"g": -(big + 1), "v": 1, "l": [1.5]},
        {"g": 1e30, "v": 1e30, "l": {"x": big}},  # a genuine float, past 2^63 too
    ]
    rows = [(f"k{i}", json.dumps(doc).encode()) for i, doc in enumerate(docs)]
    spec = parse_query(
        {
            "group_by": ["g"],
            "aggregates": {
                "s": {"fn": "sum", "field": "v"},
                "hi": {"fn": "max", "field": "v"},
                "d": {"fn": "count_distinct", "field": "l"},
                "t": {"fn": "top_k", "field": "l.0", "k": 3},
            },
        }
    )
    groups = {
        canonical_text(group["group"]["g"]): group["aggregates"]
        for group in run_one_pass(spec, rows).groups
    }
    assert groups.keys() == {str(big + 1), str(-(big + 1)), "1e+30"}
    pair = groups[str(big + 1)]
    assert (pair["s"], pair["hi"], pair["d"]["value"]) == (2 * big + 3, big + 2, 2)
    assert [item["value"] for item in pair["t"]["items"]] == [big + 1, big + 2]
    assert groups["1e+30"]["s"] == 1e30
    whole = run_one_pass(parse_query({"aggregates": {"s": {"fn": "sum", "field": "v"}}}), rows)
    assert whole.groups[0]["aggregates"]["s"] == 2 * big + 4 + 1e30


def test_a_query_without_group_by_has_one_group_even_over_no_rows():
    spec = parse_query(
        {
            "aggregates": {
                "n": {"fn": "count"},
                "s": {"fn": "sum", "field": "x"},
                "lo": {"fn": "min", "field": "x"},
                "mean": {"fn": "avg", "field": "x"},
                "d": {"fn": "count_distinct", "field": "x"},
                "t": {"fn": "top_k", "field": "x"},
            }
        }
    )
    assert merge_partials(spec, []).groups == (
        {
            "group": {},
            "aggregates": {
                "n": 0,
                "s": 0,
                "lo": None,
                "mean": None,
                "d": {"value": 0, "approximate": False, "relative_error": 0.0},
                "t": {"items": [], "approximate": False, "max_error": 0},
            },
        },
    )


class Tripwire:
    """Rows that fail the test if read past `allowed`."""

    def __init__(self, rows, allowed):
        self.rows, self.allowed = rows, allowed

    def __iter__(self):
        for index, row in enumerate(self.rows):
            if index >= self.allowed:
                raise AssertionError(f"read row {index}, past {self.allowed}")
            yield row


ROWS_100 = [(f"k{i:03d}", json.dumps({"i": i}).encode()) for i in range(100)]


def test_a_shard_stops_reading_past_the_range_and_after_a_full_page():
    spec = parse_query({"select": "*", "end": "k010"})
    partial = execute_on_rows(ShardPlan.for_shard(spec, 1), Tripwire(ROWS_100, 11))
    assert len(partial.rows) == 10
    assert partial.stats.rows_scanned == 11
    spec = parse_query({"select": "*", "prefix": "k00"})
    partial = execute_on_rows(ShardPlan.for_shard(spec, 1), Tripwire(ROWS_100, 11))
    assert len(partial.rows) == 10
    spec = parse_query(
        {"select": "*", "limit": 5, "where": [{"field": "i", "op": ">", "value": 2}]}
    )
    partial = execute_on_rows(ShardPlan.for_shard(spec, 1), Tripwire(ROWS_100, 9))
    assert [key for key, _ in partial.rows] == ["k003", "k004", "k005", "k006", "k007", "k008"]
    assert (partial.stats.rows_scanned, partial.stats.rows_matched) == (9, 6)


def test_a_shard_streams_rows_in_chunks_bounded_by_count_and_bytes():
    spec = parse_query({"select": "*", "limit": 50})
    plan = ShardPlan.for_shard(spec, 1)
    by_count = list(iter_partials(plan, rows_as_batches(ROWS_100), max_items_per_chunk=20))
    assert [len(p.rows) for p in by_count] == [20, 20, 11]  # limit + 1 rows in all
    by_bytes = list(
        iter_partials(
            plan, rows_as_batches(ROWS_100[:10]), max_items_per_chunk=99, max_chunk_bytes=30
        )
    )
    assert [len(p.rows) for p in by_bytes] == [3, 3, 3, 1]  # a row is 4 + 8 bytes
    assert sum(p.stats.rows_scanned for p in by_bytes) == 10
    assert merge_partials(spec, by_bytes).rows == merge_partials(spec, by_count[:1]).rows[:10]


def test_rows_out_of_key_order_are_a_bug_not_a_wrong_answer():
    for spec in (parse_query({"select": "*"}), parse_query({"aggregates": {"n": {"fn": "count"}}})):
        with pytest.raises(AssertionError, match="out of key order"):
            execute_on_rows(ShardPlan.for_shard(spec, 1), [("b", b"1"), ("a", b"1")])


def test_a_count_by_key_never_decodes_values():
    spec = parse_query(
        {
            "where": [{"field": "$key", "op": "prefix", "value": "k"}],
            "aggregates": {"n": {"fn": "count"}},
        }
    )
    partial = execute_on_rows(ShardPlan.for_shard(spec, 1), [("k1", b"\xff"), ("k2", b"{")])
    assert partial.stats == ShardStats(rows_scanned=2, rows_matched=2, bytes_scanned=2)
    assert merge_partials(spec, [partial]).groups[0]["aggregates"] == {"n": 2}


def test_missing_shards_fail_the_query_unless_partial_answers_are_allowed():
    rows = ROWS_100[:3]
    spec = parse_query({"select": "*"})
    partial = execute_on_rows(ShardPlan.for_shard(spec, 1), rows)
    with pytest.raises(ShardUnavailable, match="shards 2, 3 did not answer; retry, or set"):
        merge_partials(spec, [partial], missing_shards=[3, 2])
    lenient = parse_query({"select": "*", "allow_partial": True})
    result = merge_partials(lenient, [partial], missing_shards=[3, 2, 3])
    assert result.missing_shards == (2, 3)
    answer = result.to_json()
    assert answer["partial"] is True
    assert answer["missing_shards"] == [2, 3]
    assert len(answer["rows"]) == 3


def test_too_many_groups_after_merging_is_a_caller_error():
    spec = parse_query({"group_by": ["i"], "aggregates": {"n": {"fn": "count"}}})
    limits = QueryLimits(max_groups=6)
    left = execute_on_rows(ShardPlan.for_shard(spec, 1, limits), ROWS_100[:5])
    right = execute_on_rows(ShardPlan.for_shard(spec, 2, limits), ROWS_100[5:10])
    with pytest.raises(InvalidRequest, match="too many groups; narrow the query or raise limits"):
        merge_partials(spec, [left, right], limits=limits)
    with pytest.raises(InvalidRequest, match="too many groups"):
        execute_on_rows(ShardPlan.for_shard(spec, 1, limits), ROWS_100[:7])


def test_stats_sum_per_shard_and_carry_time_and_bytes():
    spec = parse_query({"aggregates": {"n": {"fn": "count"}}})
    first = execute_on_rows(ShardPlan.for_shard(spec, 2), ROWS_100[:10])
    payload = encode_partial(first)
    first = decode_partial(spec, payload)
    first = replace(first, stats=replace(first.stats, elapsed_s=0.25))
    second = execute_on_rows(ShardPlan.for_shard(spec, 1), ROWS_100[10:15])
    stats = merge_partials(spec, [first, second]).stats.to_json()
    assert stats["shards"] == 2
    assert stats["rows_scanned"] == stats["rows_matched"] == 15
    assert stats["bytes_moved"] == len(payload)
    assert stats["bytes_scanned"] == sum(len(v) for _, v in ROWS_100[:15])
    assert [s["shard"] for s in stats["per_shard"]] == [1, 2]
    assert stats["per_shard"][1]["elapsed_ms"] == 250.0
    assert set(stats["per_shard"][0]) == {
        "shard",
        "rows_scanned",
        "rows_matched",
        "rows_not_json",
        "bytes_scanned",
        "bytes_moved",
        "elapsed_ms",
    }


def test_a_shard_plan_crosses_the_wire_and_is_validated_again():
    spec = parse_query({"prefix": "k", "select": ["i"], "limit": 3, "cursor": encode_cursor("k1")})
    plan = ShardPlan.for_shard(spec, 7, QueryLimits(max_groups=9))
    assert plan.phase is Phase.SCAN_ROWS
    wire = msgpack.unpackb(msgpack.packb(plan.to_wire()), use_list=False)
    assert ShardPlan.from_wire(wire) == plan
    with pytest.raises(InvalidRequest, match="limit: expected an integer from 1 to 2"):
        ShardPlan.from_wire(wire, QueryLimits(max_limit=2, default_limit=2))
    with pytest.raises(ValueError, match="malformed shard plan"):
        ShardPlan.from_wire((2, *wire[1:]))
    aggregate = ShardPlan.for_shard(parse_query({"aggregates": {"n": {"fn": "count"}}}), 1)
    assert aggregate.phase is Phase.PRE_AGGREGATE
    with pytest.raises(ValueError, match="phase scan_rows does not run this query"):
        ShardPlan(aggregate.spec, Phase.SCAN_ROWS, 1)


def test_a_query_result_crosses_the_wire():
    spec = parse_query({"group_by": ["i"], "aggregates": {"n": {"fn": "sum", "field": "i"}}})
    rows = [*ROWS_100[:3], ("z", json.dumps({"i": 10**30}).encode())]
    result = run_one_pass(spec, rows)
    wire = msgpack.unpackb(msgpack.packb(result.to_wire()), use_list=False)
    assert QueryResult.from_wire(wire) == result
    assert result.groups[-1]["aggregates"]["n"] == 10**30
    with pytest.raises(ValueError, match="unknown query result version"):
        QueryResult.from_wire((9, *wire[1:]))


def test_partials_must_answer_their_query():
    select = parse_query({"select": "*"})
    count = parse_query({"aggregates": {"n": {"fn": "count"}}})
    rows_partial = execute_on_rows(ShardPlan.for_shard(select, 1), ROWS_100[:2])
    groups_partial = execute_on_rows(ShardPlan.for_shard(count, 1), ROWS_100[:2])
    with pytest.raises(AssertionError, match="does not answer a select query"):
        merge_partials(select, [groups_partial])
    with pytest.raises(AssertionError, match="does not answer an aggregate query"):
        merge_partials(count, [rows_partial])
    with pytest.raises(ValueError, match="does not answer this query"):
        partial_from_wire(count, partial_to_wire(rows_partial))
    with pytest.raises(ValueError, match=r"rows are \(str, bytes \| None\)"):
        partial_from_wire(select, ("rows", 1, ((1, b"x"),), ShardStats().to_wire()))
    with pytest.raises(ValueError, match="malformed shard stats"):
        partial_from_wire(select, ("rows", 1, (), (1, 2)))
    with pytest.raises(ValueError, match="shard '1' is not an int"):
        partial_from_wire(select, ("rows", "1", (), ShardStats().to_wire()))
    with pytest.raises(ValueError, match="expected 1 aggregate states, got 2"):
        partial_from_wire(
            count, ("aggregates", 1, (((), (("count", 1), ("count", 2))),), ShardStats().to_wire())
        )
    with pytest.raises(ValueError, match="max_items_per_chunk and max_chunk_bytes must be"):
        next(iter_partials(ShardPlan.for_shard(select, 1), [], max_items_per_chunk=0))
    assert isinstance(rows_partial, RowsPartial)


def small_int(document):
    """The plugin's own contract: its partials must fit msgpack (64-bit ints)."""
    if isinstance(document, dict) and type(document.get("a")) is int and abs(document["a"]) < 100:
        return document["a"]
    return None


def squares():
    registry = PluginRegistry()
    registry.register(
        "sum_of_squares",
        lambda key, doc: None if small_int(doc) is None else small_int(doc) ** 2,
        lambda left, right: left + right,
    )
    return registry


@settings(max_examples=100, deadline=None)
@given(rows=ROWS, seed=st.integers(0, 2**32))
def test_a_plugin_aggregate_splits_and_merges_like_the_built_in_ones(rows, seed):
    plugins = squares()
    spec = parse_query(
        {"group_by": ["b"], "aggregates": {"sq": {"fn": "plugin", "plugin": "sum_of_squares"}}},
        plugins=plugins,
    )
    merged = run_sharded(spec, rows, random.Random(seed), plugins=plugins)
    assert merged.groups == run_one_pass(spec, rows, plugins=plugins).groups
    totals: dict[str, int] = {}
    for _key, document in ref_matching(spec, rows):
        if small_int(document) is not None:
            group = canonical_text(document["b"]) if "b" in document else ""
            totals[group] = totals.get(group, 0) + small_int(document) ** 2
    got = {
        canonical_text(g["group"]["b"]) if "b" in g["group"] else "": g["aggregates"]["sq"]
        for g in merged.groups
        if g["aggregates"]["sq"] is not None
    }
    assert got == totals


def test_a_plugin_must_be_installed_where_the_query_runs():
    spec = parse_query(
        {"aggregates": {"sq": {"fn": "plugin", "plugin": "sum_of_squares"}}}, plugins=squares()
    )
    with pytest.raises(InvalidRequest, match="unknown plugin 'sum_of_squares'"):
        execute_on_rows(ShardPlan.for_shard(spec, 1), ROWS_100[:1])
