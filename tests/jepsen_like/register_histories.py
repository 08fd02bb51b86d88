"""Generated register histories for the checker tests: a correct linearizable register under
random concurrent clients, in simulated time, plus small builders for hand-made histories."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from jepsen_like.history import History, Op


class Builder:
    """Hand-made histories: `b.invoke(1, "write", 3); b.ok(1, 3)`; time advances one tick each."""

    def __init__(self, key: str | None = "x") -> None:
        self.history = History()
        self.key = key
        self.now = 0
        self.pending: dict[int, tuple[str, str | None]] = {}

    def _add(self, process: int, kind: str, f: str, key: str | None, value: Any) -> Op:
        self.now += 1
        op = Op(
            process=process,
            kind=kind,
            f=f,
            key=key,
            value=value,
            time_ns=self.now,
            node=None,
            index=len(self.history),
        )
        self.history.append(op)
        return op

    def invoke(self, process: int, f: str, value: Any = None, key: Any = "default") -> Op:
        """`key` defaults to the builder's key; pass None for operations without a key."""
        key = self.key if key == "default" else key
        self.pending[process] = (f, key)
        return self._add(process, "invoke", f, key, value)

    def complete(self, process: int, kind: str, value: Any = None) -> Op:
        f, key = self.pending.pop(process)
        return self._add(process, kind, f, key, value)

    def ok(self, process: int, value: Any = None) -> Op:
        return self.complete(process, "ok", value)

    def fail(self, process: int, value: Any = None) -> Op:
        return self.complete(process, "fail", value)

    def info(self, process: int, value: Any = None) -> Op:
        return self.complete(process, "info", value)

    def op(self, process: int, f: str, value: Any = None, result: Any = None, kind: str = "ok"):
        """A whole operation, alone in time."""
        self.invoke(process, f, value)
        return self.complete(process, kind, result if f == "read" else value)


@dataclass
class _Planned:
    process: int
    key: str
    f: str
    argument: Any
    invoke: int
    complete: int
    effect_at: int | None  # when it takes effect; None: never (fail, or an info that did not)
    kind: str  # ok / fail / info (decided before the outcome of a cas is known)
    result: Any = None


def linearizable_history(
    seed: int,
    *,
    processes: int = 10,
    keys: int = 20,
    ops: int = 2000,
    info_rate: float = 0.02,
    fail_rate: float = 0.02,
    values: int = 5,
    unique_values: bool = False,
) -> History:
    """A history of a correct register per key: each operation takes effect at one instant
    inside its interval (an info one possibly after it, or never), and reads return the state
    then. `unique_values` makes every written value distinct (for stale-read mutations)."""
    rng = random.Random(seed)
    plans: list[_Planned] = []
    next_value = 0
    process_ids = list(range(processes))
    next_process = processes
    free_at = [0] * processes
    for _ in range(ops):
        slot = rng.randrange(processes)
        invoke = free_at[slot] + rng.randint(1, 5)
        complete = invoke + rng.randint(1, 30)
        roll = rng.random()
        key = f"k{rng.randrange(keys)}"
        if roll < 0.5:
            f, argument = "read", None
        elif roll < 0.8:
            next_value += 1
            f, argument = "write", next_value if unique_values else rng.randrange(values)
        else:
            next_value += 1
            to = next_value if unique_values else rng.randrange(values)
            f, argument = "cas", [rng.randrange(values), to]
        outcome = rng.random()
        if outcome < info_rate:
            kind = "info"
            effect_at = invoke + rng.randint(0, 200) if rng.random() < 0.6 else None
        elif outcome < info_rate + fail_rate:
            kind, effect_at = "fail", None
        else:
            kind, effect_at = "ok", rng.randint(invoke, complete)
        plans.append(
            _Planned(process_ids[slot], key, f, argument, invoke, complete, effect_at, kind)
        )
        free_at[slot] = complete
        if kind == "info":
            process_ids[slot] = next_process
            next_process += 1
    state: dict[str, Any] = {}
    for plan in sorted((p for p in plans if p.effect_at is not None), key=_effect_order):
        current = state.get(plan.key)
        if plan.f == "read":
            plan.result = current
        elif plan.f == "write":
            state[plan.key] = plan.argument
        elif current == plan.argument[0]:
            state[plan.key] = plan.argument[1]
        elif plan.kind == "ok":
            plan.kind = "fail"  # the compare failed: the store reports it did not happen
    # At equal simulated times invocations go first: such operations overlap, which is true
    # of the simulation (each effect lies inside its own interval). Times become positions.
    events: list[tuple[int, int, int, Op]] = []
    for number, plan in enumerate(plans):
        events.append((plan.invoke, 0, number, _op(plan, "invoke", plan.argument)))
        done = plan.result if plan.f == "read" else plan.argument
        events.append((plan.complete, 1, number, _op(plan, plan.kind, done)))
    events.sort(key=lambda event: event[:3])
    history = History()
    for position, (_, _, _, op) in enumerate(events):
        history.append(
            Op(
                process=op.process,
                kind=op.kind,
                f=op.f,
                key=op.key,
                value=op.value if op.kind == "ok" or op.kind == "invoke" else None,
                time_ns=(position + 1) * 1000,
                node=op.node,
                index=position,
            )
        )
    return history


def _effect_order(plan: _Planned) -> tuple[int, int]:
    return (plan.effect_at or 0, plan.invoke)


def _op(plan: _Planned, kind: str, value: Any) -> Op:
    return Op(
        process=plan.process,
        kind=kind,
        f=plan.f,
        key=plan.key,
        value=value,
        time_ns=0,
        node=plan.process % 3 + 1,
    )
