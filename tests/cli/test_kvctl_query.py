"""kvctl query's flag language: --where and --agg parse to the API's JSON, and mistakes are
usage errors that show the right spelling. (Answers are checked on a real cluster in
tests/e2e/test_query_cluster.py.)"""

from __future__ import annotations

import click
import pytest

from cli.errors import EXIT_USAGE
from cli.query_command import build_spec, parse_aggregate, parse_where


@pytest.mark.parametrize(
    ("text", "predicate"),
    [
        ("age >= 18", {"field": "age", "op": ">=", "value": 18}),
        ("age<=18", {"field": "age", "op": "<=", "value": 18}),
        ("age < 1.5", {"field": "age", "op": "<", "value": 1.5}),
        ("name == Ada", {"field": "name", "op": "==", "value": "Ada"}),
        ('name != "Ada Byron"', {"field": "name", "op": "!=", "value": "Ada Byron"}),
        ('city in ["lyon", "nice"]', {"field": "city", "op": "in", "value": ["lyon", "nice"]}),
        ("email exists", {"field": "email", "op": "exists", "value": True}),
        ("email exists false", {"field": "email", "op": "exists", "value": False}),
        ("name prefix Ad", {"field": "name", "op": "prefix", "value": "Ad"}),
        ("$key prefix users/1", {"field": "$key", "op": "prefix", "value": "users/1"}),
        ("address.city == null", {"field": "address.city", "op": "==", "value": None}),
    ],
)
def test_where_parses_to_a_predicate(text, predicate) -> None:
    assert parse_where(text) == predicate


@pytest.mark.parametrize("text", ["age", "age ~ 3", "age >=", ">= 3"])
def test_a_bad_where_says_how_to_write_it(text) -> None:
    with pytest.raises(click.BadParameter, match=r"OP|needs a value"):
        parse_where(text)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("n=count", ("n", {"fn": "count"})),
        ("z=count(email)", ("z", {"fn": "count", "field": "email"})),
        ("s=sum(spent)", ("s", {"fn": "sum", "field": "spent"})),
        ("t=top_k(city, 3)", ("t", {"fn": "top_k", "field": "city", "k": 3})),
        ("u=count_distinct(user.id)", ("u", {"fn": "count_distinct", "field": "user.id"})),
        ("h=plugin:histogram", ("h", {"fn": "plugin", "plugin": "histogram"})),
    ],
)
def test_agg_parses_to_an_aggregate(text, parsed) -> None:
    assert parse_aggregate(text) == parsed


@pytest.mark.parametrize("text", ["count", "n=", "n=sum(a,2)", "n=count:x", "n=Sum(a)"])
def test_a_bad_agg_says_how_to_write_it(text) -> None:
    with pytest.raises(click.BadParameter):
        parse_aggregate(text)


def test_build_spec_needs_select_or_aggregates_not_both() -> None:
    common = {
        "prefix": "u/", "start": None, "end": None, "where": (), "group_by": None, "limit": None,
        "cursor": None, "stale": False, "allow_partial": False, "distinct_threshold": None,
    }  # fmt: skip
    with pytest.raises(click.UsageError):
        build_spec(select=None, aggregates=(), **common)
    with pytest.raises(click.UsageError):
        build_spec(select="*", aggregates=("n=count",), **common)
    spec = build_spec(select="name, age", aggregates=(), **{**common, "stale": True, "limit": 5})
    assert spec == {
        "prefix": "u/", "select": ["name", "age"], "limit": 5, "consistency": "stale",
    }  # fmt: skip


def test_file_and_flags_together_is_a_usage_error(run, tmp_path) -> None:
    spec = tmp_path / "q.json"
    spec.write_text('{"select": "*"}')
    result = run("--endpoints", "http://127.0.0.1:1", "query", "--file", str(spec), "-p", "x")
    assert result.exit_code == EXIT_USAGE
    assert "either with --file or with flags" in result.stderr


def test_a_file_that_is_not_json_is_a_usage_error(run, tmp_path) -> None:
    spec = tmp_path / "q.json"
    spec.write_text("{nope")
    result = run("--endpoints", "http://127.0.0.1:1", "query", "--file", str(spec))
    assert result.exit_code == EXIT_USAGE
    assert "not valid JSON" in result.stderr
