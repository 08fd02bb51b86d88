"""Predicate semantics, as documented in kvstore/query/predicates.py and docs/query.md, and the
documents they read: strict JSON decoding, dotted paths, canonical text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.query.documents import (
    MISSING,
    NOT_JSON,
    canonical_text,
    decode_document,
    json_equal,
    json_type_name,
    make_getter,
    value_order,
)
from kvstore.query.predicates import compile_where
from kvstore.query.spec import parse_query


def where_of(*predicates):
    return compile_where(parse_query({"select": "*", "where": list(predicates)}).where)


def matches(predicate, document, key="k"):
    return where_of(predicate)(key, document)


DOC = {
    "n": 5,
    "f": 2.5,
    "s": "hello",
    "t": True,
    "z": None,
    "list": [1, "two", {"x": 3}],
    "obj": {"a": {"b": "deep"}, "0": "zero-key"},
    "one": 1.0,
}

CASES = [
    # == is JSON equality: numbers by value, booleans are not numbers
    ("n", "==", 5, True),
    ("n", "==", 5.0, True),
    ("one", "==", 1, True),
    ("one", "==", True, False),
    ("t", "==", True, True),
    ("t", "==", 1, False),
    ("z", "==", None, True),
    ("n", "==", None, False),
    ("s", "==", "hello", True),
    ("s", "==", 5, False),
    ("n", "==", "5", False),
    ("list", "==", [1, "two", {"x": 3}], True),
    ("list", "==", [1.0, "two", {"x": 3.0}], True),
    ("list", "==", [True, "two", {"x": 3}], False),
    ("obj", "==", {"0": "zero-key", "a": {"b": "deep"}}, True),
    ("missing", "==", None, False),
    # != is the negation of == among rows having the field; missing is false
    ("n", "!=", 6, True),
    ("n", "!=", 5, False),
    ("n", "!=", "5", True),
    ("t", "!=", 1, True),
    ("z", "!=", None, False),
    ("missing", "!=", 1, False),
    ("list", "!=", [1], True),
    # ordering: numbers with numbers, strings with strings, anything else false
    ("n", "<", 6, True),
    ("n", "<", 5, False),
    ("n", "<=", 5, True),
    ("n", ">", 4.5, True),
    ("n", ">=", 5.0, True),
    ("f", ">", 2, True),
    ("n", "<", "z", False),
    ("s", "<", "z", True),
    ("s", "<=", "hello", True),
    ("s", ">", "hellO", True),
    ("s", ">=", "help", False),
    ("s", "<", 100, False),
    ("t", ">", 0, False),
    ("z", "<", 1, False),
    ("list", ">", 0, False),
    ("missing", "<", 1, False),
    # in: == against any listed scalar
    ("n", "in", [1, 5], True),
    ("n", "in", [5.0], True),
    ("n", "in", ["5"], False),
    ("t", "in", [1], False),
    ("t", "in", [True], True),
    ("t", "in", [False, None], False),
    ("z", "in", [None], True),
    ("s", "in", ["hello", 3], True),
    ("list", "in", [1], False),
    ("missing", "in", [None], False),
    # exists: present with any value, null too
    ("z", "exists", True, True),
    ("missing", "exists", True, False),
    ("missing", "exists", False, True),
    ("n", "exists", False, False),
    # prefix: strings only
    ("s", "prefix", "he", True),
    ("s", "prefix", "", True),
    ("s", "prefix", "lo", False),
    ("n", "prefix", "5", False),
    # dotted paths: objects by name, arrays by canonical index
    ("obj.a.b", "==", "deep", True),
    ("obj.0", "==", "zero-key", True),
    ("list.1", "==", "two", True),
    ("list.2.x", ">", 2, True),
    ("list.01", "exists", True, False),
    ("list.3", "exists", True, False),
    ("list.-1", "exists", True, False),
    ("s.0", "exists", True, False),
    ("obj.a.b.c", "exists", True, False),
]


@pytest.mark.parametrize(("field", "op", "value", "expected"), CASES)
def test_comparison_semantics(field, op, value, expected):
    predicate = {"field": field, "op": op, "value": value}
    assert matches(predicate, DOC) is expected


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [
        ("==", "users/1", True),
        ("!=", "users/1", False),
        ("<", "users/2", True),
        (">", "users/", True),
        (">=", "users/1", True),
        ("<=", "users/0", False),
        ("in", ["a", "users/1"], True),
        ("prefix", "users/", True),
        ("prefix", "sers", False),
    ],
)
def test_key_predicates_see_the_key(op, value, expected):
    assert matches({"field": "$key", "op": op, "value": value}, DOC, key="users/1") is expected


def test_all_predicates_must_hold():
    both = where_of({"field": "n", "op": ">", "value": 1}, {"field": "s", "op": "==", "value": "x"})
    assert not both("k", DOC)
    assert both("k", {"n": 2, "s": "x"})
    many = where_of(*[{"field": "n", "op": ">", "value": i} for i in range(4)])
    assert many("k", {"n": 4})
    assert not many("k", {"n": 3})


def test_no_predicates_match_everything_including_values_that_are_not_json():
    where = where_of()
    assert where.key_test is None
    assert where.document_test is None
    assert where("k", NOT_JSON)
    assert where("k", 7)


def test_a_value_that_is_not_json_matches_only_predicates_on_the_key():
    assert not matches({"field": "a", "op": "exists", "value": False}, NOT_JSON)
    assert not matches({"field": "a", "op": "!=", "value": 1}, NOT_JSON)
    assert matches({"field": "$key", "op": "prefix", "value": "k"}, NOT_JSON)
    mixed = where_of(
        {"field": "$key", "op": "prefix", "value": "k"},
        {"field": "a", "op": "exists", "value": False},
    )
    assert not mixed("k", NOT_JSON)
    assert mixed("k", {})


def test_a_document_that_is_not_an_object_has_no_fields():
    assert matches({"field": "a", "op": "exists", "value": False}, [1, 2])
    assert not matches({"field": "a", "op": "exists"}, "a string")
    assert matches({"field": "0", "op": "==", "value": 1}, [1, 2])


def test_key_predicates_run_before_the_document_is_needed():
    where = where_of({"field": "$key", "op": "==", "value": "a"}, {"field": "x", "op": "exists"})
    assert where.key_test is not None
    assert where.document_test is not None
    assert not where.key_test("b")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.5, -0.0, 1.0, 2.0])
    | st.sampled_from(["", "a", "b"]),
    lambda children: (
        st.lists(children, max_size=2)
        | st.dictionaries(st.sampled_from(["a", "b"]), children, max_size=2)
    ),
    max_leaves=4,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, literal=JSON_VALUES)
def test_not_equal_is_the_negation_of_equal_when_the_field_exists(value, literal):
    equal = matches({"field": "v", "op": "==", "value": literal}, {"v": value})
    not_equal = matches({"field": "v", "op": "!=", "value": literal}, {"v": value})
    assert equal != not_equal
    assert equal == (canonical_text(value) == canonical_text(literal))
    assert not matches({"field": "v", "op": "!=", "value": literal}, {})


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, literal=st.integers(-3, 3) | st.sampled_from(["", "a", "b", 0.5]))
def test_ordering_holds_only_within_numbers_or_within_strings(value, literal):
    is_number = type(value) in (int, float)
    same_kind = (is_number and type(literal) in (int, float)) or (
        type(value) is str and type(literal) is str
    )
    for op, holds in (
        ("<", lambda a, b: a < b),
        ("<=", lambda a, b: a <= b),
        (">", lambda a, b: a > b),
        (">=", lambda a, b: a >= b),
    ):
        got = matches({"field": "v", "op": op, "value": literal}, {"v": value})
        assert got == (same_kind and holds(value, literal))


@settings(max_examples=200, deadline=None)
@given(
    value=JSON_VALUES,
    literals=st.lists(st.none() | st.booleans() | st.integers(-2, 2) | st.just("a"), min_size=1),
)
def test_in_is_equality_with_any_listed_value(value, literals):
    expected = any(json_equal(value, literal) for literal in literals)
    assert matches({"field": "v", "op": "in", "value": literals}, {"v": value}) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"a": 1}', {"a": 1}),
        (b"[1, 2]", [1, 2]),
        (b'"s"', "s"),
        (b"3", 3),
        (b"null", None),
        (b'{"e": "\\ud83d\\ude00"}', {"e": "\U0001f600"}),  # a surrogate pair is one character
        (b"", NOT_JSON),
        (b"not json", NOT_JSON),
        (b"\xff\xfe", NOT_JSON),
        (b"NaN", NOT_JSON),
        (b'{"a": Infinity}', NOT_JSON),
        (b"[-Infinity]", NOT_JSON),
        (b"1e400", NOT_JSON),
        (b'{"a": 1', NOT_JSON),
        (b'"\\ud800"', NOT_JSON),  # a lone surrogate is not Unicode
        (b'{"a": ["\\udfff x"]}', NOT_JSON),
        (b'"\\\\ud800"', "\\ud800"),  # an escaped backslash, not a surrogate
        (b"[" * 100_000 + b"]" * 100_000, NOT_JSON),
    ],
)
def test_values_decode_strictly(raw, expected):
    document = decode_document(raw)
    assert document == expected if expected is not NOT_JSON else document is NOT_JSON


def test_getters_follow_paths_and_report_missing():
    assert make_getter("$key")("k", NOT_JSON) == "k"
    assert make_getter("a")("k", {"a": None}) is None
    assert make_getter("a")("k", NOT_JSON) is MISSING
    assert make_getter("a.b")("k", {"a": {"b": 2}}) == 2
    assert make_getter("a.b")("k", {"a": 1}) is MISSING
    assert make_getter("a.b")("k", {"a": {}}) is MISSING
    assert make_getter("a.1")("k", {"a": [0, 9]}) == 9
    assert make_getter("0")("k", [4]) == 4


def test_canonical_text_identifies_json_values():
    assert canonical_text(1) == canonical_text(1.0) == "1"
    assert canonical_text(-0.0) == "0"
    assert canonical_text(True) == "true" != canonical_text(1)
    assert canonical_text("1") == '"1"'
    assert canonical_text("é") == '"\\u00e9"'
    assert canonical_text({"b": 1.0, "a": [2.0, "x"]}) == '{"a":[2,"x"],"b":1}'
    assert canonical_text(2.5) == "2.5"
    assert canonical_text(1e300) == "1e+300"
    assert canonical_text(10**30) == str(10**30)
    assert canonical_text(None) == "null"
    assert json.loads(canonical_text({"x": [None, False]})) == {"x": [None, False]}


def test_json_type_names_and_value_order():
    names = [json_type_name(v) for v in (None, True, 1, 1.5, "s", [], (), {}, b"")]
    assert names == [
        "null",
        "boolean",
        "number",
        "number",
        "string",
        "array",
        "array",
        "object",
        "bytes",
    ]
    ordered = sorted([{}, [], "a", 2, 1.5, False, None, MISSING], key=value_order)
    assert ordered == [MISSING, None, False, 1.5, 2, "a", [], {}]


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=12,
)


@given(_JSON_VALUES)
@settings(max_examples=300)
def test_the_fast_decoder_agrees_with_json(value) -> None:
    """orjson decodes first; its answer must be json's, big integers exact."""
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert decode_document(raw) == json.loads(raw)


@pytest.mark.parametrize(
    "raw", [b"1e400", b"NaN", b'"\\ud800"', b"\xef\xbb\xbf1", b"[1] x", b"\xff", b"01", b"[" * 5000]
)
def test_what_json_refuses_the_fast_decoder_refuses_too(raw) -> None:
    assert decode_document(raw) is NOT_JSON
