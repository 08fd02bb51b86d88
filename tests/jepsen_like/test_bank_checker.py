"""The bank checker: every read must see the bank's total, and no negative balance."""

from __future__ import annotations

import pytest
from register_histories import Builder

from jepsen_like.bank_checker import check_bank
from jepsen_like.checker import applicable_checkers

BANK = {"accounts": 4, "opening_balance": 100}


def _transfer(b: Builder, process: int, kind: str = "ok") -> None:
    b.invoke(process, "transfer", ["bank/1", "bank/2", 10], key=None)
    b.complete(process, kind, None)


def _read(b: Builder, process: int, output: dict[str, int], f: str = "read_all") -> None:
    b.invoke(process, f, BANK, key=None)
    b.ok(process, output)


def test_reads_that_see_the_total_are_valid() -> None:
    b = Builder()
    _transfer(b, 1)
    _read(b, 2, {"bank/1": 90, "bank/2": 110})  # two accounts never written: 100 each
    _read(b, 3, {"sum": 200, "present": 2}, f="read_total")
    _transfer(b, 1, "info")
    result = check_bank(b.history)
    assert result.valid is True
    assert result.details["reads"] == 2
    assert applicable_checkers(b.history) == ["bank"]


@pytest.mark.parametrize(
    ("output", "f", "problem"),
    [
        ({"bank/1": 90, "bank/2": 100}, "read_all", "total 390 != 400"),  # a debit, no credit
        ({"bank/1": -5, "bank/2": 205}, "read_all", "negative balance"),
        ({"sum": 210, "present": 2}, "read_total", "total 410 != 400"),  # applied twice
    ],
)
def test_a_torn_or_doubled_transfer_is_caught(output, f, problem) -> None:
    b = Builder()
    _transfer(b, 1)
    _read(b, 2, output, f)
    result = check_bank(b.history)
    assert result.valid is False
    assert problem in result.summary
    assert "process 2" in result.details["witness_text"]


def test_without_an_ok_read_the_answer_is_unknown() -> None:
    b = Builder()
    _transfer(b, 1)
    b.invoke(2, "read_all", BANK, key=None)
    b.complete(2, "fail", None)
    assert check_bank(b.history).valid is None
