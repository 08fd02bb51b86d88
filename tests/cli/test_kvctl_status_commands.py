"""kvctl cluster status and kvctl shards: tables for people, the server's JSON for scripts."""

from __future__ import annotations

import json

import pytest

from cli.__main__ import kvctl


def test_cluster_status_shows_health_nodes_and_leaderless_shards(api, run):
    result = run("--endpoints", api.url, "cluster", "status")
    assert result.exit_code == 0
    out = result.stdout
    assert "cluster c0ffee" in out
    assert "epoch 7" in out
    assert "UNHEALTHY" in out
    assert "shards: 2 total, 1 with a leader" in out
    assert "shards without a leader: 2" in out
    assert "unreachable nodes: 3" in out
    rows = [line.split() for line in out.splitlines()]
    node_rows = {row[0]: row for row in rows if row and row[0].isdigit()}
    assert node_rows["1"][1] == "http://127.0.0.1:1"
    assert node_rows["3"][3] == "no"


def test_cluster_status_shows_splits_in_progress(api, run):
    api.cluster_status["splits"] = [{"shard": 1, "child": 3, "split_token": 1 << 62}]
    result = run("--endpoints", api.url, "cluster", "status")
    assert result.exit_code == 0
    assert "splitting: shard 1 -> new shard 3" in result.stdout


def test_cluster_status_json_is_the_servers_answer(api, run):
    result = run("--endpoints", api.url, "cluster", "status", "--json")
    assert json.loads(result.stdout) == api.cluster_status


def test_shards_table_shows_ranges_leaders_and_replica_progress(api, run):
    result = run("--endpoints", api.url, "shards")
    assert result.exit_code == 0
    out = result.stdout
    rows = [line.split() for line in out.splitlines()]
    assert ["1", "0000000000000000", "1", "3", "1:", "leader", "42/42"] in rows
    assert ["7fffffffffffffff", "2:", "follower", "42/40"] in rows
    assert ["2", "8000000000000000", "none", "5", "1:", "leader", "42/42"] in rows
    assert ["ffffffffffffffff", "2:", "follower", "42/40"] in rows
    assert "50% of the ring" in out
    assert "none" in out  # shard 2 has no leader
    assert "1: leader 42/42" in out
    assert "2: follower 42/40" in out
    assert "3: unreachable" in out


def test_shards_json_lists_the_shards(api, run):
    body = json.loads(run("--endpoints", api.url, "--json", "shards").stdout)
    assert body == {"epoch": 7, "shards": api.cluster_status["shards"]}


def _leaf_commands():
    for name, command in kvctl.commands.items():
        sub = getattr(command, "commands", None)
        if sub:
            for sub_name in sub:
                yield [name, sub_name]
        else:
            yield [name]


@pytest.mark.parametrize("path", list(_leaf_commands()), ids=" ".join)
def test_every_command_has_a_summary_and_an_example_in_its_help(run, path):
    result = run(*path, "--help")
    assert result.exit_code == 0
    assert "kvctl " + path[0] in result.stdout.split("Example", 1)[1]


def test_the_top_level_help_lists_the_exit_codes(run):
    out = run("--help").stdout
    for line in ("1  key not found", "3  precondition failed", "4  cluster unavailable"):
        assert line in out
