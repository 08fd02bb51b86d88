"""The list-append checker: serial and concurrent valid histories pass; each anomaly is caught
and named, with a cycle of transactions as its witness."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from register_histories import Builder

from jepsen_like.append_checker import check_append

Micro = list


def _invoke(b: Builder, process: int, micro_ops: list[Micro]) -> None:
    invocation = [[f, k, None if f == "r" else v] for f, k, v in micro_ops]
    b.invoke(process, "txn", invocation, key=None)


def _complete(b: Builder, process: int, micro_ops: list[Micro], kind: str = "ok") -> None:
    b.complete(process, kind, micro_ops if kind == "ok" else None)


def txn(b: Builder, process: int, micro_ops: list[Micro], kind: str = "ok") -> None:
    """A whole transaction, alone in time."""
    _invoke(b, process, micro_ops)
    _complete(b, process, micro_ops, kind)


def concurrent(b: Builder, *txns: list[Micro]) -> None:
    """Transactions that all overlap in time (no real-time order between them)."""
    for process, micro_ops in enumerate(txns, start=50):
        _invoke(b, process, micro_ops)
    for process, micro_ops in enumerate(txns, start=50):
        _complete(b, process, micro_ops)


def anomalies(b: Builder, **options) -> set[str]:
    result = check_append(b.history, **options)
    assert result.checker == "append"
    return set(result.details["anomaly_counts"])


def test_a_serial_history_is_valid():
    b = Builder()
    txn(b, 1, [["append", "x", 1], ["r", "x", [1]]])
    txn(b, 1, [["r", "x", [1]], ["append", "x", 2], ["append", "y", 3]])
    txn(b, 2, [["r", "x", [1, 2]], ["r", "y", [3]]])
    result = check_append(b.history)
    assert result.valid is True, result.details
    assert result.details["committed"] == 3


def test_concurrent_transactions_that_serialize_are_valid():
    b = Builder()
    concurrent(
        b,
        [["append", "x", 1], ["r", "y", []]],
        [["r", "x", [1]], ["append", "y", 2]],
    )
    txn(b, 3, [["r", "x", [1]], ["r", "y", [2]]])
    assert check_append(b.history).valid is True


def test_g0_write_cycle_is_caught():
    b = Builder()
    concurrent(
        b,
        [["append", "x", 1], ["append", "y", 1]],
        [["append", "x", 2], ["append", "y", 2]],
    )
    txn(b, 3, [["r", "x", [1, 2]], ["r", "y", [2, 1]]])
    result = check_append(b.history)
    assert result.valid is False
    assert "G0" in result.details["anomaly_counts"]
    cycle = result.details["anomalies"]["G0"][0]["cycle"]
    assert [step["edge"] for step in cycle] == ["ww", "ww"]
    assert "G0: T" in result.details["witness_text"]


def test_g1c_circular_information_flow_is_caught():
    b = Builder()
    concurrent(
        b,
        [["append", "x", 1], ["r", "y", [1]]],
        [["append", "y", 1], ["r", "x", [1]]],
    )
    found = anomalies(b)
    assert "G1c" in found
    assert "G0" not in found


def test_g_single_read_skew_is_caught():
    b = Builder()
    concurrent(
        b,
        [["r", "x", []], ["r", "y", [2]]],  # saw T2's y but not its x
        [["append", "x", 1], ["append", "y", 2]],
    )
    txn(b, 3, [["r", "x", [1]]])
    result = check_append(b.history)
    assert "G-single" in result.details["anomaly_counts"]
    cycle = result.details["anomalies"]["G-single"][0]["cycle"]
    assert sorted(step["edge"] for step in cycle) == ["rw", "wr"]


def test_g2_write_skew_is_caught():
    b = Builder()
    concurrent(
        b,
        [["r", "x", []], ["append", "y", 1]],
        [["r", "y", []], ["append", "x", 1]],
    )
    txn(b, 3, [["r", "x", [1]], ["r", "y", [1]]])
    found = anomalies(b)
    assert "G2-item" in found
    assert "G-single" not in found


def test_g1a_aborted_read_is_caught():
    b = Builder()
    txn(b, 1, [["append", "x", 1]], kind="fail")
    txn(b, 2, [["r", "x", [1]]])
    assert "G1a" in anomalies(b)


def test_g1b_intermediate_read_is_caught():
    b = Builder()
    concurrent(b, [["append", "x", 1], ["append", "x", 2]], [["r", "x", [1]]])
    assert "G1b" in anomalies(b, realtime=False)


def test_lost_update_is_caught():
    b = Builder()
    concurrent(
        b,
        [["r", "x", []], ["append", "x", 1]],
        [["r", "x", []], ["append", "x", 2]],
    )
    txn(b, 3, [["r", "x", [1, 2]]])
    found = anomalies(b)
    assert "lost-update" in found
    assert "G-single" in found


def test_duplicates_garbage_and_incompatible_orders_are_caught():
    b = Builder()
    txn(b, 1, [["append", "x", 1], ["append", "x", 2]])
    txn(b, 2, [["r", "x", [1, 1]]])
    txn(b, 3, [["r", "x", [1, 2, 42]]])
    txn(b, 4, [["r", "x", [2, 1]]])
    found = anomalies(b)
    assert {"duplicate-elements", "garbage-read", "incompatible-order"} <= found


def test_a_transaction_must_see_its_own_appends():
    b = Builder()
    txn(b, 1, [["append", "x", 1]])
    txn(b, 2, [["append", "x", 2], ["r", "x", [1]]])
    assert "internal" in anomalies(b)


def test_a_stale_read_after_a_completed_append_is_a_realtime_cycle():
    b = Builder()
    txn(b, 1, [["append", "x", 1]])
    txn(b, 2, [["r", "x", []]])  # began after T1 completed, yet missed its append
    txn(b, 3, [["r", "x", [1]]])
    assert anomalies(b) == {"G-single-realtime"}
    assert check_append(b.history, realtime=False).valid is True


def test_an_info_transaction_counts_once_a_read_observes_it():
    b = Builder()
    txn(b, 1, [["append", "x", 1], ["append", "y", 1]], kind="info")
    txn(b, 2, [["append", "x", 2]])
    txn(b, 3, [["r", "x", [1, 2]], ["r", "y", [1]]])
    result = check_append(b.history)
    assert result.valid is True
    assert result.details["info_observed"] == 1


def test_an_unobserved_info_transaction_is_left_out():
    b = Builder()
    txn(b, 1, [["append", "x", 1]], kind="info")
    txn(b, 2, [["r", "x", []]])
    result = check_append(b.history)
    assert result.valid is True
    assert result.details["committed"] == 1


def test_appending_the_same_value_twice_breaks_the_workload_contract():
    b = Builder()
    txn(b, 1, [["append", "x", 1]])
    txn(b, 2, [["append", "x", 1]])
    with pytest.raises(ValueError, match="twice"):
        check_append(b.history)


def test_a_history_without_transactions_is_unknown():
    assert check_append(Builder().history).valid is None


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_histories_of_a_serializable_store_are_valid(seed):
    """Simulate a strictly serializable store: each txn applies atomically at an instant
    inside its interval (an info one maybe later or never); reads see the state then."""
    rng = random.Random(seed)
    keys = ["a", "b", "c"]
    planned = []
    next_value = 0
    for _process in range(4):
        now = 0
        for _ in range(15):
            start = now + rng.randint(1, 5)
            end = start + rng.randint(1, 20)
            micro_ops = []
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.5:
                    micro_ops.append(["r", rng.choice(keys), None])
                else:
                    next_value += 1
                    micro_ops.append(["append", rng.choice(keys), next_value])
            kind = rng.choice(["ok"] * 8 + ["fail", "info"])
            effect = None if kind == "fail" else rng.randint(start, end)
            if kind == "info" and rng.random() < 0.5:
                effect = None
            planned.append([start, end, effect, kind, micro_ops])
            now = end
            if kind == "info":
                break  # an info process is retired
    state: dict[str, list[int]] = {key: [] for key in keys}
    for plan in sorted((p for p in planned if p[2] is not None), key=lambda p: p[2]):
        for micro in plan[4]:
            if micro[0] == "append":
                state[micro[1]].append(micro[2])
            else:
                micro[2] = list(state[micro[1]])
    events = []
    for process, (start, end, _, kind, micro_ops) in enumerate(planned):
        events.append((start, 0, process, micro_ops, kind))
        events.append((end, 1, process, micro_ops, kind))
    b = Builder()
    for _, is_end, process, micro_ops, kind in sorted(events, key=lambda e: e[:3]):
        if is_end:
            _complete(b, process, micro_ops, kind)
        else:
            _invoke(b, process, micro_ops)
    result = check_append(b.history)
    assert result.valid is True, result.details.get("witness_text")
