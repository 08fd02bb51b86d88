"""Pure sequential specifications for the linearizability checker: given a state and one call,
is the call's result legal, and what is the next state? No I/O, no clocks, no history here.

States must be hashable (the checker memoizes on them), so values are frozen on the way in.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Call:
    """One operation as a model sees it: its function, argument and (for reads) result."""

    f: str
    argument: Hashable
    result: Hashable


class Model(Protocol):
    """A sequential object, for example one register."""

    @property
    def name(self) -> str: ...

    @property
    def functions(self) -> frozenset[str]:
        """The `f` values this model understands."""
        ...

    @property
    def read_only(self) -> frozenset[str]:
        """Functions with no effect: an operation of one that ended info is dropped."""
        ...

    @property
    def overwrites(self) -> frozenset[str]:
        """Functions legal in every state, whose next state does not depend on the state."""
        ...

    def initial(self) -> Hashable: ...

    def step(self, state: Hashable, call: Call) -> tuple[bool, Hashable]:
        """(is the call legal in `state`, the state after it)."""
        ...

    def describe(self, state: Hashable) -> str:
        """The state, for a person reading a witness."""
        ...

    def needed_infos(self, oks: list[Call], infos: list[Call]) -> list[bool]:
        """For each info call, whether it could be needed: False only if every linearization
        that includes it stays legal without it (the checker then drops it)."""
        ...


def freeze(value: Any) -> Hashable:
    """A hashable copy of a JSON value: lists become tuples, objects sorted tuples of pairs."""
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    result: Hashable = value
    return result


@dataclass(frozen=True, slots=True)
class CasRegister:
    """A register holding a value or nothing (None), as Jepsen's cas-register.

    read -> v     legal iff the register holds v (None: absent)
    write v       always legal; the register then holds v
    cas [a, b]    legal iff the register holds a; it then holds b. A cas whose compare failed
                  is recorded as `fail` and never reaches the model.
    """

    name: str = "cas-register"
    functions: frozenset[str] = frozenset({"read", "write", "cas"})
    read_only: frozenset[str] = frozenset({"read"})
    overwrites: frozenset[str] = frozenset({"write"})

    def initial(self) -> Hashable:
        return None

    def step(self, state: Hashable, call: Call) -> tuple[bool, Hashable]:
        f = call.f
        if f == "read":
            return call.result == state, state
        if f == "write":
            return True, call.argument
        if f == "cas":
            expected, new = _pair(call.argument)
            if state == expected:
                return True, new
            return False, state
        raise ValueError(f"cas-register has no function {f!r} (read, write, cas)")

    def describe(self, state: Hashable) -> str:
        return "absent (nil)" if state is None else repr(state)

    def needed_infos(self, oks: list[Call], infos: list[Call]) -> list[bool]:
        # A value nobody observes (no ok read returns it, no cas expects it) can only be
        # overwritten by a write: an info write or cas that sets it may as well not happen.
        observed = {call.result for call in oks if call.f == "read"}
        observed |= {_pair(call.argument)[0] for call in oks + infos if call.f == "cas"}
        needed = []
        for call in infos:
            if call.f == "write":
                needed.append(call.argument in observed)
            elif call.f == "cas":
                expected, new = _pair(call.argument)
                needed.append(new != expected and new in observed)
            else:
                needed.append(True)
        return needed


def _pair(argument: Hashable) -> tuple[Hashable, Hashable]:
    if not isinstance(argument, tuple) or len(argument) != 2:
        raise ValueError(f"cas takes [from, to], not {argument!r}")
    return argument[0], argument[1]


MODELS: dict[str, Model] = {"cas-register": CasRegister()}
