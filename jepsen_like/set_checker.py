"""The set checker: clients `add` unique elements, then one final `read_set` reads them all.

Valid iff every acknowledged add that completed before the final read began is in it, and
every element read was attempted by an add that did not fail. Info adds may go either way;
those present are reported as recovered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from typing import Any

from jepsen_like.history import History, Operation, time_origin
from jepsen_like.model import freeze
from jepsen_like.result import CheckResult

CHECKER = "set"
_SAMPLE = 10


def check_set(history: History | Iterable[Operation]) -> CheckResult:
    operations = history.pairs() if isinstance(history, History) else list(history)
    origin = time_origin(operations)
    reads = [o for o in operations if o.f == "read_set" and o.kind == "ok"]
    if not reads:
        return CheckResult(None, CHECKER, {"reason": "no final read"}, "no ok read_set to check")
    final = max(reads, key=lambda o: (o.complete_ns or 0, o.invoke.index))
    if not isinstance(final.output, list):
        raise ValueError(f"op #{final.invoke.index}: read_set must return a list of elements")
    read = [freeze(element) for element in final.output]
    present = set(read)
    duplicates = sorted((e for e, n in Counter(read).items() if n > 1), key=repr)

    by_outcome: dict[str, dict[Hashable, Operation]] = {"ok": {}, "info": {}, "fail": {}}
    must: dict[Hashable, Operation] = {}  # ok adds completed before the final read began
    for operation in operations:
        if operation.f != "add":
            continue
        element = freeze(operation.input)
        by_outcome[operation.kind].setdefault(element, operation)
        complete_ns = operation.complete_ns
        if operation.kind == "ok" and complete_ns is not None and complete_ns < final.invoke_ns:
            must.setdefault(element, operation)
    attempted = set(by_outcome["ok"]) | set(by_outcome["info"])
    lost = sorted((e for e in must if e not in present), key=repr)
    failed_read = sorted(
        (e for e in present if e not in attempted and e in by_outcome["fail"]), key=repr
    )
    unexpected = sorted((e for e in present if e not in attempted), key=repr)
    recovered = sorted(
        (e for e in by_outcome["info"] if e in present and e not in by_outcome["ok"]), key=repr
    )
    valid = not lost and not unexpected and not duplicates
    details: dict[str, Any] = {
        "attempted": len(attempted | set(by_outcome["fail"])),
        "acknowledged": len(by_outcome["ok"]),
        "read": len(read),
        "final_read": _record(origin, final),
        "lost_count": len(lost),
        "lost": [_record(origin, must[e]) for e in lost[:_SAMPLE]],
        "unexpected_count": len(unexpected),
        "unexpected": unexpected[:_SAMPLE],
        "failed_but_read_count": len(failed_read),
        "failed_but_read": [_record(origin, by_outcome["fail"][e]) for e in failed_read[:_SAMPLE]],
        "recovered_count": len(recovered),
        "recovered": recovered[:_SAMPLE],
        "duplicated_count": len(duplicates),
        "duplicated": duplicates[:_SAMPLE],
    }
    if valid:
        summary = (
            f"all {len(must)} acknowledged adds read; {len(recovered)} info adds recovered, "
            f"{len(read)} elements read"
        )
        return CheckResult(True, CHECKER, details, summary)
    problems = []
    if lost:
        problems.append(f"{len(lost)} lost (e.g. {lost[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
    if duplicates:
        problems.append(f"{len(duplicates)} read twice (e.g. {duplicates[0]!r})")
    details["witness_text"] = _witness_text(details)
    return CheckResult(False, CHECKER, details, "; ".join(problems))


def _record(origin: int | None, operation: Operation) -> dict[str, Any]:
    return {"index": operation.invoke.index, "text": operation.describe(origin)}


def _witness_text(details: dict[str, Any]) -> str:
    lines = [f"final read: {details['final_read']['text']}"]
    if details["lost"]:
        lines.append(f"{details['lost_count']} acknowledged adds missing from it, e.g.:")
        lines += [f"  {record['text']}" for record in details["lost"]]
    if details["unexpected"]:
        lines.append(
            f"{details['unexpected_count']} elements read that no add (ok or info) attempted: "
            + ", ".join(map(repr, details["unexpected"]))
        )
        lines += [f"  failed, yet read: {r['text']}" for r in details["failed_but_read"]]
    if details["duplicated"]:
        lines.append("elements read twice: " + ", ".join(map(repr, details["duplicated"])))
    return "\n".join(lines)
