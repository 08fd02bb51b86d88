"""kvctl's security options against the fake node: where the bearer token comes from, that the
local cluster's admin token never goes to another cluster's endpoints, login, roles, and the
exit code of 401/403."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from cli.errors import EXIT_NOT_AUTHORIZED, EXIT_USAGE
from tests.cli.conftest import FakeApi, RunKvctl

ADMIN_TOKEN = "kvt_local-admin-token"


def write_cluster_json(url: str) -> Path:
    """A local cluster.json whose one node is `url`, recorded as started with --auth."""
    cluster_dir = Path("data/cluster")
    cluster_dir.mkdir(parents=True)
    token_file = cluster_dir / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    record = {
        "nodes": [
            {
                "id": 1,
                "pid": None,
                "client_url": url,
                "peer_address": "127.0.0.1:1",
                "data_dir": str(cluster_dir / "node1"),
                "argv": ["true"],
                "env": {},
            }
        ],
        "shards": 1,
        "replication": 1,
        "created": "2026-01-01T00:00:00+00:00",
        "security": {"token_file": str(token_file.resolve())},
    }
    (cluster_dir / "cluster.json").write_text(json.dumps(record))
    return cluster_dir


def authorization(api: FakeApi) -> str | None:
    return api.requests[-1].headers.get("Authorization")


def test_the_local_admin_token_goes_to_the_local_cluster_only(
    api: FakeApi, make_api, run: RunKvctl
) -> None:
    write_cluster_json(api.url)
    api.put_value("k", b"v")
    assert run("get", "k").exit_code == 0
    assert authorization(api) == f"Bearer {ADMIN_TOKEN}"
    stranger = make_api()
    stranger.put_value("k", b"v")
    assert run("--endpoints", stranger.url, "get", "k").exit_code == 0
    assert authorization(stranger) is None


def test_token_flag_and_environment_win_over_the_cluster_file(api: FakeApi, run: RunKvctl) -> None:
    write_cluster_json(api.url)
    api.put_value("k", b"v")
    assert run("get", "k", env={"KVCTL_TOKEN": "kvt_from_env"}).exit_code == 0
    assert authorization(api) == "Bearer kvt_from_env"
    assert run("get", "k", "--token", "kvt_from_flag").exit_code == 0
    assert authorization(api) == "Bearer kvt_from_flag"


def test_401_and_403_exit_with_the_not_authorized_code(api: FakeApi, run: RunKvctl) -> None:
    for status, code in ((401, "unauthenticated"), (403, "forbidden")):
        api.force(status, {"error": {"code": code, "message": "no"}})
        result = run("--endpoints", api.url, "put", "k", "v")
        assert result.exit_code == EXIT_NOT_AUTHORIZED, result.output
        assert f"HTTP {status}" in result.output


def test_login_checks_the_token_and_saves_it_privately(api: FakeApi, run: RunKvctl) -> None:
    api.force(
        200,
        {
            "name": "alice",
            "grants": {"admin": False, "read": [], "write": []},
            "auth_enabled": True,
        },
    )
    result = run("--endpoints", api.url, "login", "--token", "kvt_alice")
    assert result.exit_code == 0, result.output
    saved = Path("data/cluster/kvctl.token")
    assert saved.read_text().strip() == "kvt_alice"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert authorization(api) == "Bearer kvt_alice"
    run("--endpoints", api.url, "get", "k")
    assert authorization(api) == "Bearer kvt_alice"  # later commands use the saved token


def test_user_add_turns_roles_into_grants(api: FakeApi, run: RunKvctl) -> None:
    api.force(200, {"name": "bob", "grants": {}, "token": "kvt_bob"})
    result = run(
        "--endpoints", api.url, "user", "add", "bob", "--role", "readwrite:a/", "--role", "read:"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "kvt_bob"
    sent = json.loads(api.requests[-1].body)
    assert sent == {"name": "bob", "grants": {"admin": False, "read": ["a/", ""], "write": ["a/"]}}
    bad = run("--endpoints", api.url, "user", "add", "bob", "--role", "superuser")
    assert bad.exit_code == EXIT_USAGE
