"""The [tls], [auth] and [encryption] sections of the node config: paths relative to the file,
and the combinations a node refuses before it binds a port."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.cluster_plan import NodeSecurity, node_toml, plan_nodes
from kvstore.config import ConfigError, load_config
from tests.kvstore.test_config import write

DIGEST = "ab" * 32


def test_tls_auth_and_encryption_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    for name in ("ca.pem", "n1.pem", "n1-key.pem", "secret", "keys.json"):
        (tmp_path / name).write_text("x" * 40)
    config = load_config(
        [
            "--config",
            str(
                write(
                    tmp_path,
                    '[tls]\nca_file = "ca.pem"\ncert_file = "n1.pem"\nkey_file = "n1-key.pem"\n'
                    f'[auth]\nenabled = true\nbootstrap_admin_token_sha256 = "{DIGEST}"\n'
                    '[encryption]\nkey_file = "keys.json"\n',
                )
            ),
        ]
    )
    assert config.tls is not None
    assert config.tls.ca_file == tmp_path / "ca.pem"
    assert config.auth.enabled
    assert config.auth.bootstrap_admin_token_sha256 == DIGEST
    assert config.encryption_key_file == tmp_path / "keys.json"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[tls]\nca_file = "missing.pem"\ncert_file = "a"\nkey_file = "b"\n', "not a readable"),
        ("[auth]\nenabled = true\n", "cluster_secret_file"),
        ('[auth]\nbootstrap_admin_token_sha256 = "ABC"\n', "64 lower-case hex"),
        ('[auth]\nenabled = true\ncluster_secret_file = "short"\n', "at least 32"),
    ],
)
def test_unsafe_or_broken_security_settings_are_refused(
    tmp_path: Path, extra: str, message: str
) -> None:
    (tmp_path / "short").write_text("too short")
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(write(tmp_path, extra))])


def test_kvctl_writes_configs_the_node_accepts(tmp_path: Path) -> None:
    for name in ("ca.pem", "node1.pem", "node1-key.pem"):
        (tmp_path / name).write_text("pem")
    (tmp_path / "keys.json").write_text("{}")
    nodes = plan_nodes(1, tmp_path, None, scheme="https")
    security = NodeSecurity(tmp_path, DIGEST, None, tmp_path / "keys.json")
    path = tmp_path / "node.toml"
    path.write_text(node_toml(nodes[0], nodes, shards=1, replication=1, security=security))
    config = load_config(["--config", str(path)])
    assert config.initial_nodes[0].client_url.startswith("https://")
    assert config.tls is not None
    assert config.auth.enabled
    assert config.encryption_key_file == tmp_path / "keys.json"
