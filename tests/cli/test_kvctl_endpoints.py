"""Where kvctl sends requests, and what it does when nodes refuse, stall or answer 503."""

from __future__ import annotations

import json
from pathlib import Path

from cli.errors import EXIT_OTHER, EXIT_UNAVAILABLE


def test_connection_refused_everywhere_exits_4_and_says_what_to_do(run, refused_url):
    result = run("--endpoints", f"{refused_url},{refused_url}/", "get", "k")
    assert result.exit_code == EXIT_UNAVAILABLE
    assert f"{refused_url} (connection refused)" in result.stderr
    assert "kvctl cluster up" in result.stderr


def test_a_refused_endpoint_falls_through_to_the_next(api, run, refused_url):
    api.put_value("k", b"v")
    result = run("--endpoints", f"{refused_url},{api.url}", "get", "k")
    assert result.exit_code == 0
    assert result.stdout_bytes == b"v"


def test_endpoints_are_tried_in_the_order_given(make_api, run):
    first, second = make_api(), make_api()
    run("--endpoints", f"{first.url},{second.url}", "put", "k", "v")
    run("--endpoints", f"{second.url},{first.url}", "put", "k2", "v")
    assert [r.raw_path for r in first.requests] == ["/v1/kv/k"]
    assert [r.raw_path for r in second.requests] == ["/v1/kv/k2"]


def test_a_503_falls_through_to_the_next_endpoint(make_api, run):
    busy, healthy = make_api(), make_api()
    busy.force(503, {"error": {"code": "shard_unavailable", "message": "not ready"}})
    healthy.put_value("k", b"v")
    result = run("--endpoints", f"{busy.url},{healthy.url}", "get", "k")
    assert result.exit_code == 0
    assert len(busy.requests) == 1


def test_a_read_that_gets_no_answer_is_retried_on_the_next_endpoint(api, run, silent_url):
    api.put_value("k", b"v")
    result = run("--timeout", "0.2", "--endpoints", f"{silent_url},{api.url}", "get", "k")
    assert result.exit_code == 0
    assert result.stdout_bytes == b"v"


def test_a_delete_that_gets_no_answer_is_not_resent(api, run, silent_url):
    api.put_value("k", b"v")
    result = run("--timeout", "0.2", "--endpoints", f"{silent_url},{api.url}", "del", "k")
    assert result.exit_code == EXIT_OTHER
    assert "may or may not have applied" in result.stderr
    assert api.requests == []
    assert "k" in api.store


def test_a_put_that_gets_no_answer_is_resent_with_the_same_idempotency_key(api, run, silent_url):
    result = run("--timeout", "0.2", "--endpoints", f"{silent_url},{api.url}", "put", "k", "v")
    assert result.exit_code == 0
    assert api.requests[0].headers["Idempotency-Key"]


def test_kvctl_endpoints_env_is_used_and_the_flag_wins_over_it(make_api, run, refused_url):
    from_env, from_flag = make_api(), make_api()
    env = {"KVCTL_ENDPOINTS": from_env.url}
    assert run("put", "a", "1", env=env).exit_code == 0
    assert run("--endpoints", from_flag.url, "put", "b", "1", env=env).exit_code == 0
    assert run("put", "c", "1", "--endpoints", from_flag.url, env=env).exit_code == 0
    assert set(from_env.store) == {"a"}
    assert set(from_flag.store) == {"b", "c"}


def test_shared_options_work_before_and_after_the_command(api, run):
    api.put_value("k", b"v")
    before = run("--json", "--endpoints", api.url, "get", "k")
    after = run("get", "k", "--json", "--endpoints", api.url)
    assert json.loads(before.stdout) == json.loads(after.stdout)


def test_endpoints_without_a_scheme_get_http(api, run):
    api.put_value("k", b"v")
    assert run("--endpoints", api.url.removeprefix("http://"), "get", "k").exit_code == 0


def test_without_endpoints_kvctl_reads_the_local_cluster_json(api, run, refused_url):
    cluster_dir = Path("data/cluster")
    cluster_dir.mkdir(parents=True)
    record = {
        "nodes": [
            {
                "id": node_id,
                "pid": None,
                "client_url": url,
                "peer_address": "127.0.0.1:1",
                "data_dir": str(cluster_dir / f"node{node_id}"),
                "argv": ["true"],
                "env": {},
            }
            for node_id, url in ((1, refused_url), (2, api.url))
        ],
        "shards": 8,
        "replication": 3,
        "created": "2024-01-01T00:00:00+00:00",
    }
    (cluster_dir / "cluster.json").write_text(json.dumps(record))
    api.put_value("k", b"from cluster.json")
    result = run("get", "k")
    assert result.exit_code == 0
    assert result.stdout_bytes == b"from cluster.json"


def test_without_any_endpoints_kvctl_explains_how_to_get_some(run):
    result = run("get", "k")
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "--endpoints" in result.stderr
    assert "KVCTL_ENDPOINTS" in result.stderr
    assert "kvctl cluster up" in result.stderr
