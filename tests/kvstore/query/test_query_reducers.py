"""Aggregate states: results, merge laws (any split, any order = one pass), wire round trips,
HyperLogLog accuracy and the top_k (Misra-Gries) guarantees."""

from __future__ import annotations

import math
import random
from collections import Counter

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import InvalidRequest
from kvstore.query.documents import canonical_text, from_canonical_text, value_order
from kvstore.query.hll import REGISTERS, RELATIVE_ERROR, HyperLogLog
from kvstore.query.reducers import (
    Avg,
    Count,
    CountDistinct,
    GroupedAggregates,
    Max,
    Min,
    PluginState,
    Sum,
    TopK,
    value_hash,
)


def through_msgpack(wire, use_list=False):
    return msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False, use_list=use_list)


def fed(state, values):
    for value in values:
        state.add(value)
    return state


def split_and_merge(make, values, rng, decode):
    """Feed values to random parts, ship each over msgpack, merge in a random order."""
    parts = [make() for _ in range(rng.randint(1, 4))]
    for value in values:
        rng.choice(parts).add(value)
    rng.shuffle(parts)
    total = make()
    for part in parts:
        total.merge(decode(through_msgpack(part.to_wire(), use_list=rng.random() < 0.5)))
    return total


NUMBERS = st.integers(-(10**20), 10**20) | st.floats(
    min_value=-1e200, max_value=1e200, allow_nan=False, allow_infinity=False
)
MIXED = NUMBERS | st.sampled_from(["a", "b", "", True, False, [1], {"x": 1}])


def test_count_counts_every_add_and_merges_by_adding():
    count = fed(Count(), [1, None, "x"])
    count.merge(fed(Count(), [1]))
    assert count.result() == 4
    assert Count.from_wire(through_msgpack(count.to_wire())).result() == 4


def test_sum_skips_what_is_not_a_number_and_keeps_ints_exact():
    total = fed(Sum(), [1, True, "2", None, [3], 10**30, -1])
    assert total.result() == 10**30
    assert type(total.result()) is int
    again = Sum.from_wire(through_msgpack(total.to_wire()))  # 10**30 crosses msgpack as text
    assert again.result() == 10**30
    assert fed(Sum(), []).result() == 0
    assert fed(Sum(), [1, 0.5]).result() == 1.5


def test_float_sums_are_exact_until_rounded_once():
    values = [1e100, 1.0, -1e100] * 3
    assert fed(Sum(), values).result() == 3.0  # naive left-to-right addition gives 0.0


def test_a_float_sum_beyond_a_double_is_null():
    assert fed(Sum(), [1e308, 1e308]).result() is None
    assert fed(Sum(), [10**400, 0.5]).result() is None
    assert fed(Avg(), [10**400, 0.5]).result() is None
    assert fed(Avg(), [10**400]).result() is None


@settings(max_examples=200, deadline=None)
@given(values=st.lists(MIXED, max_size=30), seed=st.integers(0, 2**32))
def test_sum_and_avg_of_any_split_equal_one_pass(values, seed):
    rng = random.Random(seed)
    numbers = [v for v in values if type(v) in (int, float)]
    ints = [v for v in numbers if type(v) is int]
    floats = [v for v in numbers if type(v) is float]
    expected = math.fsum([*floats, float(sum(ints))]) if floats else sum(ints)
    merged = split_and_merge(Sum, values, rng, Sum.from_wire)
    assert merged.result() == expected == fed(Sum(), values).result()
    average = split_and_merge(Avg, values, rng, Avg.from_wire).result()
    if not numbers:
        assert average is None
    else:
        assert average == expected / len(numbers)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(MIXED, max_size=30), seed=st.integers(0, 2**32))
def test_min_and_max_prefer_numbers_then_strings_and_ints_on_ties(values, seed):
    rng = random.Random(seed)
    numbers = [v for v in values if type(v) in (int, float)]
    strings = [v for v in values if type(v) is str]
    if numbers:
        low = min(numbers, key=lambda v: (v, type(v) is float))
        high = max(numbers, key=lambda v: (v, type(v) is int))
    else:
        low, high = min(strings, default=None), max(strings, default=None)
    got_low = split_and_merge(Min, values, rng, Min.from_wire).result()
    got_high = split_and_merge(Max, values, rng, Max.from_wire).result()
    assert got_low == low
    assert type(got_low) is type(low)
    assert got_high == high
    assert type(got_high) is type(high)


def test_min_and_max_keep_huge_ints_over_the_wire():
    state = fed(Max(), [10**25, 3.5, "z"])
    assert Max.from_wire(through_msgpack(state.to_wire())).result() == 10**25


def test_count_distinct_is_exact_up_to_its_threshold():
    state = fed(CountDistinct(threshold=5), [1, 1.0, "1", True, 1, [1], {"a": 1}, "1"])
    assert state.result() == {"value": 5, "approximate": False, "relative_error": 0.0}
    state.add("one more")
    result = state.result()
    assert result["approximate"] is True
    assert result["relative_error"] == RELATIVE_ERROR == pytest.approx(0.008125)
    assert result["value"] == 6  # linear counting is near exact for a handful of values


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.integers(0, 40) | st.sampled_from(["a", "b", 2.5]), max_size=60),
    threshold=st.integers(1, 30),
    seed=st.integers(0, 2**32),
)
def test_count_distinct_of_any_split_equals_one_pass_exactly(values, threshold, seed):
    rng = random.Random(seed)
    one_pass = fed(CountDistinct(threshold), values)
    merged = split_and_merge(
        lambda: CountDistinct(threshold),
        values,
        rng,
        lambda wire: CountDistinct.from_wire(wire, threshold),
    )
    assert merged.result() == one_pass.result()
    distinct = len({canonical_text(v) for v in values})
    assert merged.is_approximate == (distinct > threshold)
    if not merged.is_approximate:
        assert merged.result()["value"] == distinct


def test_hyperloglog_is_within_three_standard_errors_on_100k_distinct_values():
    sketch = HyperLogLog()
    for i in range(100_000):
        sketch.add_hash(value_hash(f"user-{i}"))
    estimate = sketch.estimate()
    assert abs(estimate - 100_000) <= 3 * RELATIVE_ERROR * 100_000, estimate


def test_hyperloglog_uses_linear_counting_for_small_sets():
    assert HyperLogLog().estimate() == 0.0
    sketch = HyperLogLog()
    for i in range(2000):
        sketch.add_hash(value_hash(i))
    assert abs(sketch.estimate() - 2000) <= 3 * RELATIVE_ERROR * 2000


def test_the_merge_of_two_hyperloglogs_is_the_hyperloglog_of_the_union():
    left, right, union = HyperLogLog(), HyperLogLog(), HyperLogLog()
    for i in range(30_000):
        hash64 = value_hash(i)
        (left if i % 3 else right).add_hash(hash64)
        if i >= 20_000:
            right.add_hash(hash64)  # an overlap
        union.add_hash(hash64)
    left.merge(right)
    assert left == union
    assert left.estimate() == union.estimate()
    assert HyperLogLog.from_wire(through_msgpack(left.to_wire())) == union


def test_hyperloglog_rejects_bad_registers():
    with pytest.raises(ValueError, match="16384 registers"):
        HyperLogLog(b"\x00" * 10)
    with pytest.raises(ValueError, match="must be bytes"):
        HyperLogLog.from_wire("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="never exceeds 51"):
        HyperLogLog.from_wire(b"\x34" * REGISTERS)


def expected_top(counter, k):
    ranked = sorted(counter.items(), key=lambda item: (-item[1], value_order(item[0])))
    return [{"value": value, "count": n} for value, n in ranked[:k]]


def test_top_k_is_exact_while_it_holds_every_value():
    state = fed(TopK(k=2, capacity=4), ["b", "a", "b", 1, "a", 1.0, True, "c"])
    assert state.result() == {
        "items": [{"value": 1, "count": 2}, {"value": "a", "count": 2}],
        "approximate": False,
        "max_error": 0,
    }


@settings(max_examples=300, deadline=None)
@given(
    # strings are counted exactly first, then folded into the summary: both paths, mixed
    values=st.lists(st.integers(0, 12) | st.integers(0, 12).map(str), max_size=120),
    k=st.integers(1, 4),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**32),
)
def test_top_k_of_any_split_keeps_the_misra_gries_guarantees(values, k, extra, seed):
    rng = random.Random(seed)
    capacity = k + extra
    truth = Counter(values)
    merged = split_and_merge(
        lambda: TopK(k, capacity), values, rng, lambda wire: TopK.from_wire(wire, k, capacity)
    )
    result = merged.result()
    error = result["max_error"]
    assert result["approximate"] == (error > 0)
    assert error <= len(values) / (capacity + 1)
    if not result["approximate"]:
        assert result["items"] == expected_top(truth, k)
        return
    items = result["items"]
    for item in items:  # never over, at most `error` under
        assert truth[item["value"]] - error <= item["count"] <= truth[item["value"]]
    for value, n in merged.counts.items():
        assert 0 < n <= truth[from_canonical_text(value)]
    kth = items[-1]["count"] if len(items) == k else 0
    reported = {item["value"] for item in items}
    for value, n in truth.items():  # a value clearly above the k-th is never left out
        if n > kth + error:
            assert value in reported


def test_plugin_state_reduces_what_map_returned():
    state = fed(PluginState(lambda a, b: a + b), [1, 2, 3])
    other = PluginState(lambda a, b: a + b)
    state.merge(other)  # an empty partial changes nothing
    assert state.result() == 6
    again = PluginState.from_wire(through_msgpack(state.to_wire()), lambda a, b: a + b)
    assert again.result() == 6
    assert PluginState(max).result() is None


def new_states():
    return [Count(), Sum()]


def decode_states(wires):
    return [Count.from_wire(wires[0]), Sum.from_wire(wires[1])]


def test_grouped_aggregates_merge_by_group_and_round_trip():
    left, right = GroupedAggregates(new_states, 10), GroupedAggregates(new_states, 10)
    for group, value in (("a", 1), ("b", 2), ("a", 3)):
        for state in left.states_for((group,)):
            state.add(value)
    for state in right.states_for(("a",)):
        state.add(10)
    left.merge(right)
    assert {key: [s.result() for s in states] for key, states in left.groups.items()} == {
        ("a",): [3, 14],
        ("b",): [1, 2],
    }
    again = GroupedAggregates.from_wire(
        through_msgpack(left.to_wire()), new_states, decode_states, 10
    )
    assert {key: [s.result() for s in states] for key, states in again.groups.items()} == {
        ("a",): [3, 14],
        ("b",): [1, 2],
    }


def test_too_many_groups_is_a_caller_error():
    grouped = GroupedAggregates(new_states, 2)
    grouped.states_for(("a",))
    grouped.states_for(("b",))
    grouped.states_for(("a",))
    with pytest.raises(InvalidRequest, match="too many groups; narrow the query or raise limits"):
        grouped.states_for(("c",))
    wire = GroupedAggregates(new_states, 5)
    for name in "abc":
        wire.states_for((name,))
    with pytest.raises(InvalidRequest, match="too many groups"):
        GroupedAggregates.from_wire(wire.to_wire(), new_states, decode_states, 2)
    with pytest.raises(InvalidRequest, match="too many groups"):
        grouped.merge(wire)


@pytest.mark.parametrize(
    ("decode", "wire", "message"),
    [
        (Count.from_wire, ("sum", 1), "malformed count state"),
        (Count.from_wire, ("count",), "malformed count state"),
        (Count.from_wire, ("count", 1.5), "expected an int"),
        (Sum.from_wire, ("sum", 0, (1,), True, 1), "partials must be floats"),
        (Avg.from_wire, ("sum", 0, (), False, 0), "malformed avg state"),
        (Min.from_wire, ("min", 1, 5), "text must be a string"),
        (lambda w: CountDistinct.from_wire(w, 3), ("count_distinct", None, None), "give hashes"),
        (lambda w: CountDistinct.from_wire(w, 3), ("count_distinct", (-1,), None), "uint64"),
        (lambda w: TopK.from_wire(w, 1, 1), ("top_k", (("a", 0),), 0), "count >= 1"),
        (lambda w: PluginState.from_wire(w, max), ("plugin", True), "malformed plugin state"),
        (
            lambda w: GroupedAggregates.from_wire(w, new_states, decode_states, 5),
            (((1,), (("count", 1), ("sum", 0, (), False, 0))),),
            "malformed group key",
        ),
    ],
)
def test_malformed_wire_states_are_rejected(decode, wire, message):
    with pytest.raises(ValueError, match=message):
        decode(wire)


def test_count_distinct_merges_across_forms():
    small = fed(CountDistinct(3), [1, 2])
    big = fed(CountDistinct(3), [3, 4, 5, 6])
    assert big.is_approximate
    assert not small.is_approximate
    exact_into_sketch = fed(CountDistinct(3), [3, 4, 5, 6])
    exact_into_sketch.merge(small)
    sketch_into_exact = fed(CountDistinct(3), [1, 2])
    sketch_into_exact.merge(big)
    one_pass = fed(CountDistinct(3), [1, 2, 3, 4, 5, 6])
    assert exact_into_sketch.result() == sketch_into_exact.result() == one_pass.result()
    assert one_pass.result()["value"] == 6
