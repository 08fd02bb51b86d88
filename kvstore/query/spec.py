"""The query a client sends to POST /v1/query: frozen dataclasses and a strict parser.

parse_query turns a decoded JSON document into a QuerySpec or raises InvalidRequest naming the
exact place and problem ("where[2].op: unknown operator '=~'; use one of ..."). Pure: no I/O.
A QuerySpec crosses the wire to shards as its canonical JSON (to_json), parsed again there.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from kvstore.errors import InvalidRequest
from kvstore.query.documents import KEY_FIELD, json_type_name, split_field
from kvstore.service import Consistency

if TYPE_CHECKING:
    from kvstore.query.plugins import PluginRegistry


class Op(enum.Enum):
    EQ = "=="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    IN = "in"
    EXISTS = "exists"
    PREFIX = "prefix"


ORDERING_OPS: Final = frozenset({Op.LT, Op.LE, Op.GT, Op.GE})


class AggregateFn(enum.Enum):
    COUNT = "count"
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    AVG = "avg"
    COUNT_DISTINCT = "count_distinct"
    TOP_K = "top_k"
    PLUGIN = "plugin"  # a server-side map/reduce installed as a plugin, named by `plugin`


@dataclass(frozen=True, slots=True)
class QueryLimits:
    """Operator-set bounds on what one query may ask; a query past one is InvalidRequest."""

    max_predicates: int = 32
    max_in_values: int = 1000
    max_literal_bytes: int = 4096  # a predicate value, as compact JSON
    max_field_depth: int = 8  # segments in a dotted path
    max_field_bytes: int = 256
    max_select_fields: int = 64
    max_group_by_fields: int = 8
    max_aggregates: int = 32
    max_key_bytes: int = 4096  # prefix, start, end
    default_limit: int = 1000
    max_limit: int = 10_000
    max_cursor_bytes: int = 8192
    max_groups: int = 10_000  # per shard and after merging
    max_top_k: int = 1000
    max_top_k_capacity: int = 100_000
    default_distinct_threshold: int = 10_000
    max_distinct_threshold: int = 1_000_000

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {value!r}")
        if self.default_limit > self.max_limit:
            raise ValueError("limits.default_limit must not exceed limits.max_limit")
        if self.default_distinct_threshold > self.max_distinct_threshold:
            raise ValueError("limits.default_distinct_threshold must not exceed its maximum")


DEFAULT_LIMITS: Final = QueryLimits()


@dataclass(frozen=True, slots=True)
class Predicate:
    field: str  # a dotted path into the document, or "$key"
    op: Op
    value: Any = None  # exists: bool (True: present); in: tuple of scalars; prefix: str


@dataclass(frozen=True, slots=True)
class Aggregate:
    fn: AggregateFn
    field: str | None = None  # required except for count (None: count rows) and plugin
    k: int | None = None  # top_k only: how many values to return
    capacity: int | None = None  # top_k only: counters kept per group (Misra-Gries summary)
    plugin: str | None = None  # plugin only: the installed plugin's name


Select = tuple[str, ...] | Literal["*"]


@dataclass(frozen=True, slots=True)
class QuerySpec:
    # Invariant: exactly one of `select` and `aggregates` is set; group_by only with aggregates.
    prefix: str | None = None  # exclusive with start/end
    start: str | None = None  # inclusive
    end: str | None = None  # exclusive
    where: tuple[Predicate, ...] = ()
    select: Select | None = None
    group_by: tuple[str, ...] = ()
    aggregates: Mapping[str, Aggregate] = field(default_factory=lambda: types.MappingProxyType({}))
    limit: int = DEFAULT_LIMITS.default_limit  # select only: rows per page
    cursor: str | None = None  # select only: next_cursor of the previous page
    consistency: Consistency = Consistency.LINEARIZABLE
    allow_partial: bool = False  # answer without the shards that did not answer
    approximate_distinct_threshold: int = DEFAULT_LIMITS.default_distinct_threshold

    def __post_init__(self) -> None:
        if (self.select is None) == (not self.aggregates):
            raise ValueError("a QuerySpec has either select or aggregates")
        if self.group_by and self.select is not None:
            raise ValueError("group_by needs aggregates, not select")

    @property
    def is_select(self) -> bool:
        return self.select is not None

    @property
    def key_prefix(self) -> str:
        """The longest prefix every key the query can see shares: what a caller must be allowed
        to read. A start/end range shares the common prefix of its bounds ("" if unbounded)."""
        if self.prefix is not None:
            return self.prefix
        if self.start is None or self.end is None:
            return ""
        shared = 0
        for a, b in zip(self.start, self.end, strict=False):
            if a != b:
                break
            shared += 1
        return self.start[:shared]

    @property
    def after_key(self) -> str | None:
        """The last key of the previous page: this page starts after it."""
        return None if self.cursor is None else decode_cursor(self.cursor)

    def to_json(self) -> dict[str, Any]:
        """The canonical JSON form: parse_query(spec.to_json()) == spec."""
        doc: dict[str, Any] = {}
        for name in ("prefix", "start", "end"):
            if getattr(self, name) is not None:
                doc[name] = getattr(self, name)
        doc["where"] = [_predicate_json(predicate) for predicate in self.where]
        if self.select is not None:
            doc["select"] = self.select if self.select == "*" else list(self.select)
            doc["limit"] = self.limit
            if self.cursor is not None:
                doc["cursor"] = self.cursor
        else:
            doc["group_by"] = list(self.group_by)
            doc["aggregates"] = {
                name: _aggregate_json(aggregate) for name, aggregate in self.aggregates.items()
            }
        doc["consistency"] = self.consistency.value
        doc["allow_partial"] = self.allow_partial
        if self.select is None:
            doc["approximate_distinct_threshold"] = self.approximate_distinct_threshold
        return doc


def _predicate_json(predicate: Predicate) -> dict[str, Any]:
    doc: dict[str, Any] = {"field": predicate.field, "op": predicate.op.value}
    doc["value"] = list(predicate.value) if predicate.op is Op.IN else predicate.value
    return doc


def _aggregate_json(aggregate: Aggregate) -> dict[str, Any]:
    doc: dict[str, Any] = {"fn": aggregate.fn.value}
    for name in ("field", "k", "capacity", "plugin"):
        if getattr(aggregate, name) is not None:
            doc[name] = getattr(aggregate, name)
    return doc


_CURSOR_PREFIX: Final = "q1."


def encode_cursor(key: str) -> str:
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    bad = InvalidRequest("cursor: not one this API returned; pass next_cursor back unchanged")
    if not cursor.startswith(_CURSOR_PREFIX):
        raise bad
    body = cursor[len(_CURSOR_PREFIX) :]
    try:
        padded = body + "=" * (-len(body) % 4)
        key = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    if encode_cursor(key) != cursor:  # only the one spelling we hand out
        raise bad
    return key


# ---- the parser -----------------------------------------------------------------------------

_RANGE: Final = ("prefix", "start", "end")
_SHAPE: Final = ("where", "select", "group_by", "aggregates", "limit", "cursor")
_OPTIONS: Final = ("consistency", "allow_partial", "approximate_distinct_threshold")
_TOP_LEVEL: Final = _RANGE + _SHAPE + _OPTIONS
_OPS_HELP: Final = ", ".join(op.value for op in Op)
_FNS_HELP: Final = ", ".join(fn.value for fn in AggregateFn)
_MAX_NAME_CHARS: Final = 64


def _fail(where: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {problem}")


def _check_fields(doc: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for name in doc:
        if name not in allowed:
            place = f"{where}.{name}" if where else name
            raise _fail(place, f"unknown field; expected one of {', '.join(allowed)}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _fail(where, f"expected an object, got {json_type_name(value)}")
    return value


def _array(value: Any, where: str, max_items: int) -> list[Any]:
    if type(value) is not list:
        raise _fail(where, f"expected an array, got {json_type_name(value)}")
    if len(value) > max_items:
        raise _fail(where, f"{len(value)} items; the limit is {max_items}")
    return value


def _string(value: Any, where: str) -> str:
    if type(value) is not str:
        raise _fail(where, f"expected a string, got {json_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(where, "not valid Unicode (a lone surrogate)") from None
    return value


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        got = value if type(value) is int else json_type_name(value)
        raise _fail(where, f"expected an integer from {low} to {high}, got {got}")
    return value


def _boolean(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise _fail(where, f"expected true or false, got {json_type_name(value)}")
    return value


def _key_bound(value: Any, where: str, limits: QueryLimits) -> str:
    text = _string(value, where)
    if "\x00" in text:
        raise _fail(where, "must not contain NUL (keys never do)")
    if len(text.encode("utf-8")) > limits.max_key_bytes:
        raise _fail(where, f"longer than {limits.max_key_bytes} bytes")
    return text


def _field(value: Any, where: str, limits: QueryLimits) -> str:
    text = _string(value, where)
    if text == KEY_FIELD:
        return text
    if not text:
        raise _fail(where, "empty field path")
    if len(text.encode("utf-8")) > limits.max_field_bytes:
        raise _fail(where, f"field path longer than {limits.max_field_bytes} bytes")
    segments = split_field(text)
    if "" in segments:
        raise _fail(where, f"empty segment in field path {text!r}")
    if len(segments) > limits.max_field_depth:
        raise _fail(
            where,
            f"field path {text!r} is {len(segments)} levels deep; "
            f"the limit is {limits.max_field_depth}",
        )
    if segments[0].startswith("$"):
        raise _fail(where, f"{segments[0]!r} is reserved; the only $-field is {KEY_FIELD}")
    return text


def _json_literal(value: Any, where: str, limits: QueryLimits) -> Any:
    """A JSON value from the request: finite numbers, valid Unicode, bounded size."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        size = len(text.encode("utf-8"))
    except (TypeError, UnicodeEncodeError):  # before ValueError: UnicodeEncodeError is one
        raise _fail(where, "not a JSON value with valid Unicode") from None
    except ValueError:
        raise _fail(where, "NaN and Infinity are not JSON") from None
    if size > limits.max_literal_bytes:
        raise _fail(where, f"{size} bytes as JSON; the limit is {limits.max_literal_bytes}")
    return value


def _number_or_string(value: Any, where: str, op: Op) -> Any:
    if type(value) in (int, float, str):
        return value
    raise _fail(where, f"'{op.value}' compares numbers or strings, got {json_type_name(value)}")


def _predicate(raw: Any, where: str, limits: QueryLimits) -> Predicate:
    doc = _object(raw, where)
    _check_fields(doc, ("field", "op", "value"), where)
    for required in ("field", "op"):
        if required not in doc:
            raise _fail(f"{where}.{required}", "required")
    path = _field(doc["field"], f"{where}.field", limits)
    op_text = _string(doc["op"], f"{where}.op")
    try:
        op = Op(op_text)
    except ValueError:
        raise _fail(
            f"{where}.op", f"unknown operator {op_text!r}; use one of {_OPS_HELP}"
        ) from None
    at = f"{where}.value"
    if op is Op.EXISTS:
        if path == KEY_FIELD:
            raise _fail(where, f"{KEY_FIELD} always exists; drop this predicate")
        return Predicate(path, op, _boolean(doc.get("value", True), at))
    if "value" not in doc:
        raise _fail(at, f"required for '{op.value}'")
    value = _json_literal(doc["value"], at, limits)
    if op is Op.IN:
        items = _array(value, at, limits.max_in_values)
        if not items:
            raise _fail(at, "'in' needs at least one value")
        for index, item in enumerate(items):
            if type(item) in (list, dict):
                raise _fail(f"{at}[{index}]", "'in' takes strings, numbers, booleans or null")
        value = tuple(items)
    elif op is Op.PREFIX:
        _string(value, at)
    elif op in ORDERING_OPS:
        _number_or_string(value, at, op)
    if path == KEY_FIELD:
        scalars = value if op is Op.IN else (value,)
        for item in scalars:
            if type(item) is not str:
                raise _fail(at, f"{KEY_FIELD} is a string; compare it with strings")
    return Predicate(path, op, value)


def _aggregate(
    raw: Any, where: str, limits: QueryLimits, plugins: PluginRegistry | None
) -> Aggregate:
    doc = _object(raw, where)
    _check_fields(doc, ("fn", "field", "k", "capacity", "plugin"), where)
    if "fn" not in doc:
        raise _fail(f"{where}.fn", "required")
    fn_text = _string(doc["fn"], f"{where}.fn")
    try:
        fn = AggregateFn(fn_text)
    except ValueError:
        raise _fail(
            f"{where}.fn", f"unknown function {fn_text!r}; use one of {_FNS_HELP}"
        ) from None
    for name, only in (("k", AggregateFn.TOP_K), ("capacity", AggregateFn.TOP_K)):
        if name in doc and fn is not only:
            raise _fail(f"{where}.{name}", f"only top_k takes {name}")
    if "plugin" in doc and fn is not AggregateFn.PLUGIN:
        raise _fail(f"{where}.plugin", "only fn 'plugin' names a plugin")
    if fn is AggregateFn.PLUGIN:
        if "field" in doc:
            raise _fail(f"{where}.field", "a plugin sees the whole document; remove field")
        if "plugin" not in doc:
            raise _fail(f"{where}.plugin", "required for fn 'plugin'")
        name = _string(doc["plugin"], f"{where}.plugin")
        if plugins is None:
            raise _fail(f"{where}.plugin", f"unknown plugin {name!r}; no plugins are installed")
        plugins.check_installed(name, f"{where}.plugin")
        return Aggregate(fn, plugin=name)
    path = None
    if "field" in doc:
        path = _field(doc["field"], f"{where}.field", limits)
    elif fn is not AggregateFn.COUNT:
        raise _fail(f"{where}.field", f"required for {fn.value}")
    if fn is not AggregateFn.TOP_K:
        return Aggregate(fn, path)
    k = _integer(doc.get("k", 10), f"{where}.k", 1, limits.max_top_k)
    default_capacity = min(max(256, 16 * k), limits.max_top_k_capacity)
    capacity = _integer(
        doc.get("capacity", default_capacity), f"{where}.capacity", k, limits.max_top_k_capacity
    )
    return Aggregate(fn, path, k=k, capacity=capacity)


def _unique_fields(raw: Any, where: str, limits: QueryLimits, max_items: int) -> tuple[str, ...]:
    items = _array(raw, where, max_items)
    fields: list[str] = []
    for index, item in enumerate(items):
        path = _field(item, f"{where}[{index}]", limits)
        if path in fields:
            raise _fail(f"{where}[{index}]", f"{path!r} is listed twice")
        fields.append(path)
    return tuple(fields)


def parse_query(
    doc: Any, limits: QueryLimits = DEFAULT_LIMITS, plugins: PluginRegistry | None = None
) -> QuerySpec:
    """Validate a decoded JSON query strictly; raise InvalidRequest saying what and where."""
    if type(doc) is not dict:
        raise InvalidRequest(f"query: expected a JSON object, got {json_type_name(doc)}")
    _check_fields(doc, _TOP_LEVEL, "")
    bounds = {
        name: _key_bound(doc[name], name, limits)
        for name in ("prefix", "start", "end")
        if name in doc
    }
    if "prefix" in bounds and ("start" in bounds or "end" in bounds):
        raise _fail("prefix", "give either prefix or start/end, not both")
    if "start" in bounds and "end" in bounds and bounds["start"] >= bounds["end"]:
        raise _fail("start", "must sort before end")

    raw_where = _array(doc.get("where", []), "where", limits.max_predicates)
    where = tuple(_predicate(item, f"where[{i}]", limits) for i, item in enumerate(raw_where))

    has_select, has_aggregates = "select" in doc, "aggregates" in doc
    if has_select and has_aggregates:
        raise _fail("query", "select and aggregates are exclusive; give one of them")
    if not has_select and not has_aggregates:
        if "group_by" in doc:
            raise _fail("aggregates", "required with group_by")
        raise _fail("query", "give either select (rows) or aggregates (with optional group_by)")
    select: Select | None = None
    group_by: tuple[str, ...] = ()
    aggregates: dict[str, Aggregate] = {}
    if has_select:
        for name in ("group_by", "approximate_distinct_threshold"):
            if name in doc:
                raise _fail(name, "only with aggregates; a select query returns rows")
        if doc["select"] == "*":
            select = "*"
        else:
            select = _unique_fields(doc["select"], "select", limits, limits.max_select_fields)
            if not select:
                raise _fail("select", 'name at least one field, or "*" for whole values')
            if KEY_FIELD in select:
                raise _fail(f"select[{select.index(KEY_FIELD)}]", "rows always carry their key")
    else:
        for name in ("limit", "cursor"):
            if name in doc:
                raise _fail(name, "only with select; an aggregate query returns every group")
        group_by = _unique_fields(
            doc.get("group_by", []), "group_by", limits, limits.max_group_by_fields
        )
        raw_aggregates = _object(doc["aggregates"], "aggregates")
        if not raw_aggregates:
            raise _fail("aggregates", "name at least one aggregate")
        if len(raw_aggregates) > limits.max_aggregates:
            raise _fail(
                "aggregates", f"{len(raw_aggregates)} items; the limit is {limits.max_aggregates}"
            )
        for name, raw in raw_aggregates.items():
            _string(name, "aggregates")
            if not name or len(name) > _MAX_NAME_CHARS:
                raise _fail("aggregates", f"name {name!r} must be 1 to {_MAX_NAME_CHARS} chars")
            aggregates[name] = _aggregate(raw, f"aggregates.{name}", limits, plugins)

    cursor = None
    if "cursor" in doc:
        cursor = _string(doc["cursor"], "cursor")
        if len(cursor.encode("utf-8")) > limits.max_cursor_bytes:
            raise _fail("cursor", f"longer than {limits.max_cursor_bytes} bytes")
        decode_cursor(cursor)
    consistency_text = _string(doc.get("consistency", "linearizable"), "consistency")
    try:
        consistency = Consistency(consistency_text)
    except ValueError:
        raise _fail(
            "consistency", f"unknown level {consistency_text!r}; use linearizable or stale"
        ) from None
    threshold = _integer(
        doc.get("approximate_distinct_threshold", limits.default_distinct_threshold),
        "approximate_distinct_threshold",
        1,
        limits.max_distinct_threshold,
    )
    return QuerySpec(
        prefix=bounds.get("prefix"),
        start=bounds.get("start"),
        end=bounds.get("end"),
        where=where,
        select=select,
        group_by=group_by,
        aggregates=types.MappingProxyType(aggregates),
        limit=_integer(doc.get("limit", limits.default_limit), "limit", 1, limits.max_limit),
        cursor=cursor,
        consistency=consistency,
        allow_partial=_boolean(doc.get("allow_partial", False), "allow_partial"),
        approximate_distinct_threshold=threshold,
    )


__all__ = [
    "DEFAULT_LIMITS",
    "Aggregate",
    "AggregateFn",
    "Op",
    "Predicate",
    "QueryLimits",
    "QuerySpec",
    "decode_cursor",
    "encode_cursor",
    "parse_query",
]
