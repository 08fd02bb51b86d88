"""Map-reduce queries over the sharded store (POST /v1/query; not wired into the API yet).

spec parses and validates a query; predicates, reducers and plan are the pure execution: a
shard filters and pre-aggregates next to its data (execute_on_rows), the coordinator merges the
partials (merge_partials). plugins loads server-side map/reduce functions. Nothing here does I/O.
"""

from __future__ import annotations

from kvstore.query.plan import (
    Phase,
    ShardPlan,
    decode_partial,
    encode_partial,
    execute_on_rows,
    iter_partials,
    merge_partials,
)
from kvstore.query.plugins import ENTRY_POINT_GROUP, Plugin, PluginLoadError, PluginRegistry
from kvstore.query.results import (
    AggregatesPartial,
    Partial,
    QueryResult,
    QueryStats,
    RowsPartial,
    ShardStats,
)
from kvstore.query.spec import (
    DEFAULT_LIMITS,
    Aggregate,
    AggregateFn,
    Op,
    Predicate,
    QueryLimits,
    QuerySpec,
    parse_query,
)

__all__ = [
    "DEFAULT_LIMITS",
    "ENTRY_POINT_GROUP",
    "Aggregate",
    "AggregateFn",
    "AggregatesPartial",
    "Op",
    "Partial",
    "Phase",
    "Plugin",
    "PluginLoadError",
    "PluginRegistry",
    "Predicate",
    "QueryLimits",
    "QueryResult",
    "QuerySpec",
    "QueryStats",
    "RowsPartial",
    "ShardPlan",
    "ShardStats",
    "decode_partial",
    "encode_partial",
    "execute_on_rows",
    "iter_partials",
    "merge_partials",
    "parse_query",
]
