"""`python -m jepsen_like check` on our JSON-lines histories: which checkers run, the verdict
line and the exit status."""

from __future__ import annotations

import pytest
from register_histories import Builder, linearizable_history

from jepsen_like.__main__ import main
from jepsen_like.checker import applicable_checkers, check_history, verdict, verdict_line
from jepsen_like.result import CheckResult


def _mixed_history() -> Builder:
    b = Builder(key="reg/1")
    b.op(1, "write", 1)
    b.op(1, "read", result=1)
    b.invoke(2, "add", 1, key=None)
    b.ok(2, 1)
    b.invoke(2, "read_set", key=None)
    b.ok(2, [1])
    b.invoke(3, "txn", [["append", "k", 1], ["r", "k", None]], key=None)
    b.ok(3, [["append", "k", 1], ["r", "k", [1]]])
    return b


def test_every_checker_that_applies_runs(tmp_path, capsys):
    b = _mixed_history()
    assert applicable_checkers(b.history) == ["linearizable", "set", "append"]
    path = tmp_path / "history.jsonl"
    b.history.save(path)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("VERDICT valid linearizable,set,append ")
    assert [line.split(":")[0] for line in out[:-1]] == ["linearizable", "set", "append"]


def test_an_invalid_history_exits_1_and_names_the_checker(tmp_path, capsys):
    b = _mixed_history()
    b.op(4, "read", result=7)
    path = tmp_path / "history.jsonl"
    b.history.save(path)
    assert main(["check", "--format", "ours", str(path)]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("VERDICT invalid linearizable key reg/1: read -> ok 7 by process 4")


def test_one_checker_can_be_chosen(tmp_path, capsys):
    b = _mixed_history()
    b.op(4, "read", result=7)
    path = tmp_path / "history.jsonl"
    b.history.save(path)
    assert main(["check", "--checker", "set", str(path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("VERDICT valid set ")


def test_an_exhausted_search_budget_exits_2(tmp_path, capsys):
    path = tmp_path / "history.jsonl"
    linearizable_history(5, processes=8, keys=1, ops=300).save(path)
    assert main(["check", "--max-steps-per-key", "10", str(path)]) == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("VERDICT unknown linearizable search budget exceeded")


@pytest.mark.parametrize(
    "content", ['{"process": 1, "kind": "ok", "f": "read", "time_ns": 1}\n', "not json\n"]
)
def test_an_unreadable_history_exits_3_with_a_reason(tmp_path, capsys, content):
    path = tmp_path / "history.jsonl"
    path.write_text(content)
    assert main(["check", str(path)]) == 3
    captured = capsys.readouterr()
    assert "cannot check" in captured.err
    assert "VERDICT" not in captured.out
    assert main(["check", str(tmp_path / "missing.jsonl")]) == 3


def test_the_runner_can_name_checkers_and_read_one_verdict():
    b = _mixed_history()
    results = check_history(b.history, ("linearizable", "set"))
    assert [r.checker for r in results] == ["linearizable", "set"]
    assert verdict(results) == "valid"
    with pytest.raises(ValueError, match="no checker named"):
        check_history(b.history, ["serializable"])


def test_the_verdict_is_invalid_before_unknown_before_valid():
    valid = CheckResult(True, "set", summary="fine")
    unknown = CheckResult(None, "linearizable", summary="budget")
    invalid = CheckResult(False, "append", summary="G0 x1")
    assert verdict([valid, unknown, invalid]) == "invalid"
    assert verdict_line([valid, unknown, invalid]) == "VERDICT invalid append G0 x1"
    assert verdict_line([valid, unknown]) == "VERDICT unknown linearizable budget"
    assert verdict([]) == "unknown"
