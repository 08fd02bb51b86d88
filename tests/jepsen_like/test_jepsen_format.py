"""Histories written by Jepsen: its log lines and EDN maps parse into our ops, and
`python -m jepsen_like check --format jepsen` gives the verdicts Knossos would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jepsen_like.__main__ import main
from jepsen_like.checker import check_history
from jepsen_like.jepsen_format import JEPSEN_KEY, load_jepsen, parse_jepsen

DATA = Path(__file__).parent / "data"
STALE = DATA / "cas_register_stale_read.log"
WITH_INFO = DATA / "cas_register_valid_with_info.log"
EDN = DATA / "cas_register_history.edn"


def test_knossos_era_log_lines_parse_into_ops():
    history = load_jepsen(STALE)
    first = history[0]
    assert (first.process, first.kind, first.f, first.key, first.value) == (
        0,
        "invoke",
        "read",
        JEPSEN_KEY,
        None,
    )
    cas = history[6]
    assert (cas.kind, cas.f, cas.value) == ("invoke", "cas", [3, 0])
    assert all(isinstance(op.process, int) for op in history)  # nemesis lines skipped
    assert len(history) == 18
    assert [op.time_ns for op in history] == sorted({op.time_ns for op in history})


def test_timestamped_log_lines_parse_with_their_error_text():
    history = load_jepsen(WITH_INFO)
    infos = [op for op in history if op.kind == "info"]
    assert [(op.process, op.f, op.error) for op in infos] == [
        (2, "cas", "indeterminate: Read timed out"),
        (0, "write", ":timed-out"),
    ]
    assert infos[1].value == 3
    # Knossos-era logs put the reason where the value was; an info's value is never used.
    (_, info) = parse_jepsen(
        "INFO  jepsen.util - 4\t:invoke\t:write\t3\n"
        "INFO  jepsen.util - 4\t:info\t:write\t:timed-out\n"
    )
    assert (info.kind, info.value, info.error) == ("info", "timed-out", None)


def test_edn_operation_maps_parse_and_skip_the_nemesis():
    history = load_jepsen(EDN)
    assert len(history) == 14
    assert history[4].value == [2, 3]
    assert history[7].error == "mismatch"
    assert history[11].error == "indeterminate: timed out"


def test_an_edn_vector_of_maps_and_values_of_every_shape_parse():
    text = """[{:type :invoke, :f :write, :value "a\\"b", :process 0}
               {:type :ok, :f :write, :value "a\\"b", :process 0} ; a comment
               {:type :invoke :f :read :value nil :process 1 :time #inst "2024-01-01"}
               {:type :ok :f :read :value [1.5 -2 true (3) #{4} {:k 5}] :process 1}]"""
    history = parse_jepsen(text)
    assert history[0].value == 'a"b'
    assert history[3].value == [1.5, -2, True, [3], [4], {"k": 5}]


def test_text_without_jepsen_operations_is_refused():
    with pytest.raises(ValueError, match="no Jepsen client operations"):
        parse_jepsen("INFO something else entirely\n")
    with pytest.raises(ValueError, match="EDN"):
        parse_jepsen("{:type :invoke, :f :read")


def test_a_stale_read_in_a_jepsen_log_is_invalid_with_its_witness():
    (result,) = check_history(load_jepsen(STALE), ["linearizable"])
    assert result.valid is False
    witness = result.details["witness"]
    assert witness["op"]["output"] == 0
    assert witness["state"] == "2"


@pytest.mark.parametrize("fixture", [WITH_INFO, EDN])
def test_valid_jepsen_histories_with_info_ops_are_valid(fixture):
    (result,) = check_history(load_jepsen(fixture), ["linearizable"])
    assert result.valid is True, result.details


def test_cli_prints_an_invalid_verdict_last_and_exits_1(capsys):
    code = main(["check", "--format", "jepsen", "--model", "cas-register", str(STALE)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert lines[-1].startswith(
        "VERDICT invalid linearizable key jepsen: read -> ok 0 by process 0"
    )
    assert any("state after that prefix: 2" in line for line in lines)


@pytest.mark.parametrize("fixture", [WITH_INFO, EDN])
def test_cli_prints_a_valid_verdict_and_exits_0(capsys, fixture):
    code = main(["check", "--format", "jepsen", str(fixture)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    assert last.startswith("VERDICT valid linearizable ")


def test_cli_runs_as_a_module():
    completed = subprocess.run(
        [sys.executable, "-m", "jepsen_like", "check", "--format", "jepsen", str(STALE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 1, completed.stderr
    assert completed.stdout.splitlines()[-1].startswith("VERDICT invalid linearizable")
