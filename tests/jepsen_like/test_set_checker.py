"""The set checker: acknowledged adds must survive; nothing unattempted may appear."""

from __future__ import annotations

from register_histories import Builder

from jepsen_like.set_checker import check_set


def _add(b: Builder, process: int, element: int, kind: str = "ok") -> None:
    b.invoke(process, "add", element, key=None)
    b.complete(process, kind, element)


def _final_read(b: Builder, elements: list[int], process: int = 100) -> None:
    b.invoke(process, "read_set", key=None)
    b.ok(process, elements)


def test_every_acknowledged_add_read_back_is_valid():
    b = Builder()
    for element in range(5):
        _add(b, 1, element)
    _final_read(b, [0, 1, 2, 3, 4])
    result = check_set(b.history)
    assert result.valid is True
    assert result.details["acknowledged"] == 5
    assert result.details["lost_count"] == 0


def test_a_lost_acknowledged_add_is_reported():
    b = Builder()
    _add(b, 1, 1)
    _add(b, 1, 2)
    _final_read(b, [1])
    result = check_set(b.history)
    assert result.valid is False
    assert result.details["lost_count"] == 1
    assert "process 1 add 2 -> ok" in result.details["lost"][0]["text"]
    assert "1 lost (e.g. 2)" in result.summary
    assert "acknowledged adds missing" in result.details["witness_text"]


def test_an_element_nobody_added_is_unexpected():
    b = Builder()
    _add(b, 1, 1)
    _final_read(b, [1, 99])
    result = check_set(b.history)
    assert result.valid is False
    assert result.details["unexpected"] == [99]


def test_a_failed_add_that_appears_anyway_is_unexpected():
    b = Builder()
    _add(b, 1, 1, kind="fail")
    _final_read(b, [1])
    result = check_set(b.history)
    assert result.valid is False
    assert result.details["failed_but_read_count"] == 1


def test_info_adds_may_be_present_or_absent():
    b = Builder()
    _add(b, 1, 1, kind="info")
    _add(b, 2, 2, kind="info")
    _add(b, 3, 3)
    _final_read(b, [1, 3])
    result = check_set(b.history)
    assert result.valid is True
    assert result.details["recovered"] == [1]


def test_an_add_still_running_when_the_read_began_may_be_missing():
    b = Builder()
    b.invoke(1, "add", 7, key=None)
    b.invoke(100, "read_set", key=None)
    b.ok(1, 7)
    b.ok(100, [])
    assert check_set(b.history).valid is True


def test_an_element_read_twice_is_reported():
    b = Builder()
    _add(b, 1, 1)
    _final_read(b, [1, 1])
    result = check_set(b.history)
    assert result.valid is False
    assert result.details["duplicated"] == [1]


def test_the_latest_final_read_is_the_one_judged():
    b = Builder()
    _add(b, 1, 1)
    _final_read(b, [], process=100)  # not yet visible? no: acknowledged before this read
    _final_read(b, [1], process=101)
    assert check_set(b.history).valid is True


def test_without_a_final_read_the_answer_is_unknown():
    b = Builder()
    _add(b, 1, 1)
    b.invoke(100, "read_set", key=None)
    b.info(100)
    result = check_set(b.history)
    assert result.valid is None
    assert "no ok read_set" in result.summary
