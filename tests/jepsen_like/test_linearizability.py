"""The linearizability checker: hand-made histories with known answers, generated histories of
a correct register (always valid) and of a broken one, and agreement with brute force."""

from __future__ import annotations

import itertools
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from register_histories import Builder, linearizable_history

from jepsen_like.history import History, Op, Operation
from jepsen_like.linearizability import check_linearizable
from jepsen_like.model import Call, CasRegister


def check(b: Builder, **options):
    return check_linearizable(b.history, **options)


# ---- hand-made histories ---------------------------------------------------------------


def test_overlapping_writes_and_reads_may_be_ordered_either_way():
    b = Builder()
    b.invoke(1, "write", 1)
    b.invoke(2, "write", 2)
    b.invoke(3, "read")
    b.ok(3, 2)  # 2 took effect before the read ...
    b.invoke(4, "read")
    b.ok(1, 1)
    b.ok(4, 1)  # ... and 1 after it: both overlap every read
    b.ok(2, 2)
    result = check(b)
    assert result.valid is True, result.details
    assert result.checker == "linearizable"
    assert result.details["operations"] == 4


def test_a_read_of_the_initial_state_returns_nothing():
    b = Builder()
    b.op(1, "read", result=None)
    b.op(1, "write", 1)
    b.op(1, "read", result=1)
    assert check(b).valid is True


def test_a_stale_read_after_a_completed_write_is_caught_with_a_witness():
    b = Builder(key="reg/7")
    b.op(1, "write", 1)
    b.op(2, "write", 2)
    stale = b.op(3, "read", result=1)
    result = check(b)
    assert result.valid is False
    witness = result.details["witness"]
    assert witness["key"] == "reg/7"
    assert witness["op"]["index"] == stale.index - 1  # the read's invocation
    assert witness["op"]["output"] == 1
    assert witness["state"] == "2"
    assert [op["input"] for op in witness["prefix_tail"]] == [1, 2]
    assert result.details["invalid_keys"] == ["reg/7"]
    text = result.details["witness_text"]
    assert "key reg/7: this operation cannot be linearized" in text
    assert "process 3 read on reg/7 -> ok 1" in text
    assert "state after that prefix: 2" in text
    assert "read -> ok 1 by process 3" in result.summary


def test_a_lost_write_is_caught():
    b = Builder()
    b.op(1, "write", 1)
    b.op(2, "write", 2)  # acknowledged, then lost: later reads see the older value
    b.op(3, "read", result=1)
    b.op(4, "read", result=1)
    assert check(b).valid is False


def test_reordered_writes_are_caught():
    b = Builder()
    b.op(1, "write", 1)
    b.op(1, "write", 2)
    b.op(2, "read", result=2)
    b.op(2, "read", result=1)  # the first write applied after the second
    assert check(b).valid is False


def test_an_info_write_may_take_effect_long_after_it_timed_out():
    b = Builder()
    b.op(1, "write", 1)
    b.op(2, "write", 2, kind="info")
    b.op(3, "read", result=1)
    b.op(3, "read", result=2)  # it finally applied
    assert check(b).valid is True


def test_an_info_write_may_never_take_effect():
    b = Builder()
    b.op(1, "write", 1)
    b.op(2, "write", 2, kind="info")
    b.op(3, "read", result=1)
    b.op(3, "read", result=1)
    assert check(b).valid is True


def test_an_info_write_takes_effect_at_most_once():
    b = Builder()
    b.op(1, "write", 1, kind="info")
    b.op(2, "read", result=1)
    b.op(2, "write", 2)
    b.op(2, "read", result=1)  # the same info write cannot apply a second time
    assert check(b).valid is False


def test_an_info_write_cannot_take_effect_before_it_was_invoked():
    b = Builder()
    b.op(1, "read", result=5)
    b.op(2, "write", 5, kind="info")
    assert check(b).valid is False


def test_a_failed_write_must_never_be_seen():
    b = Builder()
    b.op(1, "write", 1)
    b.op(2, "write", 2, kind="fail")
    assert check(b).valid is True
    b.op(3, "read", result=2)
    assert check(b).valid is False


def test_info_and_failed_reads_are_ignored():
    b = Builder()
    b.op(1, "write", 1)
    b.invoke(2, "read")
    b.info(2)
    b.invoke(3, "read")
    b.fail(3)
    result = check(b)
    assert result.valid is True
    assert result.details["dropped"] == 2


def test_cas_succeeds_only_from_the_expected_value():
    b = Builder()
    b.op(1, "write", 1)
    b.op(1, "cas", [1, 2])
    b.op(2, "read", result=2)
    b.op(2, "cas", [1, 3], kind="fail")  # a failed cas has no effect
    b.op(2, "read", result=2)
    assert check(b).valid is True
    b.op(3, "cas", [1, 4])  # the register holds 2: this cas cannot have succeeded
    assert check(b).valid is False


def test_cas_on_an_absent_key_expects_nothing():
    b = Builder()
    b.op(1, "cas", [None, 1])
    b.op(1, "read", result=1)
    assert check(b).valid is True


def test_an_info_cas_may_explain_a_later_value():
    b = Builder()
    b.op(1, "write", 1)
    b.op(2, "cas", [1, 3], kind="info")
    b.op(3, "read", result=3)
    assert check(b).valid is True


def test_keys_are_checked_independently_and_all_bad_keys_are_listed():
    b = Builder()
    b.invoke(1, "write", 1, key="a")
    b.ok(1, 1)
    b.invoke(1, "write", 2, key="b")
    b.ok(1, 2)
    b.invoke(2, "read", key="a")
    b.ok(2, 2)  # a's value under key b: wrong for a
    b.invoke(2, "read", key="b")
    b.ok(2, 2)
    result = check(b)
    assert result.valid is False
    assert result.details["invalid_keys"] == ["a"]
    assert result.details["keys"] == 2


def test_operations_a_model_does_not_know_are_left_to_other_checkers():
    b = Builder()
    b.op(1, "write", 1)
    b.invoke(2, "add", 9, key=None)
    b.ok(2, 9)
    result = check(b)
    assert result.valid is True
    assert result.details["operations"] == 1


def test_a_history_with_nothing_to_check_is_unknown():
    assert check_linearizable(History()).valid is None


def test_running_out_of_search_budget_is_unknown_not_valid():
    history = linearizable_history(3, processes=10, keys=1, ops=400)
    result = check_linearizable(history, max_steps_per_key=50)
    assert result.valid is None
    assert result.details["unknown_keys"] == ["k0"]
    assert "budget exceeded" in result.summary
    assert check_linearizable(history).valid is True


def test_a_time_limit_also_makes_remaining_keys_unknown():
    history = linearizable_history(3, processes=10, keys=3, ops=3000)
    result = check_linearizable(history, time_limit_s=0.0)
    assert result.valid is None


# ---- generated histories ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    processes=st.integers(1, 8),
    keys=st.integers(1, 3),
    info_rate=st.sampled_from([0.0, 0.05, 0.2]),
)
def test_histories_of_a_correct_register_are_always_linearizable(seed, processes, keys, info_rate):
    history = linearizable_history(
        seed, processes=processes, keys=keys, ops=150, info_rate=info_rate, fail_rate=0.05
    )
    result = check_linearizable(history)
    assert result.valid is True, result.details.get("witness_text")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), processes=st.integers(2, 6))
def test_a_read_made_stale_in_a_correct_history_is_caught(seed, processes):
    history = linearizable_history(
        seed, processes=processes, keys=2, ops=120, unique_values=True, info_rate=0.05
    )
    mutated, read = _make_one_read_stale(history, random.Random(seed))
    assert check_linearizable(history).valid is True
    result = check_linearizable(mutated)
    assert result.valid is False
    assert result.details["witness"]["key"] == read.key


def _make_one_read_stale(history: History, rng: random.Random) -> tuple[History, Operation]:
    """Replace one ok read's value by a value overwritten before the read began: some ok
    write of that value completed, then another write definitely took effect after it (it
    began after the first completed) and completed before the read began. Values are unique."""
    pairs = history.pairs()
    effects = [o for o in pairs if o.kind == "ok" and o.f in ("write", "cas")]

    def written(operation: Operation) -> object:
        return operation.input if operation.f == "write" else operation.input[1]

    options = []
    for read in (o for o in pairs if o.kind == "ok" and o.f == "read"):
        for old in effects:
            if old.key != read.key or written(old) == read.output:
                continue
            if any(
                newer.key == read.key
                and newer.invoke_ns > (old.complete_ns or 0)
                and (newer.complete_ns or 0) < read.invoke_ns
                for newer in effects
            ):
                options.append((read, written(old)))
    assert options, "the generated history had no read to make stale"
    read, stale = rng.choice(options)
    assert read.completion is not None
    ops = [
        Op(
            process=op.process,
            kind=op.kind,
            f=op.f,
            key=op.key,
            value=stale if op is read.completion else op.value,
            time_ns=op.time_ns,
            node=op.node,
            index=op.index,
        )
        for op in history
    ]
    return History(ops), read


def test_a_twenty_thousand_operation_history_checks_in_seconds():
    history = linearizable_history(11, processes=10, keys=20, ops=20_000, info_rate=0.02)
    started = time.monotonic()
    result = check_linearizable(history)
    elapsed_s = time.monotonic() - started
    assert result.valid is True
    assert elapsed_s < 20, f"{elapsed_s:.1f}s ({result.details})"


# ---- agreement with brute force on small arbitrary histories ------------------------------


@st.composite
def small_histories(draw) -> History:
    """Up to 6 operations by up to 3 processes with arbitrary outcomes and results."""
    count = draw(st.integers(1, 6))
    values = st.integers(0, 2)
    specs = []
    for _ in range(count):
        f = draw(st.sampled_from(["read", "write", "cas"]))
        argument = {"read": None, "write": draw(values), "cas": [draw(values), draw(values)]}[f]
        kind = draw(st.sampled_from(["ok", "ok", "ok", "fail", "info"]))
        result = draw(st.one_of(st.none(), values)) if f == "read" else argument
        specs.append((f, argument, kind, result))
    order = draw(st.permutations(range(2 * count)))
    b = Builder()
    # Operation i has events 2i (invoke) and 2i+1 (complete); the drawn order interleaves them,
    # each operation on its own process.
    seen = set()
    for event in order:
        number = event // 2
        if number in seen:
            f, argument, kind, result = specs[number]
            b.complete(number, kind, result)
        else:
            seen.add(number)
            b.invoke(number, specs[number][0], specs[number][1])
    return b.history


def _brute_force(history: History) -> bool:
    """Is there an order of the ok operations, plus any subset of the info ones, that respects
    real time and the register's rules?"""
    pairs = [o for o in history.pairs() if o.kind != "fail"]
    pairs = [o for o in pairs if not (o.kind == "info" and o.f == "read")]
    required = [o for o in pairs if o.kind == "ok"]
    optional = [o for o in pairs if o.kind == "info"]
    model = CasRegister()
    for size in range(len(optional) + 1):
        for extra in itertools.combinations(optional, size):
            for order in itertools.permutations(required + list(extra)):
                if _respects_real_time(order) and _legal(model, order):
                    return True
    return False


def _respects_real_time(order) -> bool:
    for position, later in enumerate(order):
        for earlier in order[position + 1 :]:
            # `earlier` is placed after `later`; wrong if it completed before `later` began
            if earlier.kind == "ok" and earlier.complete_ns < later.invoke_ns:
                return False
    return True


def _legal(model: CasRegister, order) -> bool:
    state = None
    for operation in order:
        argument = tuple(operation.input) if isinstance(operation.input, list) else operation.input
        result = operation.output if operation.kind == "ok" else None
        legal, state = model.step(state, Call(operation.f, argument, result))
        if not legal:
            return False
    return True


@settings(max_examples=400, deadline=None)
@given(history=small_histories())
def test_the_search_agrees_with_brute_force_on_small_histories(history):
    result = check_linearizable(history)
    assert result.valid is _brute_force(history), [str(op) for op in history]


@pytest.mark.parametrize("seed", range(5))
def test_witness_operations_belong_to_the_reported_key(seed):
    history = linearizable_history(seed, processes=4, keys=3, ops=200, unique_values=True)
    mutated, read = _make_one_read_stale(history, random.Random(seed))
    witness = check_linearizable(mutated).details["witness"]
    assert witness["key"] == read.key
    assert witness["linearized_ops"] <= witness["searched_ops"]
    assert all(op["text"].count(f" on {witness['key']} ") == 1 for op in witness["prefix_tail"])


# ---- agreement with plain WGL on medium histories -----------------------------------------


def _plain_wgl(history: History) -> bool:
    """Porcupine's treatment, none of our pruning: every info operation is linearized at some
    point after its invocation (its return is at infinity); an info write has its effect, an
    info cas its effect or none. Memoized on (linearized set, state)."""
    operations = [o for o in history.pairs() if o.kind != "fail"]
    operations = [o for o in operations if not (o.kind == "info" and o.f == "read")]
    events = sorted(
        [(o.invoke_ns, 0, i) for i, o in enumerate(operations)]
        + [
            (o.complete_ns if o.kind == "ok" else float("inf"), 1, i)
            for i, o in enumerate(operations)
        ]
    )

    def next_states(state, operation):
        if operation.f == "read":
            return [state] if operation.output == state else []
        if operation.f == "write":
            return [operation.input]
        expected, new = operation.input
        if operation.kind == "ok":
            return [new] if state == expected else []
        return [new] if state == expected else [state]

    seen = set()

    def search(linearized: int, state) -> bool:
        pending = [(kind, i) for _, kind, i in events if not linearized >> i & 1]
        if not pending:
            return True
        for kind, i in pending:
            if kind == 1:
                return False
            for new_state in next_states(state, operations[i]):
                configuration = (linearized | 1 << i, new_state)
                if configuration not in seen:
                    seen.add(configuration)
                    if search(*configuration):
                        return True
        return False

    return search(0, None)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    processes=st.integers(2, 5),
    ops=st.integers(10, 40),
    mutate=st.booleans(),
)
def test_the_search_agrees_with_plain_wgl_on_info_heavy_histories(seed, processes, ops, mutate):
    history = linearizable_history(
        seed, processes=processes, keys=1, ops=ops, info_rate=0.2, values=3
    )
    rng = random.Random(seed)
    reads = [op for op in history if op.kind == "ok" and op.f == "read"]
    if mutate and reads:
        chosen = rng.choice(reads)
        history = History(
            Op(
                process=op.process,
                kind=op.kind,
                f=op.f,
                key=op.key,
                value=rng.choice([None, 0, 1, 2]) if op is chosen else op.value,
                time_ns=op.time_ns,
                index=op.index,
            )
            for op in history
        )
    assert check_linearizable(history).valid is _plain_wgl(history)
