"""A test's history: every operation's invocation and completion, in the order they happened.

An `Op` is one event; an `Operation` pairs an invocation with its completion (or with nothing:
an operation that never completed is indeterminate, like `info`). Histories are saved as JSON
lines, one event per line. Nothing here knows about the store or about any checker.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("invoke", "ok", "fail", "info")
COMPLETIONS = ("ok", "fail", "info")
_FIELDS = ("process", "kind", "f", "key", "value", "time_ns", "node", "index")


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One event: a client process invoked an operation, or learned how it ended.

    `kind` is "invoke", or the outcome: "ok" (it happened), "fail" (it definitely did not
    happen) or "info" (unknown: it may take effect at any later time, or never). A process whose
    operation ends `info` is never used again, as in Jepsen.
    """

    process: int
    kind: str
    f: str
    key: str | None
    value: Any  # JSON-able: for an invocation its argument, for a completion its result
    time_ns: int  # monotonic; only differences and order matter
    node: int | None = None  # the node the client talked to, if any
    index: int = 0  # position in the history
    error: str | None = None  # why a fail/info ended as it did, for people

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"op #{self.index}: kind must be one of {KINDS}, not {self.kind!r}")
        if not isinstance(self.process, int) or isinstance(self.process, bool):
            raise ValueError(f"op #{self.index}: process must be an int, not {self.process!r}")
        if not isinstance(self.f, str) or not self.f:
            raise ValueError(f"op #{self.index}: f must be a non-empty string, not {self.f!r}")
        if self.key is not None and not isinstance(self.key, str):
            raise ValueError(f"op #{self.index}: key must be a string or null, not {self.key!r}")
        if not isinstance(self.time_ns, int) or isinstance(self.time_ns, bool):
            raise ValueError(f"op #{self.index}: time_ns must be an int, not {self.time_ns!r}")

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        if self.error is not None:
            record["error"] = self.error
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Op:
        missing = [name for name in ("process", "kind", "f", "time_ns") if name not in record]
        if missing:
            raise ValueError(f"history record lacks {', '.join(missing)}: {record!r}")
        return cls(
            process=record["process"],
            kind=record["kind"],
            f=record["f"],
            key=record.get("key"),
            value=record.get("value"),
            time_ns=record["time_ns"],
            node=record.get("node"),
            index=record.get("index", 0),
            error=record.get("error"),
        )


@dataclass(frozen=True, slots=True)
class Operation:
    """An invocation and its completion; `completion` is None if it never completed."""

    invoke: Op
    completion: Op | None

    @property
    def kind(self) -> str:
        """ok, fail or info; an operation that never completed counts as info."""
        return "info" if self.completion is None else self.completion.kind

    @property
    def process(self) -> int:
        return self.invoke.process

    @property
    def f(self) -> str:
        return self.invoke.f

    @property
    def key(self) -> str | None:
        return self.invoke.key

    @property
    def input(self) -> Any:
        """The invocation's argument (a write's value, a cas's [from, to], a txn's micro-ops)."""
        return self.invoke.value

    @property
    def output(self) -> Any:
        """The completion's result (a read's value); None when it never completed."""
        return None if self.completion is None else self.completion.value

    @property
    def invoke_ns(self) -> int:
        return self.invoke.time_ns

    @property
    def complete_ns(self) -> int | None:
        """When the client learned the outcome; None for an operation that never completed."""
        return None if self.completion is None else self.completion.time_ns

    @property
    def node(self) -> int | None:
        return self.invoke.node

    def describe(self, origin_ns: int | None = None) -> str:
        """One line for a person, e.g. `process 3 write 4 on reg/1 -> ok [#12..#15, 1.234567s
        ..1.240001s, node 2]`: op indexes, then times since `origin_ns` if given."""
        shown_in_result = self.kind == "ok" and self.f in _ARGUMENT_IN_RESULT
        argument = "" if self.input is None or shown_in_result else f" {_json(self.input)}"
        key = "" if self.key is None else f" on {self.key}"
        result = self.kind
        if self.kind == "ok" and self.f not in _RESULTLESS:
            result = f"ok {_json(self.output)}"
        end = "…" if self.completion is None else f"#{self.completion.index}"
        where = [f"#{self.invoke.index}..{end}"]
        if origin_ns is not None:
            finish = "…" if self.complete_ns is None else _seconds(self.complete_ns - origin_ns)
            where.append(f"{_seconds(self.invoke_ns - origin_ns)}..{finish}")
        if self.node is not None:
            where.append(f"node {self.node}")
        return f"process {self.process} {self.f}{argument}{key} -> {result} [{', '.join(where)}]"


_RESULTLESS = frozenset({"write", "cas", "add"})  # their ok result says nothing more
_ARGUMENT_IN_RESULT = frozenset({"txn"})  # the completed micro-ops repeat the invoked ones


def _json(value: Any, longest: int = 8) -> str:
    """Compact JSON, with long lists cut in the middle: [1,2,3,…(+95),99,100]."""
    if isinstance(value, list | tuple):
        if len(value) <= longest:
            return "[" + ",".join(_json(item, longest) for item in value) + "]"
        head = [_json(item, longest) for item in value[:3]]
        tail = [_json(item, longest) for item in value[-2:]]
        return "[" + ",".join([*head, f"…(+{len(value) - 5})", *tail]) + "]"
    return json.dumps(value, default=str, separators=(",", ":"))


def _seconds(ns: int) -> str:
    return f"{ns / 1e9:.6f}s"


def time_origin(operations: list[Operation]) -> int | None:
    """Where a witness's times start: the first invocation, or None when the times are not
    a clock's (histories converted from Jepsen logs number their events instead)."""
    if not operations:
        return None
    start = min(o.invoke_ns for o in operations)
    end = max(o.complete_ns or o.invoke_ns for o in operations)
    return start if end - start >= 1_000_000 else None


class History:
    """The events of one test, in the order they were recorded."""

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        self._ops: list[Op] = list(ops)

    def append(self, op: Op) -> None:
        self._ops.append(op)

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self._ops)

    def __getitem__(self, position: int) -> Op:
        return self._ops[position]

    def counts(self) -> dict[str, int]:
        """How many operations ended each way: {"ok": n, "fail": n, "info": n}."""
        return dict(Counter(op.kind for op in self._ops if op.kind != "invoke"))

    def functions(self) -> set[str]:
        """The `f` of every invocation: tells which checkers apply."""
        return {op.f for op in self._ops if op.kind == "invoke"}

    def pairs(self) -> list[Operation]:
        """Every invocation with its completion, in invocation order.

        Raises ValueError on a malformed history: a completion without a pending invocation,
        a second invocation while one is pending, a completion whose f or key differs from its
        invocation, a completion before its invocation, or a process reused after `info`.
        """
        pending: dict[int, int] = {}  # process -> position in `operations`
        retired: dict[int, Op] = {}  # process -> the info completion that retired it
        operations: list[Operation] = []
        for op in self._ops:
            process = op.process
            if process in retired:
                raise ValueError(
                    f"op #{op.index}: process {process} was used again after its operation "
                    f"#{retired[process].index} ended info; an info process must be retired"
                )
            if op.kind == "invoke":
                if process in pending:
                    earlier = operations[pending[process]].invoke
                    raise ValueError(
                        f"op #{op.index}: process {process} invoked {op.f} while its {earlier.f} "
                        f"(op #{earlier.index}) was still pending"
                    )
                pending[process] = len(operations)
                operations.append(Operation(op, None))
                continue
            if process not in pending:
                raise ValueError(
                    f"op #{op.index}: {op.kind} {op.f} by process {process} has no pending "
                    "invocation"
                )
            position = pending.pop(process)
            invoke = operations[position].invoke
            if op.f != invoke.f or op.key != invoke.key:
                raise ValueError(
                    f"op #{op.index}: completion {op.f} {op.key!r} does not match its invocation "
                    f"#{invoke.index} {invoke.f} {invoke.key!r} (process {process})"
                )
            if op.time_ns < invoke.time_ns:
                raise ValueError(
                    f"op #{op.index}: completes at {op.time_ns} ns, before its invocation "
                    f"#{invoke.index} at {invoke.time_ns} ns"
                )
            operations[position] = Operation(invoke, op)
            if op.kind == "info":
                retired[process] = op
        return operations

    def save(self, path: Path | str) -> None:
        """Write one JSON object per line."""
        with Path(path).open("w", encoding="utf-8") as out:
            for op in self._ops:
                out.write(json.dumps(op.to_json(), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> History:
        ops = []
        with Path(path).open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON: {error}") from error
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object")
                try:
                    ops.append(Op.from_json(record))
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: {error}") from error
        return cls(ops)
