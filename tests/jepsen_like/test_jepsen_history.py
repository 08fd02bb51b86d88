"""History: events, pairing, validation, JSON lines; and the package's boundaries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from register_histories import Builder

import jepsen_like
from jepsen_like.history import History, Op, Operation

PACKAGE = Path(jepsen_like.__file__).parent


def _op(process: int, kind: str, f: str = "write", value: object = 1, time_ns: int = 0) -> Op:
    return Op(process=process, kind=kind, f=f, key="x", value=value, time_ns=time_ns)


def test_pairs_match_each_invocation_with_its_completion_and_leave_pending_ones_info():
    b = Builder()
    b.invoke(1, "write", 3)
    b.invoke(2, "read")
    b.ok(2, None)
    b.ok(1, 3)
    b.invoke(3, "write", 4)
    pairs = b.history.pairs()
    assert [(p.process, p.f, p.kind) for p in pairs] == [
        (1, "write", "ok"),
        (2, "read", "ok"),
        (3, "write", "info"),
    ]
    assert pairs[0].input == 3
    assert pairs[1].output is None
    assert pairs[2].completion is None
    assert pairs[2].complete_ns is None


def test_history_round_trips_through_json_lines(tmp_path):
    b = Builder()
    b.invoke(1, "cas", [1, 2])
    b.fail(1, [1, 2])
    b.invoke(2, "txn", [["append", "k", 1], ["r", "k", None]])
    b.info(2, None)
    path = tmp_path / "history.jsonl"
    b.history.save(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert all(line.startswith("{") for line in lines)
    loaded = History.load(path)
    assert list(loaded) == list(b.history)


def test_counts_are_per_outcome():
    b = Builder()
    b.op(1, "write", 1)
    b.op(2, "write", 2, kind="fail")
    b.op(3, "write", 3, kind="info")
    assert b.history.counts() == {"ok": 1, "fail": 1, "info": 1}
    assert b.history.functions() == {"write"}


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([_op(1, "ok")], "no pending invocation"),
        ([_op(1, "invoke"), _op(1, "invoke")], "still pending"),
        ([_op(1, "invoke"), _op(1, "ok", f="read")], "does not match"),
        ([_op(1, "invoke", time_ns=5), _op(1, "ok", time_ns=4)], "before its invocation"),
        ([_op(1, "invoke"), _op(1, "info"), _op(1, "invoke")], "after its operation"),
    ],
)
def test_malformed_histories_are_refused_with_a_clear_message(ops, message):
    with pytest.raises(ValueError, match=message):
        History(ops).pairs()


def test_an_op_cannot_be_built_with_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        _op(1, "done")


def test_loading_a_broken_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"process": 1, "kind": "invoke", "f": "read", "time_ns": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        History.load(path)
    path.write_text('{"process": 1, "kind": "invoke"}\n')
    with pytest.raises(ValueError, match="lacks f, time_ns"):
        History.load(path)


def test_describe_reads_like_a_sentence():
    b = Builder(key="reg/1")
    b.invoke(7, "read")
    b.ok(7, 4)
    operation = b.history.pairs()[0]
    assert isinstance(operation, Operation)
    assert operation.describe() == "process 7 read on reg/1 -> ok 4 [#0..#1]"
    assert "0.000000s..0.000000s" in operation.describe(origin_ns=1)


def test_every_public_name_is_exported_and_exists():
    for name in jepsen_like.__all__:
        assert hasattr(jepsen_like, name), name
    assert sorted(jepsen_like.__all__) == jepsen_like.__all__


def test_the_package_never_imports_the_store_it_tests():
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in {"kvstore", "raft"}, f"{path.name} imports {name}"
