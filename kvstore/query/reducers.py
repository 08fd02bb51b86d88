"""Mergeable aggregate states: a shard adds values next to its data and ships the states
(to_wire: msgpack-friendly tuples); the coordinator merges them and reads result(). Pure.

Every state is a commutative monoid: merging shard states in any order and grouping gives what
one pass over all the values would, exactly, with two documented exceptions: top_k once a
summary overflows its capacity (then `approximate` with a proven `max_error`), and float sums
that overflow a double (null). Callers pass only present, non-null field values to add().
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Final, Protocol

import xxhash

from kvstore.errors import InvalidRequest
from kvstore.query.documents import canonical_text, from_canonical_text, value_order
from kvstore.query.hll import RELATIVE_ERROR, HyperLogLog

TOO_MANY_GROUPS: Final = "too many groups; narrow the query or raise limits"
_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


class AggregateState(Protocol):
    def add(self, value: Any) -> None: ...
    def merge(self, other: Any) -> None: ...
    def result(self) -> Any: ...
    def to_wire(self) -> tuple[Any, ...]: ...


def _int_to_wire(value: int) -> int | str:
    """msgpack carries 64-bit ints; JSON numbers (and exact sums) may be larger."""
    return value if _INT64_MIN <= value <= _UINT64_MAX else str(value)


def _int_from_wire(wire: Any) -> int:
    if type(wire) is int:
        return wire
    if type(wire) is str:
        return int(wire)
    raise ValueError(f"expected an int on the wire, got {type(wire).__name__}")


def _number_to_wire(value: int | float | None) -> int | str | float | None:
    return _int_to_wire(value) if type(value) is int else value


def _number_from_wire(wire: Any) -> int | float | None:
    return wire if wire is None or type(wire) is float else _int_from_wire(wire)


def _fields(wire: Any, tag: str, size: int) -> Sequence[Any]:
    if not isinstance(wire, list | tuple) or len(wire) != size or wire[0] != tag:
        raise ValueError(f"malformed {tag} state: {wire!r:.200}")
    return wire


class Count:
    """count: rows matched (no field) or rows whose field is present and not null."""

    __slots__ = ("count",)

    def __init__(self, count: int = 0) -> None:
        self.count = count

    def add(self, value: Any) -> None:
        self.count += 1

    def add_rows(self, rows: int) -> None:
        self.count += rows

    def merge(self, other: Count) -> None:
        self.count += other.count

    def result(self) -> int:
        return self.count

    def to_wire(self) -> tuple[Any, ...]:
        return ("count", _int_to_wire(self.count))

    @classmethod
    def from_wire(cls, wire: Any) -> Count:
        return cls(_int_from_wire(_fields(wire, "count", 2)[1]))


class Sum:
    """sum over numbers (booleans are not numbers; others skipped). Integers add exactly; floats
    keep Shewchuk's exact partial sums, so the rounded total does not depend on the order."""

    __slots__ = ("count", "float_partials", "int_total", "seen_float")
    TAG: ClassVar[str] = "sum"

    def __init__(self) -> None:
        self.int_total = 0
        self.float_partials: list[float] = []  # non-overlapping; their exact sum is the floats'
        self.seen_float = False
        self.count = 0  # numbers added

    def add(self, value: Any) -> None:
        kind = type(value)
        if kind is int:
            self.int_total += value
            self.count += 1
        elif kind is float:
            self._add_float(value)
            self.seen_float = True
            self.count += 1

    def add_integers(self, total: int, count: int) -> None:
        """As `count` calls of add() with integers summing to `total` (the scan loop adds
        integers itself, a method call per row being most of a sum's cost)."""
        self.int_total += total
        self.count += count

    def _add_float(self, x: float) -> None:
        partials = self.float_partials  # Shewchuk / Python's msum recipe (as math.fsum)
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            high = x + y
            low = y - (high - x)
            if low:
                partials[i] = low
                i += 1
            x = high
        partials[i:] = [x]

    def merge(self, other: Sum) -> None:
        self.int_total += other.int_total
        for partial in other.float_partials:
            self._add_float(partial)
        self.seen_float = self.seen_float or other.seen_float
        self.count += other.count

    def _float_total(self) -> float | None:
        """The floats' exact sum plus the int total, rounded once each; None past a double."""
        try:
            total = math.fsum([*self.float_partials, float(self.int_total)])
        except (OverflowError, ValueError):
            return None
        return total if math.isfinite(total) else None

    def result(self) -> int | float | None:
        return self._float_total() if self.seen_float else self.int_total

    def to_wire(self) -> tuple[Any, ...]:
        return (
            self.TAG,
            _int_to_wire(self.int_total),
            tuple(self.float_partials),
            self.seen_float,
            _int_to_wire(self.count),
        )

    @classmethod
    def from_wire(cls, wire: Any) -> Sum:
        _, int_total, partials, seen_float, count = _fields(wire, cls.TAG, 5)
        state = cls()
        state.int_total = _int_from_wire(int_total)
        if not all(type(partial) is float for partial in partials):
            raise ValueError(f"malformed {cls.TAG} state: partials must be floats")
        state.float_partials = list(partials)
        state.seen_float = bool(seen_float)
        state.count = _int_from_wire(count)
        return state


class Avg(Sum):
    """avg = sum / count over numbers; null when there were none."""

    __slots__ = ()
    TAG: ClassVar[str] = "avg"

    def result(self) -> float | None:
        if not self.count:
            return None
        if not self.seen_float:
            try:
                return self.int_total / self.count  # correctly rounded, even for huge ints
            except OverflowError:
                return None
        total = self._float_total()
        return None if total is None else total / self.count


class _Extreme:
    """min/max over numbers; strings (by code point) only when the group held no number.
    Booleans, null, arrays and objects are skipped. Equal int and float: the int wins."""

    __slots__ = ("number", "text")
    TAG: ClassVar[str]

    @staticmethod
    def _wins(candidate: Any, best: Any) -> bool:
        raise NotImplementedError

    def __init__(self) -> None:
        self.number: int | float | None = None
        self.text: str | None = None

    def add(self, value: Any) -> None:
        kind = type(value)
        if kind is int or kind is float:
            best = self.number
            if (
                best is None
                or self._wins(value, best)
                or (value == best and kind is int and type(best) is float)
            ):
                self.number = value
        elif kind is str and (self.text is None or self._wins(value, self.text)):
            self.text = value

    def merge(self, other: _Extreme) -> None:
        if other.number is not None:
            self.add(other.number)
        if other.text is not None:
            self.add(other.text)

    def result(self) -> int | float | str | None:
        return self.text if self.number is None else self.number

    def to_wire(self) -> tuple[Any, ...]:
        return (self.TAG, _number_to_wire(self.number), self.text)

    @classmethod
    def from_wire(cls, wire: Any) -> _Extreme:
        _, number, text = _fields(wire, cls.TAG, 3)
        state = cls()
        state.number = _number_from_wire(number)
        if text is not None and type(text) is not str:
            raise ValueError(f"malformed {cls.TAG} state: text must be a string")
        state.text = text
        return state


class Min(_Extreme):
    __slots__ = ()
    TAG: ClassVar[str] = "min"

    @staticmethod
    def _wins(candidate: Any, best: Any) -> bool:
        return bool(candidate < best)


class Max(_Extreme):
    __slots__ = ()
    TAG: ClassVar[str] = "max"

    @staticmethod
    def _wins(candidate: Any, best: Any) -> bool:
        return bool(candidate > best)


def value_hash(value: Any) -> int:
    """xxh64 of the canonical text: equal JSON values (1, 1.0) hash alike."""
    return xxhash.xxh64_intdigest(canonical_text(value).encode())


class CountDistinct:
    """Exact (a set of xxh64 value hashes) up to `threshold` distinct values; past it, a
    HyperLogLog built from the same hashes. Both forms depend only on the set of hashes, so
    shards merged in any order give exactly what one pass would. "Exact" ignores 64-bit hash
    collisions (about n^2 / 2^65: 3e-12 at n = 10,000)."""

    __slots__ = ("hashes", "sketch", "threshold")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        # Invariant: exactly one of hashes and sketch is set.
        self.hashes: set[int] | None = set()
        self.sketch: HyperLogLog | None = None

    def add(self, value: Any) -> None:
        self.add_hash(value_hash(value))

    def add_hash(self, hash64: int) -> None:
        hashes = self.hashes
        if hashes is None:
            self._sketch().add_hash(hash64)
            return
        hashes.add(hash64)
        if len(hashes) > self.threshold:
            self._convert()

    def _sketch(self) -> HyperLogLog:
        if self.sketch is None:
            raise AssertionError("count_distinct holds neither hashes nor a sketch")
        return self.sketch

    def _convert(self) -> None:
        sketch = HyperLogLog()
        for hash64 in self.hashes or ():
            sketch.add_hash(hash64)
        self.hashes, self.sketch = None, sketch

    def merge(self, other: CountDistinct) -> None:
        if other.hashes is not None:
            if self.hashes is not None:
                self.hashes |= other.hashes
                if len(self.hashes) > self.threshold:
                    self._convert()
            else:
                for hash64 in other.hashes:
                    self.add_hash(hash64)
            return
        if self.hashes is not None:
            self._convert()
        self._sketch().merge(other._sketch())

    @property
    def is_approximate(self) -> bool:
        return self.sketch is not None

    def result(self) -> dict[str, Any]:
        if self.hashes is not None:
            return {"value": len(self.hashes), "approximate": False, "relative_error": 0.0}
        value = round(self._sketch().estimate())
        return {"value": value, "approximate": True, "relative_error": RELATIVE_ERROR}

    def to_wire(self) -> tuple[Any, ...]:
        if self.hashes is not None:
            return ("count_distinct", tuple(self.hashes), None)
        return ("count_distinct", None, self._sketch().to_wire())

    @classmethod
    def from_wire(cls, wire: Any, threshold: int) -> CountDistinct:
        _, hashes, registers = _fields(wire, "count_distinct", 3)
        state = cls(threshold)
        if (hashes is None) == (registers is None):
            raise ValueError("malformed count_distinct state: give hashes or registers")
        if hashes is not None:
            if not all(type(h) is int and 0 <= h <= _UINT64_MAX for h in hashes):
                raise ValueError("malformed count_distinct state: hashes are uint64")
            state.hashes = set(hashes)
        else:
            state.hashes, state.sketch = None, HyperLogLog.from_wire(registers)
        return state


class TopK:
    """The k most frequent values, by a Misra-Gries summary of `capacity` counters per group.

    Counters grow to 2 * capacity; then the (capacity + 1)-th largest count is subtracted from
    all and the non-positive ones dropped, and that amount is added to `error`. Merging sums the
    counters and error the same way. Guarantees, with N the values added: every reported count
    is at most `error` below the truth and never above it; error <= N / (capacity + 1); any value
    whose true count exceeds error is in the summary. While error is 0 (at most 2 * capacity
    distinct values were ever held) counts and ranking are exact. Ties rank by value order.

    Strings added are first counted exactly by the string itself (no canonical text per row),
    at most 2 * capacity of them; then they join the summary as a merge of an exact summary,
    which keeps every guarantee above."""

    __slots__ = ("capacity", "counts", "error", "k", "strings")

    def __init__(self, k: int, capacity: int) -> None:
        self.k = k
        self.capacity = capacity
        self.counts: dict[str, int] = {}  # canonical text -> count, a lower bound
        self.error = 0
        self.strings: dict[str, int] = {}  # string value -> exact count, not yet in counts

    def add(self, value: Any) -> None:
        if type(value) is str:
            strings = self.strings
            strings[value] = strings.get(value, 0) + 1
            if len(strings) > self.strings_held:
                self.fold_strings()
            return
        counts = self.counts
        text = canonical_text(value)
        counts[text] = counts.get(text, 0) + 1
        if len(counts) > 2 * self.capacity:
            self._prune()

    @property
    def strings_held(self) -> int:
        """How many distinct strings `strings` holds before they must be folded. The scan loop
        counts strings in `strings` itself (as add does, without the call) and folds past it."""
        return 2 * self.capacity

    def fold_strings(self) -> None:
        counts = self.counts
        for value, n in self.strings.items():
            text = canonical_text(value)
            counts[text] = counts.get(text, 0) + n
        self.strings.clear()  # in place: the scan loop keeps a reference to it
        if len(counts) > 2 * self.capacity:
            self._prune()

    def _summary(self) -> dict[str, int]:
        """The counters, every value added so far in them."""
        if self.strings:
            self.fold_strings()
        return self.counts

    def _prune(self) -> None:
        threshold = heapq.nlargest(self.capacity + 1, self.counts.values())[-1]
        self.counts = {text: n - threshold for text, n in self.counts.items() if n > threshold}
        self.error += threshold

    def merge(self, other: TopK) -> None:
        counts = self._summary()
        for text, n in other._summary().items():
            counts[text] = counts.get(text, 0) + n
        self.error += other.error
        if len(counts) > 2 * self.capacity:
            self._prune()

    def result(self) -> dict[str, Any]:
        counts = self._summary()
        if len(counts) > self.k:
            kth = heapq.nlargest(self.k, counts.values())[-1]
            candidates: Iterable[tuple[str, int]] = (
                item for item in counts.items() if item[1] >= kth
            )
        else:
            candidates = counts.items()
        ranked = sorted(
            ((from_canonical_text(text), n) for text, n in candidates),
            key=lambda item: (-item[1], value_order(item[0])),
        )
        return {
            "items": [{"value": value, "count": n} for value, n in ranked[: self.k]],
            "approximate": self.error > 0,
            "max_error": self.error,
        }

    def to_wire(self) -> tuple[Any, ...]:
        return ("top_k", tuple(self._summary().items()), _int_to_wire(self.error))

    @classmethod
    def from_wire(cls, wire: Any, k: int, capacity: int) -> TopK:
        _, counts, error = _fields(wire, "top_k", 3)
        state = cls(k, capacity)
        for text, n in counts:
            if type(text) is not str or type(n) is not int or n < 1:
                raise ValueError("malformed top_k state: counters are (text, count >= 1)")
            state.counts[text] = n
        state.error = _int_from_wire(error)
        return state


class PluginState:
    """A plugin's partial value: the reduce of every value its map returned (None skipped)."""

    __slots__ = ("has_value", "reduce_fn", "value")

    def __init__(self, reduce_fn: Callable[[Any, Any], Any]) -> None:
        self.reduce_fn = reduce_fn
        self.has_value = False
        self.value: Any = None

    def add(self, value: Any) -> None:
        if self.has_value:
            self.value = self.reduce_fn(self.value, value)
        else:
            self.value, self.has_value = value, True

    def merge(self, other: PluginState) -> None:
        if other.has_value:
            self.add(other.value)

    def result(self) -> Any:
        return self.value

    def to_wire(self) -> tuple[Any, ...]:
        return ("plugin", self.has_value, self.value)

    @classmethod
    def from_wire(cls, wire: Any, reduce_fn: Callable[[Any, Any], Any]) -> PluginState:
        _, has_value, value = _fields(wire, "plugin", 3)
        state = cls(reduce_fn)
        state.has_value, state.value = bool(has_value), value
        return state


GroupKey = tuple[str, ...]  # canonical text of each group_by value; "" = the field is missing
NewStates = Callable[[], list[AggregateState]]
DecodeStates = Callable[[Sequence[Any]], list[AggregateState]]


class GroupedAggregates:
    """One list of states (in the query's aggregate order) per group, at most max_groups."""

    __slots__ = ("groups", "max_groups", "new_states")

    def __init__(self, new_states: NewStates, max_groups: int) -> None:
        self.new_states = new_states
        self.max_groups = max_groups
        self.groups: dict[GroupKey, list[AggregateState]] = {}

    def states_for(self, key: GroupKey) -> list[AggregateState]:
        states = self.groups.get(key)
        if states is None:
            if len(self.groups) >= self.max_groups:
                raise InvalidRequest(f"{TOO_MANY_GROUPS} (max_groups={self.max_groups})")
            states = self.groups[key] = self.new_states()
        return states

    def merge(self, other: GroupedAggregates) -> None:
        for key, theirs in other.groups.items():
            for mine, their_state in zip(self.states_for(key), theirs, strict=True):
                mine.merge(their_state)

    def to_wire(self) -> tuple[Any, ...]:
        return tuple(
            (key, tuple(state.to_wire() for state in states)) for key, states in self.groups.items()
        )

    @classmethod
    def from_wire(
        cls, wire: Any, new_states: NewStates, decode_states: DecodeStates, max_groups: int
    ) -> GroupedAggregates:
        grouped = cls(new_states, max_groups)
        if len(wire) > max_groups:
            raise InvalidRequest(f"{TOO_MANY_GROUPS} (max_groups={max_groups})")
        for key, states in wire:
            if not all(type(text) is str for text in key):
                raise ValueError("malformed group key: canonical texts expected")
            grouped.groups[tuple(key)] = decode_states(states)
        return grouped


__all__ = [
    "TOO_MANY_GROUPS",
    "AggregateState",
    "Avg",
    "Count",
    "CountDistinct",
    "GroupKey",
    "GroupedAggregates",
    "Max",
    "Min",
    "PluginState",
    "Sum",
    "TopK",
    "value_hash",
]
