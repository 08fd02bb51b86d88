"""parse_query: every valid feature parses and round-trips; every invalid input names its place."""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import InvalidRequest
from kvstore.query.plugins import PluginRegistry
from kvstore.query.spec import (
    Aggregate,
    AggregateFn,
    Op,
    Predicate,
    QueryLimits,
    QuerySpec,
    decode_cursor,
    encode_cursor,
    parse_query,
)
from kvstore.service import Consistency

SELECT = {"select": "*"}
COUNT = {"aggregates": {"n": {"fn": "count"}}}


def where(*predicates):
    return {"select": "*", "where": list(predicates)}


def aggregate(**fields):
    return {"aggregates": {"n": fields}}


def test_a_select_query_parses_into_frozen_dataclasses():
    spec = parse_query(
        {
            "prefix": "users/",
            "where": [
                {"field": "age", "op": ">=", "value": 18},
                {"field": "$key", "op": "prefix", "value": "users/1"},
                {"field": "tags", "op": "in", "value": ["a", 1, True, None]},
                {"field": "address.city", "op": "exists"},
                {"field": "deleted", "op": "exists", "value": False},
            ],
            "select": ["name", "address.city"],
            "limit": 50,
            "consistency": "stale",
            "allow_partial": True,
        }
    )
    assert spec.prefix == "users/"
    assert spec.where == (
        Predicate("age", Op.GE, 18),
        Predicate("$key", Op.PREFIX, "users/1"),
        Predicate("tags", Op.IN, ("a", 1, True, None)),
        Predicate("address.city", Op.EXISTS, True),
        Predicate("deleted", Op.EXISTS, False),
    )
    assert spec.select == ("name", "address.city")
    assert spec.is_select
    assert (spec.limit, spec.cursor, spec.after_key) == (50, None, None)
    assert spec.consistency is Consistency.STALE
    assert spec.allow_partial is True
    with pytest.raises(AttributeError):
        spec.limit = 3  # type: ignore[misc]


def test_an_aggregate_query_parses_with_defaults():
    spec = parse_query(
        {
            "start": "a",
            "end": "b",
            "group_by": ["country", "$key"],
            "aggregates": {
                "n": {"fn": "count"},
                "with_email": {"fn": "count", "field": "email"},
                "total": {"fn": "sum", "field": "spent"},
                "lo": {"fn": "min", "field": "age"},
                "hi": {"fn": "max", "field": "age"},
                "mean": {"fn": "avg", "field": "age"},
                "cities": {"fn": "count_distinct", "field": "city"},
                "top": {"fn": "top_k", "field": "city", "k": 3},
                "wide": {"fn": "top_k", "field": "city", "k": 3, "capacity": 7},
            },
            "approximate_distinct_threshold": 5,
        }
    )
    assert (spec.start, spec.end, spec.prefix) == ("a", "b", None)
    assert spec.group_by == ("country", "$key")
    assert not spec.is_select
    assert spec.aggregates["n"] == Aggregate(AggregateFn.COUNT)
    assert spec.aggregates["with_email"] == Aggregate(AggregateFn.COUNT, "email")
    assert spec.aggregates["top"] == Aggregate(AggregateFn.TOP_K, "city", k=3, capacity=256)
    assert spec.aggregates["wide"] == Aggregate(AggregateFn.TOP_K, "city", k=3, capacity=7)
    assert list(spec.aggregates) == [
        "n",
        "with_email",
        "total",
        "lo",
        "hi",
        "mean",
        "cities",
        "top",
        "wide",
    ]
    assert isinstance(spec.aggregates, types.MappingProxyType)
    assert spec.approximate_distinct_threshold == 5
    assert spec.consistency is Consistency.LINEARIZABLE


def test_defaults_come_from_the_limits():
    limits = QueryLimits(default_limit=7, default_distinct_threshold=9)
    assert parse_query(SELECT, limits).limit == 7
    assert parse_query(COUNT, limits).approximate_distinct_threshold == 9
    assert parse_query(aggregate(fn="top_k", field="a", k=100)).aggregates["n"].capacity == 1600


def test_aggregates_without_group_by_form_one_group():
    spec = parse_query(COUNT)
    assert spec.group_by == ()


def test_a_cursor_is_opaque_and_carries_the_last_key():
    cursor = encode_cursor("users/ü/42")
    spec = parse_query({"select": "*", "cursor": cursor})
    assert spec.cursor == cursor
    assert spec.after_key == "users/ü/42"
    assert decode_cursor(cursor) == "users/ü/42"


def test_a_plugin_aggregate_names_an_installed_plugin():
    registry = PluginRegistry()
    registry.register("histogram", lambda key, doc: doc, lambda a, b: a)
    spec = parse_query(aggregate(fn="plugin", plugin="histogram"), plugins=registry)
    assert spec.aggregates["n"] == Aggregate(AggregateFn.PLUGIN, plugin="histogram")


JSON_SCALAR = st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(["", "x", "é"])
FIELD = st.sampled_from(["a", "b.c", "$key", "d.0.e"])


@st.composite
def query_documents(draw):
    doc: dict = {}
    range_kind = draw(st.sampled_from(["none", "prefix", "start", "end", "both"]))
    if range_kind == "prefix":
        # No NUL: keys never hold one, so a key bound with one is refused (tested apart).
        doc["prefix"] = draw(st.text(st.characters(blacklist_characters="\x00"), max_size=3))
    if range_kind in ("start", "both"):
        doc["start"] = "b"
    if range_kind in ("end", "both"):
        doc["end"] = "c"
    predicates = []
    for _ in range(draw(st.integers(0, 3))):
        field = draw(FIELD)
        op = draw(st.sampled_from(list(Op)))
        if op is Op.EXISTS:
            if field == "$key":
                continue
            predicates.append({"field": field, "op": "exists", "value": draw(st.booleans())})
            continue
        if field == "$key" or op is Op.PREFIX:
            value = draw(st.text(max_size=3))
        elif op in (Op.LT, Op.LE, Op.GT, Op.GE):
            value = draw(st.integers() | st.text(max_size=3))
        else:
            value = draw(JSON_SCALAR | st.lists(JSON_SCALAR, max_size=2))
        if op is Op.IN:
            scalars = st.text(max_size=2) if field == "$key" else JSON_SCALAR
            value = draw(st.lists(scalars, min_size=1, max_size=3))
        predicates.append({"field": field, "op": op.value, "value": value})
    doc["where"] = predicates
    if draw(st.booleans()):
        doc["select"] = draw(st.just("*") | st.sampled_from([["a"], ["a", "b.c"]]))
        doc["limit"] = draw(st.integers(1, 10_000))
        if draw(st.booleans()):
            doc["cursor"] = encode_cursor(draw(st.text(max_size=5)))
    else:
        doc["group_by"] = draw(st.sampled_from([[], ["a"], ["a", "$key"]]))
        fn = draw(st.sampled_from(["count", "sum", "min", "max", "avg", "count_distinct"]))
        doc["aggregates"] = {"x": {"fn": fn, "field": "a"}, "t": {"fn": "top_k", "field": "b"}}
        doc["approximate_distinct_threshold"] = draw(st.integers(1, 1000))
    doc["consistency"] = draw(st.sampled_from(["linearizable", "stale"]))
    doc["allow_partial"] = draw(st.booleans())
    return doc


@settings(max_examples=200, deadline=None)
@given(query_documents())
def test_to_json_is_canonical_and_parses_back_to_the_same_spec(doc):
    spec = parse_query(doc)
    again = parse_query(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()


def test_a_spec_holds_its_invariants_even_built_by_hand():
    with pytest.raises(ValueError, match="either select or aggregates"):
        QuerySpec()
    with pytest.raises(ValueError, match="either select or aggregates"):
        QuerySpec(select="*", aggregates={"n": Aggregate(AggregateFn.COUNT)})
    with pytest.raises(ValueError, match="group_by needs aggregates"):
        QuerySpec(select="*", group_by=("a",))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_groups": 0}, "limits.max_groups must be a positive integer, got 0"),
        ({"max_limit": True}, "limits.max_limit must be a positive integer, got True"),
        ({"default_limit": 20, "max_limit": 10}, "default_limit must not exceed"),
        ({"default_distinct_threshold": 20, "max_distinct_threshold": 10}, "must not exceed"),
    ],
)
def test_limits_reject_nonsense(change, message):
    with pytest.raises(ValueError, match=message):
        QueryLimits(**change)


LONG = "x" * 4097
REGISTRY = PluginRegistry()
REGISTRY.register("b", lambda key, doc: 1, lambda a, b: a + b)
REGISTRY.register("a", lambda key, doc: 1, lambda a, b: a + b)

INVALID = [
    # the document and its top level
    ([], "query: expected a JSON object, got array"),
    ({"select": "*", "bogus": 1}, "bogus: unknown field; expected one of prefix, start, end,"),
    ({"select": "*", "prefix": 3}, "prefix: expected a string, got number"),
    ({"select": "*", "prefix": "\ud800"}, "prefix: not valid Unicode (a lone surrogate)"),
    ({"select": "*", "start": "a\x00"}, "start: must not contain NUL (keys never do)"),
    ({"select": "*", "end": LONG}, "end: longer than 4096 bytes"),
    ({"select": "*", "prefix": "a", "end": "b"}, "prefix: give either prefix or start/end, not"),
    ({"select": "*", "start": "b", "end": "b"}, "start: must sort before end"),
    ({"select": "*", "aggregates": {}}, "query: select and aggregates are exclusive; give one"),
    ({}, "query: give either select (rows) or aggregates (with optional group_by)"),
    ({"group_by": ["a"]}, "aggregates: required with group_by"),
    # where
    ({"select": "*", "where": {}}, "where: expected an array, got object"),
    ({"select": "*", "where": [{}] * 33}, "where: 33 items; the limit is 32"),
    (where("a"), "where[0]: expected an object, got string"),
    (where({"field": "a", "op": "==", "value": 1, "x": 2}), "where[0].x: unknown field; expected"),
    (where({"op": "=="}), "where[0].field: required"),
    (where({"field": "a"}), "where[0].op: required"),
    (where({"field": 1, "op": "=="}), "where[0].field: expected a string, got number"),
    (where({"field": "", "op": "=="}), "where[0].field: empty field path"),
    (where({"field": "a" * 257, "op": "=="}), "where[0].field: field path longer than 256 bytes"),
    (where({"field": "a..b", "op": "=="}), "where[0].field: empty segment in field path 'a..b'"),
    (where({"field": "a.", "op": "=="}), "where[0].field: empty segment in field path 'a.'"),
    (
        where({"field": "a.b.c.d.e.f.g.h.i", "op": "exists"}),
        "where[0].field: field path 'a.b.c.d.e.f.g.h.i' is 9 levels deep; the limit is 8",
    ),
    (where({"field": "$value", "op": "exists"}), "where[0].field: '$value' is reserved; the only"),
    (where({"field": "a", "op": 5}), "where[0].op: expected a string, got number"),
    (
        where(
            {"field": "a", "op": "==", "value": 1},
            {"field": "a", "op": "==", "value": 1},
            {"field": "a", "op": "=~", "value": "x"},
        ),
        "where[2].op: unknown operator '=~'; use one of ==, !=, <, <=, >, >=, in, exists, prefix",
    ),
    (where({"field": "$key", "op": "exists"}), "where[0]: $key always exists; drop this predicate"),
    (where({"field": "a", "op": "exists", "value": 1}), "where[0].value: expected true or false"),
    (where({"field": "a", "op": "=="}), "where[0].value: required for '=='"),
    (where({"field": "a", "op": "!=", "value": float("nan")}), "NaN and Infinity are not JSON"),
    (where({"field": "a", "op": "==", "value": float("inf")}), "NaN and Infinity are not JSON"),
    (where({"field": "a", "op": "==", "value": {1, 2}}), "not a JSON value with valid Unicode"),
    (where({"field": "a", "op": "==", "value": ["\udc00"]}), "not a JSON value with valid Unicode"),
    (where({"field": "a", "op": "==", "value": "x" * 5000}), "5002 bytes as JSON; the limit is"),
    (
        where({"field": "a", "op": "in", "value": 1}),
        "where[0].value: expected an array, got number",
    ),
    (where({"field": "a", "op": "in", "value": [1] * 1001}), "1001 items; the limit is 1000"),
    (where({"field": "a", "op": "in", "value": []}), "where[0].value: 'in' needs at least one"),
    (where({"field": "a", "op": "in", "value": [1, [2]]}), "where[0].value[1]: 'in' takes strings"),
    (where({"field": "a", "op": "in", "value": [{}]}), "where[0].value[0]: 'in' takes strings"),
    (where({"field": "a", "op": "prefix", "value": 1}), "where[0].value: expected a string, got"),
    (where({"field": "a", "op": "<", "value": True}), "'<' compares numbers or strings, got boo"),
    (where({"field": "a", "op": ">=", "value": None}), "'>=' compares numbers or strings, got n"),
    (where({"field": "a", "op": ">", "value": [1]}), "'>' compares numbers or strings, got arr"),
    (where({"field": "$key", "op": "==", "value": 1}), "$key is a string; compare it with strings"),
    (where({"field": "$key", "op": "<", "value": 1}), "$key is a string; compare it with strings"),
    (where({"field": "$key", "op": "in", "value": ["a", 1]}), "$key is a string; compare it"),
    # select
    ({"select": "a"}, "select: expected an array, got string"),
    ({"select": []}, 'select: name at least one field, or "*" for whole values'),
    ({"select": ["a"] * 65}, "select: 65 items; the limit is 64"),
    ({"select": ["a", "b", "a"]}, "select[2]: 'a' is listed twice"),
    ({"select": ["a", "$key"]}, "select[1]: rows always carry their key"),
    ({"select": ["a", 1]}, "select[1]: expected a string, got number"),
    ({"select": "*", "group_by": []}, "group_by: only with aggregates; a select query returns"),
    ({"select": "*", "approximate_distinct_threshold": 5}, "approximate_distinct_threshold: only"),
    ({"select": "*", "limit": 0}, "limit: expected an integer from 1 to 10000, got 0"),
    ({"select": "*", "limit": 10_001}, "limit: expected an integer from 1 to 10000, got 10001"),
    ({"select": "*", "limit": 2.0}, "limit: expected an integer from 1 to 10000, got number"),
    ({"select": "*", "limit": True}, "limit: expected an integer from 1 to 10000, got boolean"),
    ({"select": "*", "cursor": 5}, "cursor: expected a string, got number"),
    ({"select": "*", "cursor": "q1." + "A" * 8190}, "cursor: longer than 8192 bytes"),
    ({"select": "*", "cursor": "dXNlcnM"}, "cursor: not one this API returned; pass next_curs"),
    ({"select": "*", "cursor": "q1.@@@"}, "cursor: not one this API returned"),
    ({"select": "*", "cursor": "q1.A"}, "cursor: not one this API returned"),
    ({"select": "*", "cursor": "q1._w"}, "cursor: not one this API returned"),
    ({"select": "*", "cursor": "q1.YR"}, "cursor: not one this API returned"),
    ({"select": "*", "cursor": "q1.YQ=="}, "cursor: not one this API returned"),
    # aggregates
    ({**COUNT, "limit": 5}, "limit: only with select; an aggregate query returns every group"),
    ({**COUNT, "cursor": encode_cursor("a")}, "cursor: only with select; an aggregate query"),
    ({**COUNT, "group_by": "a"}, "group_by: expected an array, got string"),
    ({**COUNT, "group_by": list("abcdefghi")}, "group_by: 9 items; the limit is 8"),
    ({**COUNT, "group_by": ["a", "a"]}, "group_by[1]: 'a' is listed twice"),
    ({**COUNT, "group_by": ["$x.a"]}, "group_by[0]: '$x' is reserved; the only $-field is $key"),
    ({"aggregates": []}, "aggregates: expected an object, got array"),
    ({"aggregates": {}}, "aggregates: name at least one aggregate"),
    ({"aggregates": {f"n{i}": {"fn": "count"} for i in range(33)}}, "33 items; the limit is 32"),
    ({"aggregates": {"": {"fn": "count"}}}, "aggregates: name '' must be 1 to 64 chars"),
    ({"aggregates": {"n" * 65: {"fn": "count"}}}, "aggregates: name 'nnnn"),
    ({"aggregates": {"\ud800": {"fn": "count"}}}, "aggregates: not valid Unicode"),
    ({"aggregates": {"n": "count"}}, "aggregates.n: expected an object, got string"),
    (aggregate(fn="count", feild="a"), "aggregates.n.feild: unknown field; expected one of fn, fi"),
    (aggregate(field="a"), "aggregates.n.fn: required"),
    (aggregate(fn=["count"]), "aggregates.n.fn: expected a string, got array"),
    (
        aggregate(fn="median", field="a"),
        "aggregates.n.fn: unknown function 'median'; use one of count, sum, min, max, avg, "
        "count_distinct, top_k, plugin",
    ),
    (aggregate(fn="sum", field="a", k=3), "aggregates.n.k: only top_k takes k"),
    (aggregate(fn="count", capacity=3), "aggregates.n.capacity: only top_k takes capacity"),
    (aggregate(fn="max", field="a", plugin="x"), "aggregates.n.plugin: only fn 'plugin' names a"),
    (aggregate(fn="plugin", plugin="a", field="x"), "aggregates.n.field: a plugin sees the whole"),
    (aggregate(fn="plugin"), "aggregates.n.plugin: required for fn 'plugin'"),
    (aggregate(fn="plugin", plugin=7), "aggregates.n.plugin: expected a string, got number"),
    (aggregate(fn="plugin", plugin="x"), "aggregates.n.plugin: unknown plugin 'x'; no plugins"),
    (aggregate(fn="sum"), "aggregates.n.field: required for sum"),
    (aggregate(fn="count_distinct"), "aggregates.n.field: required for count_distinct"),
    (aggregate(fn="min", field="a..b"), "aggregates.n.field: empty segment in field path"),
    (aggregate(fn="top_k", field="a", k=0), "aggregates.n.k: expected an integer from 1 to 1000,"),
    (aggregate(fn="top_k", field="a", k=1001), "aggregates.n.k: expected an integer from 1 to 1"),
    (aggregate(fn="top_k", field="a", k="3"), "aggregates.n.k: expected an integer from 1 to 10"),
    (
        aggregate(fn="top_k", field="a", k=5, capacity=3),
        "aggregates.n.capacity: expected an integer from 5 to 100000, got 3",
    ),
    # options
    ({**SELECT, "consistency": 1}, "consistency: expected a string, got number"),
    (
        {**SELECT, "consistency": "strong"},
        "consistency: unknown level 'strong'; use linearizable or stale",
    ),
    ({**SELECT, "allow_partial": "yes"}, "allow_partial: expected true or false, got string"),
    (
        {**COUNT, "approximate_distinct_threshold": 0},
        "expected an integer from 1 to 1000000, got 0",
    ),
    ({**COUNT, "approximate_distinct_threshold": 10**7}, "from 1 to 1000000, got 10000000"),
]


@pytest.mark.parametrize(("doc", "message"), INVALID)
def test_an_invalid_query_says_what_is_wrong_and_where(doc, message):
    with pytest.raises(InvalidRequest) as raised:
        parse_query(doc)
    assert raised.value.message.startswith(message) or message in raised.value.message, (
        raised.value.message
    )
    assert raised.value.status == 400


def test_an_unknown_plugin_lists_the_installed_ones():
    with pytest.raises(InvalidRequest) as raised:
        parse_query(aggregate(fn="plugin", plugin="histogram"), plugins=REGISTRY)
    assert raised.value.message == (
        "aggregates.n.plugin: unknown plugin 'histogram'; installed: a, b"
    )


def test_tighter_limits_apply():
    limits = QueryLimits(max_field_depth=2, max_in_values=2, max_key_bytes=3, max_groups=5)
    with pytest.raises(InvalidRequest, match="is 3 levels deep; the limit is 2"):
        parse_query(where({"field": "a.b.c", "op": "exists"}), limits)
    with pytest.raises(InvalidRequest, match="3 items; the limit is 2"):
        parse_query(where({"field": "a", "op": "in", "value": [1, 2, 3]}), limits)
    with pytest.raises(InvalidRequest, match="prefix: longer than 3 bytes"):
        parse_query({**SELECT, "prefix": "abcd"}, limits)
