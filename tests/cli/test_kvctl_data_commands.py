"""kvctl get/put/del/scan/txn against a fake node API: arguments, output, exit codes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from cli.errors import (
    EXIT_NOT_FOUND,
    EXIT_OTHER,
    EXIT_PRECONDITION_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)


def test_get_writes_the_raw_value_bytes_to_stdout(api, run):
    api.put_value("blob", b"\x00\xffbinary\n")
    result = run("--endpoints", api.url, "get", "blob")
    assert result.exit_code == 0
    assert result.stdout_bytes == b"\x00\xffbinary\n"


def test_get_json_carries_base64_text_and_version(api, run):
    version = api.put_value("greeting", "héllo".encode())
    api.put_value("blob", b"\xff\xfe")
    result = run("--endpoints", api.url, "--json", "get", "greeting")
    assert json.loads(result.stdout) == {
        "key": "greeting",
        "value": base64.b64encode("héllo".encode()).decode(),
        "text": "héllo",
        "version": version,
    }
    binary = json.loads(run("--endpoints", api.url, "get", "blob", "--json").stdout)
    assert binary["text"] is None
    assert base64.b64decode(binary["value"]) == b"\xff\xfe"


def test_get_output_writes_the_value_to_a_file(api, run, tmp_path: Path):
    api.put_value("photo", b"\x89PNG")
    result = run("--endpoints", api.url, "get", "photo", "--output", str(tmp_path / "p.png"))
    assert result.exit_code == 0
    assert (tmp_path / "p.png").read_bytes() == b"\x89PNG"
    assert result.stdout_bytes == b""


def test_get_of_an_absent_key_exits_1_and_names_the_key(api, run):
    result = run("--endpoints", api.url, "get", "missing")
    assert result.exit_code == EXIT_NOT_FOUND
    assert "'missing' does not exist" in result.stderr
    assert result.stdout == ""


def test_errors_are_json_on_stderr_with_json(api, run):
    result = run("--endpoints", api.url, "get", "missing", "--json")
    assert result.exit_code == EXIT_NOT_FOUND
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "not_found"
    assert error["exit_code"] == EXIT_NOT_FOUND
    assert error["status"] == 404


def test_stale_get_asks_for_stale_consistency(api, run):
    api.put_value("k", b"v")
    run("--endpoints", api.url, "get", "k", "--stale")
    run("--endpoints", api.url, "get", "k")
    consistency = [r.query["consistency"] for r in api.requests_to("/v1/kv/")]
    assert consistency == ["stale", "linearizable"]


def test_keys_are_percent_encoded_in_the_path(api, run):
    result = run("--endpoints", api.url, "put", "a/b c?é%", "v")
    assert result.exit_code == 0
    assert api.requests[-1].raw_path == "/v1/kv/a%2Fb%20c%3F%C3%A9%25"
    assert "a/b c?é%" in api.store


def test_put_prints_the_new_version_and_sends_the_value(api, run):
    result = run("--endpoints", api.url, "put", "greeting", "hello")
    assert result.exit_code == 0
    assert result.stdout == "put 'greeting' (version 1)\n"
    assert api.store["greeting"] == (b"hello", 1)
    assert json.loads(run("--endpoints", api.url, "--json", "put", "k", "v").stdout) == {
        "key": "k",
        "version": 2,
    }


def test_put_reads_the_value_from_a_file_or_stdin(api, run, tmp_path: Path):
    (tmp_path / "value.bin").write_bytes(b"\x00from file")
    assert (
        run("--endpoints", api.url, "put", "f", "--file", str(tmp_path / "value.bin")).exit_code
        == 0
    )
    assert run("--endpoints", api.url, "put", "s", "-", input=b"\xffstdin").exit_code == 0
    assert run("--endpoints", api.url, "put", "t", "--file", "-", input=b"also").exit_code == 0
    assert api.store["f"][0] == b"\x00from file"
    assert api.store["s"][0] == b"\xffstdin"
    assert api.store["t"][0] == b"also"


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["put", "k"], id="no value"),
        pytest.param(["put", "k", "v", "--file", "x"], id="value and file"),
        pytest.param(["put", "k", "v", "--if-version", "-1"], id="negative version"),
        pytest.param(["get"], id="no key"),
        pytest.param(["scan", "--limit", "0"], id="zero limit"),
    ],
)
def test_usage_errors_exit_2_without_a_request(api, run, args):
    result = run("--endpoints", api.url, *args)
    assert result.exit_code == EXIT_USAGE
    assert api.requests == []


def test_every_put_carries_an_idempotency_key(api, run):
    run("--endpoints", api.url, "put", "k", "v1")
    run("--endpoints", api.url, "put", "k", "v2")
    run("--endpoints", api.url, "put", "k", "v3", "--idempotency-key", "mine")
    keys = [r.headers.get("Idempotency-Key") for r in api.requests_to("/v1/kv/")]
    assert keys[0]
    assert keys[1]
    assert keys[0] != keys[1]
    assert keys[2] == "mine"


def test_put_with_a_stale_if_version_exits_3_and_shows_the_current_version(api, run):
    api.put_value("k", b"old")
    result = run("--endpoints", api.url, "put", "k", "new", "--if-version", "7")
    assert result.exit_code == EXIT_PRECONDITION_FAILED
    assert "'k' is at version 1, not at version 7" in result.stderr
    assert api.store["k"] == (b"old", 1)
    assert api.requests[-1].query["if_version"] == "7"
    error = json.loads(
        run("--endpoints", api.url, "--json", "put", "k", "x", "--if-version", "0").stderr
    )["error"]
    assert error["code"] == "precondition_failed"
    assert error["current_version"] == 1


def test_del_deletes_and_reports_the_deleted_version(api, run):
    version = api.put_value("k", b"v")
    result = run("--endpoints", api.url, "del", "k")
    assert result.exit_code == 0
    assert f"version {version}" in result.stdout
    assert "k" not in api.store


def test_del_of_an_absent_key_exits_1(api, run):
    assert run("--endpoints", api.url, "del", "nope").exit_code == EXIT_NOT_FOUND


def test_del_with_a_stale_if_version_exits_3(api, run):
    api.put_value("k", b"v")
    result = run("--endpoints", api.url, "del", "k", "--if-version", "9")
    assert result.exit_code == EXIT_PRECONDITION_FAILED
    assert "k" in api.store


def test_scan_shows_a_table_of_keys_versions_and_previews(api, run):
    api.put_value("user/1", b"alice")
    api.put_value("user/2", b"\xff\x00\x01")
    api.put_value("user/3", b"x" * 200)
    api.put_value("other", b"skip me")
    result = run("--endpoints", api.url, "scan", "--prefix", "user/")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KEY", "VERSION", "VALUE"]
    assert lines[1].split() == ["user/1", "1", "alice"]
    assert "<3 bytes: ff 00 01>" in lines[2]
    assert "…" in lines[3]
    assert "other" not in result.stdout
    assert "3 keys" in result.stdout
    assert api.requests[-1].query["prefix"] == "user/"


def test_scan_never_interprets_keys_as_markup(api, run):
    api.put_value("[bold]k[/bold]", b"[red]v")
    result = run("--endpoints", api.url, "scan")
    assert "[bold]k[/bold]" in result.stdout
    assert "[red]v" in result.stdout


def test_scan_shows_one_page_and_how_to_get_the_next(api, run):
    for key in "abcde":
        api.put_value(key, key.encode())
    result = run("--endpoints", api.url, "scan", "--limit", "2")
    assert "2 keys" in result.stdout
    assert "--cursor b" in result.stdout
    page = json.loads(
        run("--endpoints", api.url, "--json", "scan", "-n", "2", "--cursor", "b").stdout
    )
    assert [item["key"] for item in page["items"]] == ["c", "d"]
    assert page["next_cursor"] == "d"


def test_scan_all_follows_next_cursor_to_the_end(api, run):
    for key in "abcde":
        api.put_value(key, key.encode())
    result = run("--endpoints", api.url, "--json", "scan", "--all", "--limit", "2")
    body = json.loads(result.stdout)
    assert [item["key"] for item in body["items"]] == list("abcde")
    assert body["items"][0] == {"key": "a", "value": "YQ==", "text": "a", "version": 1}
    assert body["next_cursor"] is None
    assert [r.query.get("cursor") for r in api.requests_to("/v1/scan")] == [None, "b", "d"]


def test_scan_passes_start_end_and_stale(api, run):
    run("--endpoints", api.url, "scan", "--start", "a", "--end", "m", "--stale")
    query = api.requests[-1].query
    assert (query["start"], query["end"], query["consistency"]) == ("a", "m", "stale")


TXN = {
    "compare": [{"key": "lock", "target": "version", "op": "==", "version": 0}],
    "success": [{"op": "put", "key": "lock", "value": base64.b64encode(b"me").decode()}],
    "failure": [{"op": "get", "key": "lock"}],
}


def test_txn_runs_the_success_ops_when_compares_hold(api, run, tmp_path: Path):
    (tmp_path / "txn.json").write_text(json.dumps(TXN))
    result = run("--endpoints", api.url, "txn", str(tmp_path / "txn.json"))
    assert result.exit_code == 0
    assert "SUCCEEDED" in result.stdout
    assert api.store["lock"][0] == b"me"
    assert json.loads(api.requests[-1].body) == TXN


def test_txn_exits_3_when_it_ran_the_failure_ops(api, run):
    api.put_value("lock", b"someone")
    result = run("--endpoints", api.url, "txn", "-", input=json.dumps(TXN))
    assert result.exit_code == EXIT_PRECONDITION_FAILED
    assert "FAILED" in result.stdout
    assert "someone" in result.stdout
    answer = json.loads(
        run("--endpoints", api.url, "--json", "txn", "-", input=json.dumps(TXN)).stdout
    )
    assert answer["succeeded"] is False
    assert answer["results"][0]["value"] == base64.b64encode(b"someone").decode()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"compare": [], "sucess": []}'])
def test_txn_rejects_a_malformed_request_file_with_exit_2(api, run, text):
    result = run("--endpoints", api.url, "txn", "-", input=text)
    assert result.exit_code == EXIT_USAGE
    assert api.requests == []


def test_a_400_from_the_node_exits_5_with_its_message(api, run):
    api.force(400, {"error": {"code": "invalid_request", "message": "key too long"}})
    result = run("--endpoints", api.url, "put", "k", "v")
    assert result.exit_code == EXIT_OTHER
    assert "invalid_request" in result.stderr
    assert "key too long" in result.stderr


def test_a_504_says_the_write_may_have_applied(api, run):
    api.force(504, {"error": {"code": "outcome_unknown", "message": "timed out"}})
    result = run("--endpoints", api.url, "put", "k", "v")
    assert result.exit_code == EXIT_OTHER
    assert "may or may not have applied" in result.stderr


def test_a_503_exits_4_with_the_retry_hint(api, run):
    api.force(
        503,
        {"error": {"code": "shard_unavailable", "message": "shard 3 has no leader"}},
        {"Retry-After": "2"},
    )
    result = run("--endpoints", api.url, "get", "k")
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "shard 3 has no leader" in result.stderr
    assert "retry in 2s" in result.stderr
    error = json.loads(run("--endpoints", api.url, "--json", "get", "k").stderr)["error"]
    assert (error["status"], error["retry_after_s"], error["exit_code"]) == (503, 2.0, 4)
