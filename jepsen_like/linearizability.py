"""Linearizability, checked per key with the Wing-Gong-Lowe search and memoization (as
Porcupine and Knossos do), against a pure model from `model.py`.

Outcomes: an `ok` operation takes effect once, between its invocation and its completion; a
`fail` one never does (it is dropped); an `info` one may take effect at any time after its
invocation, or never: it has no return event, and the search succeeds once every `ok` operation
is linearized. An `info` read has no effect and is dropped.

P-compositionality: a history is linearizable iff each key's sub-history is, so each key is
searched alone, with its own step budget; running out of budget makes that key `unknown`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from jepsen_like.history import History, Operation, time_origin
from jepsen_like.model import Call, CasRegister, Model, freeze
from jepsen_like.result import CheckResult

CHECKER = "linearizable"
DEFAULT_MAX_STEPS_PER_KEY = 5_000_000  # about 10 s of one core on a pathological key
_PREFIX_SHOWN = 10  # how many of the longest prefix's last operations a witness lists
_CLOCK_EVERY_STEPS = 50_000


@dataclass(frozen=True, slots=True)
class KeyResult:
    key: str | None
    valid: bool | None
    operations: int  # searched (ok and effectful info)
    dropped: int  # fail operations, and info reads
    steps: int
    witness: dict[str, Any] | None = None


def check_linearizable(
    history: History | Iterable[Operation],
    model: Model | None = None,
    *,
    max_steps_per_key: int = DEFAULT_MAX_STEPS_PER_KEY,
    time_limit_s: float | None = None,
) -> CheckResult:
    """Check every key of the history whose operations `model` understands.

    Each key gets at most `max_steps_per_key` search steps (one step = one call tried against
    the model); `time_limit_s` bounds the whole check. Keys left over become unknown.
    """
    if model is None:
        model = CasRegister()
    started = time.monotonic()
    deadline = None if time_limit_s is None else started + time_limit_s
    operations = history.pairs() if isinstance(history, History) else list(history)
    by_key: dict[str | None, list[Operation]] = {}
    for operation in operations:
        if operation.f in model.functions:
            by_key.setdefault(operation.key, []).append(operation)
    origin = time_origin(operations)
    results = [
        search_key(
            key, by_key[key], model, max_steps=max_steps_per_key, deadline=deadline, origin=origin
        )
        for key in sorted(by_key, key=lambda k: (k is not None, str(k)))
    ]
    elapsed_s = time.monotonic() - started
    return _combine(model, results, elapsed_s)


def search_key(
    key: str | None,
    operations: list[Operation],
    model: Model,
    *,
    max_steps: int = DEFAULT_MAX_STEPS_PER_KEY,
    deadline: float | None = None,
    origin: int | None = None,
) -> KeyResult:
    """The WGL search over one key's operations (see the module docstring for outcomes).
    A witness shows times since `origin` (ns), if given."""
    if deadline is not None and time.monotonic() > deadline:
        return KeyResult(key, None, len(operations), 0, 0)
    oks: list[Operation] = []
    infos: list[Operation] = []
    dropped = 0
    for operation in sorted(operations, key=lambda o: (o.invoke_ns, o.invoke.index)):
        kind = operation.kind
        if kind == "fail" or (kind == "info" and operation.f in model.read_only):
            dropped += 1
        else:
            (oks if kind == "ok" else infos).append(operation)
    ok_calls = [Call(o.f, freeze(o.input), freeze(o.output)) for o in oks]
    info_calls = [Call(o.f, freeze(o.input), None) for o in infos]
    needed = model.needed_infos(ok_calls, info_calls)
    dropped += needed.count(False)
    infos = [o for o, keep in zip(infos, needed, strict=True) if keep]
    info_calls = [c for c, keep in zip(info_calls, needed, strict=True) if keep]

    # The ok operations' call and return entries form a doubly linked list in time order
    # (dancing links): entry 2i is ok operation i's call, 2i+1 its return. Linearizing an
    # operation lifts both out; backtracking puts them back.
    count = len(oks)
    head, tail = 2 * count, 2 * count + 1  # tail is odd, so a walk stops there as at a return
    entry_ns: list[float] = [0.0] * (2 * count + 2)
    entry_ns[tail] = math.inf
    events: list[tuple[int, int, int]] = []  # (time, 0 call | 1 return, operation)
    for number, operation in enumerate(oks):
        assert operation.complete_ns is not None
        events.append((operation.invoke_ns, 0, number))
        events.append((operation.complete_ns, 1, number))
    events.sort()  # ties: a call sorts before a return, so equal times count as concurrent
    following = [0] * (2 * count + 2)
    preceding = [0] * (2 * count + 2)
    previous = head
    for time_ns, is_return, number in events:
        entry = 2 * number + is_return
        entry_ns[entry] = time_ns
        following[previous] = entry
        preceding[entry] = previous
        previous = entry
    following[previous] = tail
    preceding[tail] = previous

    # Info operations have no return: once invoked they stay candidates. Identical ones (same
    # call) are interchangeable, so they form a class and are linearized in invocation order:
    # `taken[c]` of class c are linearized, always its earliest-invoked ones.
    class_of: dict[Call, int] = {}
    members: list[list[int]] = []
    for number, call in enumerate(info_calls):
        if call not in class_of:
            class_of[call] = len(members)
            members.append([])
        members[class_of[call]].append(number)
    class_calls = list(class_of)
    members_ns = [[infos[number].invoke_ns for number in group] for group in members]
    taken = [0] * len(members)

    def candidates() -> tuple[list[int], int]:
        """What may be linearized next: every ok operation whose call precedes the first
        pending return, then (as ~class) the next member of each info class invoked by then.
        Trying ok operations first lets the memo prune more configurations with info ones."""
        entry = following[head]
        todo: list[int] = []
        while not entry & 1:
            todo.append(entry >> 1)
            entry = following[entry]
        limit = entry_ns[entry]
        for group, invoked_ns in enumerate(members_ns):
            if invoked_ns[0] > limit:
                break  # classes are ordered by their first invocation
            next_member = taken[group]
            if next_member < len(invoked_ns) and invoked_ns[next_member] <= limit:
                todo.append(~group)
        return todo, entry

    step = model.step
    bit = [1 << number for number in range(max(count, len(infos)))]
    has_info = bool(infos)
    remaining = count
    state: Hashable = model.initial()
    required_bits = 0  # linearized ok operations
    info_bits = 0  # linearized info operations
    # Normal form: an info operation right before an overwrite (or at the end) may as well not
    # happen, so none is followed by one: right after an info operation, no overwrite is tried.
    ok_overwrites = [call.f in model.overwrites for call in ok_calls]
    class_overwrites = [call.f in model.overwrites for call in class_calls]
    after_info = False  # was the last operation linearized an info one?
    # Memo: (required_bits, state, after_info) -> info_bits already explored. A configuration
    # with the same ok operations and state but a superset of linearized info operations can
    # do no more (info operations are optional), nor can one restricted by after_info, so it is
    # pruned; with no info operations this is WGL's cache.
    explored: dict[tuple[int, Hashable, bool], list[int]] = {}
    stack: list[tuple[list[int], int, Hashable, int, int, int]] = []
    todo, stop = candidates()
    position = 0
    steps = 0
    next_clock = _CLOCK_EVERY_STEPS
    Frame = tuple[list[int], int, Hashable, int, int, int]  # (todo, position, state, op, bits)
    best: tuple[list[Frame], int, Hashable, list[int]] | None = None  # see the dead-end code
    best_progress = (-1, 0)

    while remaining:
        advanced = False
        while position < len(todo):
            number = todo[position]
            position += 1
            steps += 1
            if number >= 0:
                if after_info and ok_overwrites[number]:
                    continue
                legal, new_state = step(state, ok_calls[number])
                if not legal:
                    continue
                new_required, new_info = required_bits | bit[number], info_bits
            else:
                if after_info and class_overwrites[~number]:
                    continue
                legal, new_state = step(state, class_calls[~number])
                if not legal:
                    continue
                member = members[~number][taken[~number]]
                new_required, new_info = required_bits, info_bits | bit[member]
            memo_key = (new_required, new_state, number < 0)
            seen = explored.get(memo_key)
            if not has_info:
                if seen is not None:
                    continue  # WGL's cache: this configuration was explored
                explored[memo_key] = [new_info]
            else:
                if _dominated(seen, new_info) or (
                    number < 0 and _dominated(explored.get((*memo_key[:2], False)), new_info)
                ):
                    continue  # this configuration, or one that can do more, was explored
                if seen is None:
                    explored[memo_key] = [new_info]
                else:
                    seen.append(new_info)
            stack.append((todo, position, state, number, required_bits, info_bits))
            after_info = number < 0
            if number >= 0:
                _unlink(following, preceding, 2 * number)
                _unlink(following, preceding, 2 * number + 1)
                remaining -= 1
            else:
                taken[~number] += 1
            state, required_bits, info_bits = new_state, new_required, new_info
            todo, stop = candidates()
            position = 0
            advanced = True
            break
        if steps > max_steps:
            return KeyResult(key, None, count + len(infos), dropped, steps)
        if deadline is not None and steps > next_clock:
            next_clock = steps + _CLOCK_EVERY_STEPS
            if time.monotonic() > deadline:
                return KeyResult(key, None, count + len(infos), dropped, steps)
        if advanced or not remaining:
            continue
        # The witness: the dead end with the most ok operations linearized (then fewest info).
        progress = (count - remaining, count - remaining - len(stack))
        if progress > best_progress:
            best_progress = progress
            best = (stack.copy(), stop >> 1, state, todo)
        if not stack:
            break
        todo, position, state, number, required_bits, info_bits = stack.pop()
        after_info = bool(stack) and stack[-1][3] < 0
        if number >= 0:
            _relink(following, preceding, 2 * number + 1)
            _relink(following, preceding, 2 * number)
            remaining += 1
        else:
            taken[~number] -= 1
    else:
        return KeyResult(key, True, count + len(infos), dropped, steps)
    assert best is not None
    frames, stuck, state, todo = best
    prefix = _linearized(frames, oks, infos, members)
    tried = []
    for number in todo:
        call = ok_calls[number] if number >= 0 else class_calls[~number]
        operation = oks[number] if number >= 0 else infos[members[~number][0]]
        tried.append((operation, model.step(state, call)[0]))
    witness = _witness(key, model, oks[stuck], prefix, state, tried, count + len(infos), origin)
    return KeyResult(key, False, count + len(infos), dropped, steps, witness)


def _linearized(
    stack: list[tuple[list[int], int, Hashable, int, int, int]],
    oks: list[Operation],
    infos: list[Operation],
    members: list[list[int]],
) -> list[Operation]:
    """The operations on the search stack, in the order they were linearized."""
    used = [0] * len(members)
    prefix = []
    for frame in stack:
        number = frame[3]
        if number >= 0:
            prefix.append(oks[number])
        else:
            prefix.append(infos[members[~number][used[~number]]])
            used[~number] += 1
    return prefix


def _dominated(explored: list[int] | None, info_bits: int) -> bool:
    """Was a configuration with a subset of these info operations linearized explored?"""
    return explored is not None and any(not (old & ~info_bits) for old in explored)


def _unlink(following: list[int], preceding: list[int], entry: int) -> None:
    after, before = following[entry], preceding[entry]
    following[before] = after
    preceding[after] = before


def _relink(following: list[int], preceding: list[int], entry: int) -> None:
    following[preceding[entry]] = entry
    preceding[following[entry]] = entry


def _witness(
    key: str | None,
    model: Model,
    stuck: Operation,
    prefix: list[Operation],
    state: Hashable,
    tried: list[tuple[Operation, bool]],
    searched: int,
    origin: int | None,
) -> dict[str, Any]:
    return {
        "key": key,
        "op": _op_record(stuck, origin),
        "linearized_ops": len(prefix),
        "searched_ops": searched,
        "prefix_tail": [_op_record(o, origin) for o in prefix[-_PREFIX_SHOWN:]],
        "state": model.describe(state),
        "concurrent": [
            {
                "op": _op_record(operation, origin),
                "outcome": "legal here, but every order through it was already tried"
                if legal
                else "illegal in this state",
            }
            for operation, legal in tried
        ],
    }


def _op_record(operation: Operation, origin: int | None) -> dict[str, Any]:
    return {
        "index": operation.invoke.index,
        "process": operation.process,
        "f": operation.f,
        "input": operation.input,
        "output": operation.output if operation.kind == "ok" else None,
        "kind": operation.kind,
        "invoke_ns": operation.invoke_ns,
        "complete_ns": operation.complete_ns,
        "node": operation.node,
        "text": operation.describe(origin),
    }


def witness_text(witness: dict[str, Any]) -> str:
    """The witness of a non-linearizable key, for a person."""
    lines = [
        f"key {witness['key']}: this operation cannot be linearized:",
        f"  {witness['op']['text']}",
        f"longest linearizable prefix: {witness['linearized_ops']} of "
        f"{witness['searched_ops']} operations; its last {len(witness['prefix_tail'])}:",
        *(f"  {record['text']}" for record in witness["prefix_tail"]),
        f"state after that prefix: {witness['state']}",
    ]
    if witness["concurrent"]:
        lines.append("operations that could have been linearized next:")
        lines += [f"  {c['op']['text']}: {c['outcome']}" for c in witness["concurrent"]]
    else:
        lines.append("no other operation could have been linearized before it completed")
    return "\n".join(lines)


def _combine(model: Model, results: list[KeyResult], elapsed_s: float) -> CheckResult:
    invalid = [r for r in results if r.valid is False]
    unknown = [r for r in results if r.valid is None]
    operations = sum(r.operations for r in results)
    steps = sum(r.steps for r in results)
    details: dict[str, Any] = {
        "model": model.name,
        "keys": len(results),
        "operations": operations,
        "dropped": sum(r.dropped for r in results),
        "steps": steps,
        "elapsed_s": round(elapsed_s, 3),
        "ops_per_s": round(operations / elapsed_s) if elapsed_s > 0 else None,
        "invalid_keys": [r.key for r in invalid],
        "unknown_keys": [r.key for r in unknown],
    }
    if invalid:
        witness = invalid[0].witness
        assert witness is not None
        details["witness"] = witness
        details["witness_text"] = witness_text(witness)
        op = witness["op"]
        call = " ".join(
            part
            for part in (op["f"], _short(op["input"]), "->", op["kind"], _short(op["output"]))
            if part
        )
        more = f" (and {len(invalid) - 1} more keys)" if len(invalid) > 1 else ""
        summary = (
            f"key {witness['key']}: {call} by process {op['process']} (op #{op['index']}) "
            f"cannot be linearized{more}"
        )
        return CheckResult(False, CHECKER, details, summary)
    if unknown:
        summary = (
            f"search budget exceeded on {len(unknown)} of {len(results)} keys "
            f"({', '.join(str(r.key) for r in unknown[:5])})"
        )
        return CheckResult(None, CHECKER, details, summary)
    if not results:
        return CheckResult(None, CHECKER, details, "no register operations to check")
    summary = f"{operations} ops on {len(results)} keys linearizable ({steps} search steps)"
    return CheckResult(True, CHECKER, details, summary)


def _short(value: Any) -> str:
    return "" if value is None else json.dumps(value, default=str).replace(" ", "")
