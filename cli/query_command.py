"""`kvctl query`: the map-reduce query API (docs/query.md) from flags or a JSON file."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from cli.client import KVClient
from cli.output import print_json, stdout_console
from cli.settings import Settings, client_options, settings_of

# Longest first, so "<=" is not read as "<" followed by "=".
_OPS = ("==", "!=", "<=", ">=", "<", ">", "in", "exists", "prefix")
_WHERE = re.compile(
    r"\s*(?P<field>[^\s<>=!]+)\s*(?P<op>==|!=|<=|>=|<|>|\bin\b|\bexists\b|\bprefix\b)\s*(?P<value>.*)$"
)
_AGG = re.compile(
    r"(?P<name>[^=\s]+)=(?P<fn>[a-z_]+)(?::(?P<plugin>[a-z0-9_.-]+))?(?:\((?P<args>[^)]*)\))?$"
)
# Queries scan every shard; give them longer than a key read before kvctl gives up.
QUERY_TIMEOUT_S = 120.0


def parse_where(text: str) -> dict[str, Any]:
    """'age >= 18', 'city in ["lyon","nice"]', 'email exists', 'name prefix Ad' -> predicate.
    The value is JSON when it parses as JSON, else the text itself (a bare string)."""
    match = _WHERE.match(text)
    if match is None:
        raise click.BadParameter(
            f"{text!r}: write FIELD OP VALUE, with OP one of {', '.join(_OPS)} "
            "(e.g. 'age >= 18', 'city in [\"lyon\",\"nice\"]', 'email exists')",
            param_hint="--where",
        )
    field, op, raw = match["field"], match["op"], match["value"].strip()
    if op == "exists":
        value: Any = True if raw == "" else _json_or_text(raw)
    else:
        if raw == "":
            raise click.BadParameter(f"{text!r}: {op} needs a value", param_hint="--where")
        value = _json_or_text(raw)
    return {"field": field, "op": op, "value": value}


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_aggregate(text: str) -> tuple[str, dict[str, Any]]:
    """'n=count', 'total=sum(spent)', 'top=top_k(city,3)', 'x=plugin:histogram' -> (name, agg)."""
    match = _AGG.match(text.strip())
    if match is None:
        raise click.BadParameter(
            f"{text!r}: write NAME=FN(FIELD), e.g. n=count, total=sum(spent), "
            "top=top_k(city,5), u=count_distinct(user), h=plugin:NAME",
            param_hint="--agg",
        )
    aggregate: dict[str, Any] = {"fn": match["fn"]}
    if match["plugin"]:
        if match["fn"] != "plugin":
            raise click.BadParameter(f"{text!r}: only plugin takes :NAME", param_hint="--agg")
        aggregate["plugin"] = match["plugin"]
    args = [part.strip() for part in (match["args"] or "").split(",") if part.strip()]
    if args:
        aggregate["field"] = args[0]
    if len(args) > 1:
        if match["fn"] != "top_k" or not args[1].isdigit():
            raise click.BadParameter(
                f"{text!r}: only top_k takes a second argument, k (a number)", param_hint="--agg"
            )
        aggregate["k"] = int(args[1])
    return match["name"], aggregate


def _fields(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def build_spec(
    *,
    prefix: str | None,
    start: str | None,
    end: str | None,
    where: Sequence[str],
    select: str | None,
    group_by: str | None,
    aggregates: Sequence[str],
    limit: int | None,
    cursor: str | None,
    stale: bool,
    allow_partial: bool,
    distinct_threshold: int | None,
) -> dict[str, Any]:
    if (select is None) == (not aggregates):
        raise click.UsageError(
            "say what to compute: --select FIELDS (rows; '*' for whole values) or one or more "
            "--agg NAME=FN(FIELD) (aggregates), or give the whole query with --file"
        )
    spec: dict[str, Any] = {}
    for name, value in (("prefix", prefix), ("start", start), ("end", end)):
        if value is not None:
            spec[name] = value
    if where:
        spec["where"] = [parse_where(text) for text in where]
    if select is not None:
        spec["select"] = "*" if select.strip() == "*" else _fields(select)
    else:
        spec["aggregates"] = dict(parse_aggregate(text) for text in aggregates)
        if group_by:
            spec["group_by"] = _fields(group_by)
    options: tuple[tuple[str, object], ...] = (
        ("limit", limit),
        ("cursor", cursor),
        ("approximate_distinct_threshold", distinct_threshold),
    )
    for name, option in options:
        if option is not None:
            spec[name] = option
    if stale:
        spec["consistency"] = "stale"
    if allow_partial:
        spec["allow_partial"] = True
    return spec


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise click.BadParameter(f"cannot read {path}: {error}", param_hint="--file") from None
    try:
        spec = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(
            f"{path} is not valid JSON: {error}", param_hint="--file"
        ) from None
    if not isinstance(spec, dict):
        raise click.BadParameter(f"{path} must hold one JSON object", param_hint="--file")
    return spec


def _cell(value: Any) -> Text:
    if value is None:
        return Text("null", style="dim")
    if isinstance(value, str):
        return Text(value)
    return Text(json.dumps(value, ensure_ascii=False))


def rows_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("KEY", overflow="fold")
    columns: list[str] = []
    for row in rows:
        value = row.get("value")
        for name in value if isinstance(value, dict) else ():
            if name not in columns:
                columns.append(name)
    whole = any(not isinstance(row.get("value"), dict) for row in rows if "value" in row)
    if whole or not columns:
        table.add_column("VALUE", overflow="ellipsis", no_wrap=True)
        for row in rows:
            shown = Text("<not JSON>", style="dim") if row.get("not_json") else _cell(row["value"])
            table.add_row(Text(row["key"]), shown)
        return table
    for name in columns:
        table.add_column(name.upper(), overflow="fold")
    for row in rows:
        value = row.get("value") or {}
        table.add_row(Text(row["key"]), *(_cell(value.get(name)) for name in columns))
    return table


def groups_table(groups: Sequence[dict[str, Any]], group_by: Sequence[str]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    names: list[str] = list(groups[0]["aggregates"]) if groups else []
    for field in group_by:
        table.add_column(field.upper(), overflow="fold")
    for name in names:
        table.add_column(name.upper(), overflow="fold", justify="right")
    for group in groups:
        keys = [_cell(group["group"].get(field)) for field in group_by]
        table.add_row(*keys, *(_aggregate_cell(group["aggregates"][name]) for name in names))
    return table


def _aggregate_cell(value: Any) -> Text:
    if isinstance(value, dict) and "items" in value:  # top_k
        items = ", ".join(
            f"{json.dumps(i['value'], ensure_ascii=False)} x{i['count']}" for i in value["items"]
        )
        return Text(items + (f" (±{value['max_error']})" if value.get("approximate") else ""))
    if isinstance(value, dict) and "value" in value:  # count_distinct
        if value.get("approximate"):
            return Text(f"≈{value['value']} (±{value['relative_error']:.1%})")
        return Text(str(value["value"]))
    return _cell(value)


def stats_line(answer: dict[str, Any]) -> Text:
    stats = answer.get("stats", {})
    slowest = max((s.get("elapsed_ms", 0) for s in stats.get("per_shard", [])), default=0)
    line = (
        f"{stats.get('shards', 0)} shards, {stats.get('rows_scanned', 0)} rows scanned, "
        f"{stats.get('rows_matched', 0)} matched, {stats.get('bytes_moved', 0)} bytes moved, "
        f"slowest shard {slowest:.0f} ms"
    )
    return Text(line, style="dim")


@click.command("query", short_help="Filter, project and aggregate JSON values on every shard.")
@click.option(
    "--file",
    "-f",
    "spec_file",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="the whole query as JSON (docs/query.md); '-': stdin",
)
@click.option("--prefix", "-p", help="only keys starting with P")
@click.option("--start", metavar="S", help="first key (inclusive)")
@click.option("--end", metavar="E", help="stop before this key (exclusive)")
@click.option(
    "--where",
    "-w",
    multiple=True,
    metavar="'FIELD OP VALUE'",
    help="keep rows where this holds (repeat: all must); OP: == != < <= > >= in exists prefix",
)
@click.option(
    "--select",
    "-s",
    metavar="FIELDS",
    help="return rows: comma-separated field paths, or '*' for whole values",
)
@click.option(
    "--agg",
    "-a",
    "aggregates",
    multiple=True,
    metavar="NAME=FN(FIELD)",
    help="compute an aggregate (repeat): count, sum, min, max, avg, count_distinct, "
    "top_k(FIELD,K), plugin:NAME",
)
@click.option(
    "--group-by", "-g", metavar="FIELDS", help="one result per distinct value of these fields"
)
@click.option("--limit", "-n", type=click.IntRange(min=1), help="rows per page [default: 1000]")
@click.option("--cursor", metavar="C", help="continue a select where its previous page stopped")
@click.option("--all", "all_pages", is_flag=True, help="fetch every page of a select")
@click.option("--stale", is_flag=True, help="read any replica: faster, may lag behind")
@click.option("--allow-partial", is_flag=True, help="answer without shards that do not answer")
@click.option(
    "--distinct-threshold",
    type=click.IntRange(min=1),
    metavar="N",
    help="count_distinct stays exact up to N values [default: 10000]",
)
@click.option("--stats", "show_stats", is_flag=True, help="also print a line per shard")
@client_options
def query_command(
    spec_file: Path | None,
    prefix: str | None,
    start: str | None,
    end: str | None,
    where: tuple[str, ...],
    select: str | None,
    aggregates: tuple[str, ...],
    group_by: str | None,
    limit: int | None,
    cursor: str | None,
    all_pages: bool,
    stale: bool,
    allow_partial: bool,
    distinct_threshold: int | None,
    show_stats: bool,
) -> None:
    """Run a query across every shard: each shard leader filters and pre-aggregates next to its
    data, and the node you asked merges the answers. See docs/query.md for the full language.

    \b
    Examples:
      kvctl query -p users/ -w 'age >= 18' -s name,address.city -n 20
      kvctl query -p users/ -g country -a n=count -a spent=sum(spent) -a top=top_k(city,3)
      kvctl query -p orders/ -a buyers=count_distinct(user) --stale
      kvctl query --file query.json --json
    """
    settings: Settings = settings_of(click.get_current_context())
    flags_given = any(
        (prefix, start, end, where, select, aggregates, group_by, limit, cursor, distinct_threshold)
    )
    if spec_file is not None:
        if flags_given:
            raise click.UsageError("give the query either with --file or with flags, not both")
        spec = _read_spec(spec_file)
        if stale:
            spec["consistency"] = "stale"
        if allow_partial:
            spec["allow_partial"] = True
    else:
        spec = build_spec(
            prefix=prefix,
            start=start,
            end=end,
            where=where,
            select=select,
            group_by=group_by,
            aggregates=aggregates,
            limit=limit,
            cursor=cursor,
            stale=stale,
            allow_partial=allow_partial,
            distinct_threshold=distinct_threshold,
        )
    client = KVClient(settings.resolved_endpoints(), max(settings.timeout_s, QUERY_TIMEOUT_S))
    pages = client.query_pages(spec) if all_pages else iter([client.query(spec)])
    answer = next(pages)
    for page in pages:  # --all: one answer holding every row
        answer["rows"] += page["rows"]
        answer["next_cursor"] = page["next_cursor"]
    _show(answer, spec, settings.json_output, show_stats)


def _show(answer: dict[str, Any], spec: dict[str, Any], json_output: bool, stats: bool) -> None:
    if json_output:
        print_json(answer)
        return
    console = stdout_console()
    if "aggregates" in spec:
        console.print(groups_table(answer["groups"], spec.get("group_by", [])))
    else:
        console.print(rows_table(answer["rows"]))
        noun = "row" if len(answer["rows"]) == 1 else "rows"
        console.print(Text(f"{len(answer['rows'])} {noun}", style="dim"))
        if answer.get("next_cursor"):
            console.print(Text(f"more rows follow: add --cursor {answer['next_cursor']}, or --all"))
    if answer.get("partial"):
        missing = ", ".join(str(s) for s in answer.get("missing_shards", []))
        console.print(Text(f"PARTIAL: shards {missing} did not answer", style="bold red"))
    console.print(stats_line(answer))
    if stats:
        for shard in answer.get("stats", {}).get("per_shard", []):
            console.print(Text(json.dumps(shard), style="dim"))
