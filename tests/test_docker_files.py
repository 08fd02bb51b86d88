"""docker/: what can be checked without a Docker engine (none runs in CI): the compose file
parses, each service's config is a valid node config of one consistent cluster, and the
Dockerfile copies what exists and runs an installed entry point."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from kvstore.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def test_compose_services_mount_valid_configs_of_one_cluster():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"node1", "node2", "node3"}
    clusters = []
    for name, service in services.items():
        mount = next(v for v in service["volumes"] if v.endswith(":/etc/kvstore/node.toml:ro"))
        config_path = DOCKER / mount.split(":")[0]
        config = load_config(["--config", str(config_path)])
        assert f"node{config.node_id}" == name == service["hostname"]
        assert config.data_dir == Path("/data")
        assert any(v.endswith(":/data") for v in service["volumes"])
        clusters.append(config.initial_nodes)
        ports = service["ports"]
        assert len(ports) == 1
        assert ports[0].endswith(f":{config.client_listen[1]}")
    assert all(nodes == clusters[0] for nodes in clusters)
    assert {n.peer_address[0] for n in clusters[0]} == set(services)


def test_dockerfile_copies_existing_sources_and_runs_an_installed_entry_point():
    text = (DOCKER / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE):
        for source in sources.split():
            assert (ROOT / source).exists(), source
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, flags=re.MULTILINE)
    assert entry is not None
    assert entry.group(1) in scripts
    assert "/etc/kvstore/node.toml" in text
