"""The list-append checker, in the spirit of Elle: transactions of `["append", key, value]` and
`["r", key, [values...]]` micro-ops, values unique per key.

Each key's version order is its longest read (every read must be a prefix of it). Committed
transactions (ok ones, and info ones some read observed) are linked by ww, wr and rw
dependencies, and by real-time order (rt: one completed before the other began); a cycle is an
anomaly, named by its edges as Adya and Elle do: G0 (ww), G1c (ww+wr), G-single (one rw),
G2-item (more rw), each with a `-realtime` variant when it needs an rt edge. Also reported:
G1a (read of a failed append), G1b (read of an intermediate append), lost-update, duplicates,
garbage reads, incompatible orders and internal inconsistency.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jepsen_like.history import History, Operation, time_origin
from jepsen_like.result import CheckResult

CHECKER = "append"
WW, WR, RW, RT = 1, 2, 4, 8
_EDGE_NAMES = {WW: "ww", WR: "wr", RW: "rw", RT: "rt"}
_SAMPLES = 5  # witnesses kept per anomaly type
_CYCLE_SEARCHES = 200  # first edges tried per anomaly type and component


@dataclass(slots=True)
class _Txn:
    number: int
    operation: Operation
    micro_ops: list[list[Any]]
    origin: int | None  # where the history's times start, for witnesses
    # key -> values this txn appended to it, in order
    appends: dict[str, list[Any]] = field(default_factory=dict)
    # key -> what it saw of the key from others (reads minus its own earlier appends)
    external_reads: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"T{self.operation.invoke.index}"


def check_append(history: History | Iterable[Operation], *, realtime: bool = True) -> CheckResult:
    operations = history.pairs() if isinstance(history, History) else list(history)
    origin = time_origin(operations)
    txn_ops = [o for o in operations if o.f == "txn"]
    txns = [_parse(number, operation, origin) for number, operation in enumerate(txn_ops)]
    if not txns:
        return CheckResult(None, CHECKER, {"transactions": 0}, "no transactions to check")
    anomalies: dict[str, list[dict[str, Any]]] = {}  # kind -> a few witnesses
    counts: dict[str, int] = {}

    def report(kind: str, witness: dict[str, Any]) -> None:
        found = anomalies.setdefault(kind, [])
        if len(found) < _SAMPLES:
            found.append(witness)
        counts[kind] = counts.get(kind, 0) + 1

    writer: dict[tuple[str, Any], _Txn] = {}
    for txn in txns:
        for key, values in txn.appends.items():
            for value in values:
                if (key, value) in writer:
                    first = writer[key, value].name
                    raise ValueError(
                        f"value {value!r} is appended to key {key!r} twice ({first} and "
                        f"{txn.name}): the append workload needs unique values per key"
                    )
                writer[key, value] = txn

    ok = [t for t in txns if t.operation.kind == "ok"]
    committed = {t.number for t in ok}
    reads: dict[str, list[tuple[_Txn, list[Any]]]] = {}  # key -> (reader, full list read)
    for txn in ok:
        _internal_reads(txn, report)
        for kind, key, values in txn.micro_ops:
            if kind == "r" and values is not None:
                reads.setdefault(key, []).append((txn, values))

    orders: dict[str, list[Any]] = {}
    for key, observed in reads.items():
        longest_reader, longest = max(observed, key=lambda read: len(read[1]))
        # Reads that are prefixes of the longest hold no element it lacks: check its elements
        # once, and separately only those of a read that is not a prefix.
        unusual = [(longest_reader, longest)]
        for reader, values in observed:
            if values != longest[: len(values)]:
                unusual.append((reader, values))
                pairs = zip(values, longest, strict=False)
                at = next(i for i, (a, b) in enumerate(pairs) if a != b)
                report(
                    "incompatible-order",
                    {
                        "key": key,
                        "by": _txn_record(reader),
                        "longest_by": _txn_record(longest_reader),
                        "position": at,
                        "read_there": values[max(0, at - 2) : at + 3],
                        "longest_there": longest[max(0, at - 2) : at + 3],
                    },
                )
        if len(unusual) == 1:
            orders[key] = longest
        for reader, values in unusual:
            _check_elements(reader, key, values, writer, committed, report)

    _intermediate_and_lost_updates(ok, writer, report)
    graph = _dependencies(txns, committed, orders, writer, realtime)
    _cycles(graph, txns, report, realtime)

    details: dict[str, Any] = {
        "transactions": len(txns),
        "committed": len(committed),
        "ok": len(ok),
        "info_observed": len(committed) - len(ok),
        "keys": len(orders),
        "edges": sum(len(targets) for targets in graph.values()),
        "realtime": realtime,
        "anomaly_counts": counts,
        "anomalies": anomalies,
    }
    if not anomalies:
        summary = f"{len(committed)} committed txns over {len(orders)} keys: no anomalies"
        return CheckResult(True, CHECKER, details, summary)
    details["witness_text"] = _witness_text(anomalies)
    summary = ", ".join(f"{kind} x{counts[kind]}" for kind in sorted(counts))
    return CheckResult(False, CHECKER, details, summary)


def _parse(number: int, operation: Operation, origin: int | None) -> _Txn:
    # Reads are known only from an ok completion; appends are the invocation's.
    source = operation.output if operation.kind == "ok" else operation.input
    if not isinstance(source, list):
        raise ValueError(f"op #{operation.invoke.index}: a txn's value must be a list of micro-ops")
    micro_ops: list[list[Any]] = []
    for micro in source:
        if not (isinstance(micro, list) and len(micro) == 3 and micro[0] in ("append", "r")):
            raise ValueError(
                f"op #{operation.invoke.index}: micro-op {micro!r} is not "
                '["append", key, value] or ["r", key, values]'
            )
        if micro[0] == "r" and micro[2] is not None and not isinstance(micro[2], list):
            raise ValueError(f"op #{operation.invoke.index}: read {micro!r} must give a list")
        if micro[0] == "append" and isinstance(micro[2], list | dict):
            raise ValueError(f"op #{operation.invoke.index}: append {micro!r}: values are scalars")
        micro_ops.append(list(micro))
    txn = _Txn(number, operation, micro_ops, origin)
    for kind, key, value in micro_ops:
        if kind == "append":
            txn.appends.setdefault(key, []).append(value)
    return txn


def _check_elements(
    reader: _Txn,
    key: str,
    values: list[Any],
    writer: dict[tuple[str, Any], _Txn],
    committed: set[int],
    report: Any,
) -> None:
    """Duplicates, values nobody appended, values of failed txns; info txns read become
    committed."""
    if any(isinstance(value, list | dict) for value in values):
        raise ValueError(f"{reader.name} read {key!r} as a list of lists: values must be scalars")
    if len(set(values)) != len(values):
        twice = [value for value, n in Counter(values).items() if n > 1]
        report(
            "duplicate-elements",
            {"txn": _txn_record(reader), "key": key, "length": len(values), "twice": twice[:5]},
        )
    for value in values:
        source = writer.get((key, value))
        if source is None:
            report("garbage-read", {"txn": _txn_record(reader), "key": key, "value": value})
        elif source.operation.kind == "fail":
            report(
                "G1a",
                {
                    "reader": _txn_record(reader),
                    "writer": _txn_record(source),
                    "key": key,
                    "value": value,
                },
            )
        elif source.operation.kind == "info":
            committed.add(source.number)


def _internal_reads(txn: _Txn, report: Any) -> None:
    """Work out what the txn saw of each key from others, and check it saw its own appends."""
    own: dict[str, list[Any]] = {}
    for kind, key, value in txn.micro_ops:
        if kind == "append":
            own.setdefault(key, []).append(value)
            continue
        if value is None:
            continue
        mine = own.get(key, [])
        if mine and value[-len(mine) :] != mine:
            report(
                "internal",
                {
                    "txn": _txn_record(txn),
                    "key": key,
                    "read_ending": value[-len(mine) - 2 :],
                    "expected_ending": mine,
                },
            )
            continue
        external = value[: len(value) - len(mine)]
        earlier = txn.external_reads.setdefault(key, external)
        if earlier != external:
            report(
                "internal",
                {
                    "txn": _txn_record(txn),
                    "key": key,
                    "read_length": len(external),
                    "earlier_read_length": len(earlier),
                },
            )


def _intermediate_and_lost_updates(ok: list[_Txn], writer: dict[Any, _Txn], report: Any) -> None:
    read_then_appended: dict[tuple[str, tuple[Any, ...]], list[_Txn]] = {}
    for txn in ok:
        for key, external in txn.external_reads.items():
            source = writer.get((key, external[-1])) if external else None
            if source is not None and source is not txn and source.appends[key][-1] != external[-1]:
                report(
                    "G1b",
                    {
                        "reader": _txn_record(txn),
                        "writer": _txn_record(source),
                        "key": key,
                        "value": external[-1],
                    },
                )
            if key in txn.appends:
                read_then_appended.setdefault((key, tuple(external)), []).append(txn)
    for (key, version), group in read_then_appended.items():
        if len(group) > 1:
            report(
                "lost-update",
                {
                    "key": key,
                    "read_length": len(version),
                    "read_ending": list(version[-3:]),
                    "txns": [_txn_record(t) for t in group],
                },
            )


def _dependencies(
    txns: list[_Txn],
    committed: set[int],
    orders: dict[str, list[Any]],
    writer: dict[tuple[str, Any], _Txn],
    realtime: bool,
) -> dict[int, dict[int, int]]:
    """Edges between committed txns: graph[a][b] is a bitmask of WW, WR, RW, RT."""
    graph: dict[int, dict[int, int]] = {number: {} for number in committed}

    def link(a: _Txn | None, b: _Txn | None, kind: int) -> None:
        if a is None or b is None:
            return  # a value nobody appended: reported as a garbage read
        if a is not b and a.number in committed and b.number in committed:
            graph[a.number][b.number] = graph[a.number].get(b.number, 0) | kind

    for key, order in orders.items():
        writers = [writer.get((key, value)) for value in order]
        for a, b in itertools.pairwise(writers):
            link(a, b, WW)
    for txn in txns:
        if txn.number not in committed:
            continue
        for key, external in txn.external_reads.items():
            if key not in orders:
                continue
            order = orders[key]
            if external:
                link(writer.get((key, external[-1])), txn, WR)
            if len(external) < len(order):
                link(txn, writer.get((key, order[len(external)])), RW)
    if realtime:
        _realtime_edges(txns, committed, link)
    return graph


def _realtime_edges(txns: list[_Txn], committed: set[int], link: Any) -> None:
    """a -> b when a completed before b was invoked, transitively reduced: each txn links
    from the completed txns that no other completed-before-it txn follows."""
    events: list[tuple[int, int, int]] = []  # (time, 0 complete | 1 invoke, txn)
    for txn in txns:
        if txn.number not in committed:
            continue
        events.append((txn.operation.invoke_ns, 1, txn.number))
        complete_ns = txn.operation.complete_ns
        if txn.operation.kind == "ok" and complete_ns is not None:
            events.append((complete_ns, 0, txn.number))
    events.sort(key=lambda event: (event[0], -event[1]))  # equal times: concurrent, no edge
    frontier: set[int] = set()
    predecessors: dict[int, list[int]] = {}
    for _, is_invoke, number in events:
        if is_invoke:
            predecessors[number] = list(frontier)
            for before in frontier:
                link(txns[before], txns[number], RT)
        else:
            frontier.difference_update(predecessors.get(number, ()))
            frontier.add(number)


def _cycles(
    graph: dict[int, dict[int, int]], txns: list[_Txn], report: Any, realtime: bool
) -> None:
    plain = WW | WR | RW
    searches: list[tuple[str, int, int, int]] = [
        # (anomaly, the first edge must be of this kind and no weaker one, the rest of the cycle)
        ("G0", WW, 0, WW),
        ("G1c", WR, WW, WW | WR),
        ("G-single", RW, WW | WR, WW | WR),
        ("G2-item", RW, WW | WR, plain),
    ]
    if realtime:
        searches.append(("realtime", RT, plain, plain | RT))
    for anomaly, first, weaker, rest in searches:
        for component in _components(graph, first | rest):
            cycle = _shortest_cycle(graph, component, first, weaker, rest)
            if cycle is None:
                continue
            kinds = [kind for _, kind in cycle]
            name = anomaly
            if anomaly == "G2-item" and kinds.count(RW) == 1:
                continue  # a G-single, already reported
            if anomaly == "realtime":
                rw, wr = kinds.count(RW), kinds.count(WR)
                base = "G0" if rw == wr == 0 else "G1c" if rw == 0 else "G-single"
                name = f"{'G2-item' if rw > 1 else base}-realtime"
            report(name, {"cycle": [_step(txns[a], kind) for a, kind in cycle]})


def _components(graph: dict[int, dict[int, int]], allowed: int) -> list[set[int]]:
    """Strongly connected components (Tarjan, iterative) with more than one txn."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    found: list[set[int]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root].items()))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor, kinds in successors:
                if not kinds & allowed:
                    continue
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(graph[successor].items())))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _shortest_cycle(
    graph: dict[int, dict[int, int]], component: set[int], first: int, weaker: int, rest: int
) -> list[tuple[int, int]] | None:
    """The shortest cycle found that starts with an edge of kind `first` (and of no kind in
    `weaker`) and continues over kinds in `rest`, inside one component; [(txn, edge kind)]."""
    best: list[tuple[int, int]] | None = None
    tried = 0
    for a in component:
        for b, kinds in graph[a].items():
            if b not in component or not kinds & first or kinds & weaker:
                continue
            tried += 1
            path = _path(graph, component, b, a, rest)
            if path is not None and (best is None or len(path) + 1 < len(best)):
                best = [(a, first), *path]
            if tried >= _CYCLE_SEARCHES:
                return best
    return best


def _path(
    graph: dict[int, dict[int, int]], component: set[int], start: int, goal: int, allowed: int
) -> list[tuple[int, int]] | None:
    """Breadth-first: the shortest path start -> goal as [(txn, kind of its outgoing edge)]."""
    parents: dict[int, tuple[int, int]] = {start: (start, 0)}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            steps: list[tuple[int, int]] = []
            while node != start:
                previous, kind = parents[node]
                steps.append((previous, kind))
                node = previous
            return steps[::-1]
        for successor, kinds in graph[node].items():
            usable = kinds & allowed
            if usable and successor in component and successor not in parents:
                parents[successor] = (node, usable & -usable)  # the weakest kind of the edge
                queue.append(successor)
    return None


def _txn_record(txn: _Txn) -> dict[str, Any]:
    text = txn.operation.describe(txn.origin)
    return {"txn": txn.name, "index": txn.operation.invoke.index, "text": text}


def _step(txn: _Txn, kind: int) -> dict[str, Any]:
    return {**_txn_record(txn), "edge": _EDGE_NAMES[kind]}


def _witness_text(anomalies: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for kind, witnesses in sorted(anomalies.items()):
        witness = witnesses[0]
        if "cycle" in witness:
            cycle = witness["cycle"]
            names = " ".join(f"{step['txn']} -{step['edge']}->" for step in cycle)
            lines.append(f"{kind}: {names} {cycle[0]['txn']}")
            lines += [f"  {step['txn']}: {step['text']}" for step in cycle]
        else:
            lines.append(f"{kind}: {_plain(witness)}")
    return "\n".join(lines)


def _plain(witness: dict[str, Any]) -> str:
    parts = []
    for name, value in witness.items():
        if isinstance(value, dict) and "text" in value:
            parts.append(f"{name} {value['text']}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            parts.append(f"{name} " + " / ".join(v.get("text", str(v)) for v in value))
        else:
            parts.append(f"{name} {value!r}")
    return "; ".join(parts)
