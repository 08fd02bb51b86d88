"""Node configuration: file, then environment, then flags; test-only faults refused by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.config import ConfigError, load_config

BASE = """
node_id = 1
data_dir = "/tmp/n1"
client_listen = "127.0.0.1:7001"
peer_listen = "127.0.0.1:7101"
[cluster]
shards = 4
replication = 1
[[cluster.nodes]]
id = 1
client_url = "http://127.0.0.1:7001"
peer_address = "127.0.0.1:7101"
[[cluster.nodes]]
id = 2
client_url = "http://127.0.0.1:7002/"
peer_address = "127.0.0.1:7102"
"""


def write(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(BASE + extra)
    return path


def test_the_file_is_read_and_flags_and_environment_override_it(tmp_path, monkeypatch):
    path = write(tmp_path)
    config = load_config(["--config", str(path)])
    assert config.node_id == 1
    assert config.shards == 4
    assert config.initial_nodes[1].client_url == "http://127.0.0.1:7002"
    monkeypatch.setenv("KVSTORE_DATA_DIR", "/tmp/from-env")
    assert str(load_config(["--config", str(path)]).data_dir) == "/tmp/from-env"
    flagged = load_config(["--config", str(path), "--data-dir", "/tmp/flag", "--node-id", "2"])
    assert (str(flagged.data_dir), flagged.node_id) == ("/tmp/flag", 2)


def test_routes_override_how_this_node_reaches_its_peers(tmp_path):
    path = write(
        tmp_path,
        '[routes.2]\npeer_address = "127.0.0.1:9102"\nclient_url = "http://127.0.0.1:9002"\n',
    )
    config = load_config(["--config", str(path)])
    assert config.peer_address_overrides == {2: ("127.0.0.1", 9102)}
    assert config.client_url_overrides == {2: "http://127.0.0.1:9002"}


def test_the_unsafe_fault_switch_is_refused_unless_the_test_flag_is_given(tmp_path):
    path = write(tmp_path, "[unsafe]\nstale_reads = true\n")
    with pytest.raises(ConfigError, match="--unsafe-test-faults"):
        load_config(["--config", str(path)])
    assert load_config(["--config", str(path), "--unsafe-test-faults"]).unsafe_stale_reads


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('client_listen = "nope"\n', "HOST:PORT"),
        ("[limits]\nmax_value_bytes = 'big'\n", "invalid setting"),
        ("[elastic]\nsplit_keys = -1\n", "split_keys"),
    ],
)
def test_bad_settings_say_what_is_wrong(tmp_path, extra, message):
    path = tmp_path / "node.toml"
    path.write_text(
        extra + BASE.replace('client_listen = "127.0.0.1:7001"\n', "")
        if "client_listen" in extra
        else BASE + extra
    )
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(path)])


def test_automatic_splits_are_off_unless_a_key_count_is_set(tmp_path):
    assert load_config(["--config", str(write(tmp_path))]).split_keys == 0
    path = write(tmp_path, "[elastic]\nsplit_keys = 500000\n")
    assert load_config(["--config", str(path)]).split_keys == 500_000


def test_a_node_missing_from_the_cluster_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not listed"):
        load_config(["--config", str(write(tmp_path)), "--node-id", "7"])


def test_the_check_interval_comes_from_integrity_then_the_environment(tmp_path, monkeypatch):
    assert load_config(["--config", str(write(tmp_path))]).check_interval_s == 300.0
    path = write(tmp_path, "[integrity]\ncheck_interval_s = 0\n")
    assert load_config(["--config", str(path)]).check_interval_s == 0  # never
    monkeypatch.setenv("KVSTORE_CHECK_INTERVAL_S", "2.5")
    assert load_config(["--config", str(path)]).check_interval_s == 2.5
    for bad in ("-1", "nan", "soon"):
        monkeypatch.setenv("KVSTORE_CHECK_INTERVAL_S", bad)
        with pytest.raises(ConfigError, match=r"check_interval_s|invalid setting"):
            load_config(["--config", str(path)])
