"""kvctl cluster up/down and node restart, with REAL child processes: a stand-in node
(fake_node_process.py, via KVCTL_NODE_COMMAND) that serves /health and /v1/cluster.

Every test checks that the processes it started are gone (os.kill(pid, 0) raises) and a
fixture stops any a failing test left behind, by PID only."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli import cluster_file, processes
from cli.cluster_plan import PlannedNode, node_toml, plan_nodes
from cli.errors import EXIT_UNAVAILABLE, EXIT_USAGE, InvalidUsage, KvctlError
from cli.launcher import NODE_COMMAND_ENV

FAKE_NODE = Path(__file__).with_name("fake_node_process.py")
DEADLINE_S = 30.0


def wait_for(what: str, condition: Callable[[], Any], timeout_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def reap_and_check_gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return is_gone(pid)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cluster directory whose nodes run the stand-in; afterwards no node may survive."""
    monkeypatch.setenv(NODE_COMMAND_ENV, shlex.join([sys.executable, str(FAKE_NODE)]))
    directory = tmp_path / "cluster dir"  # a space, to keep the quoting honest
    yield directory
    record = cluster_file.load(directory)
    if record is not None:
        leftovers = [processes.NodeProcess(n.pid, n.config_path) for n in record.nodes]
        outcomes = processes.stop_all(leftovers, timeout_s=2)
        assert set(outcomes) <= {"not running"}, f"a test left nodes running: {outcomes}"


def assert_ok(result: Any) -> None:
    assert result.exit_code == 0, result.output


def all_gone(pids: Iterable[int], deadline_s: float = 10.0) -> bool:
    """Every process exited (reaping our own children), polled until a deadline."""
    waiting = set(pids)
    deadline = time.monotonic() + deadline_s
    while waiting and time.monotonic() < deadline:
        waiting = {pid for pid in waiting if not reap_and_check_gone(pid)}
        if waiting:
            time.sleep(0.05)
    return not waiting


def pids(directory: Path) -> dict[int, int]:
    record = cluster_file.load(directory)
    assert record is not None
    return {node.id: node.pid for node in record.nodes if node.pid is not None}


# -- configuration ---------------------------------------------------------------------------


def test_node_toml_parses_back_to_the_planned_cluster(tmp_path: Path):
    odd = tmp_path / 'dir "with" quotes\\ and é and\ttab'
    nodes = [PlannedNode(i, 7000 + i, 7100 + i, odd / f"node{i}") for i in (1, 2, 3)]
    parsed = tomllib.loads(node_toml(nodes[1], nodes, shards=16, replication=3))
    assert parsed["node_id"] == 2
    assert parsed["data_dir"] == str(odd / "node2")
    assert parsed["client_listen"] == "127.0.0.1:7002"
    assert parsed["peer_listen"] == "127.0.0.1:7102"
    assert parsed["cluster"]["shards"] == 16
    assert parsed["cluster"]["replication"] == 3
    assert parsed["cluster"]["nodes"] == [
        {
            "id": i,
            "client_url": f"http://127.0.0.1:{7000 + i}",
            "peer_address": f"127.0.0.1:{7100 + i}",
        }
        for i in (1, 2, 3)
    ]


def test_base_port_gives_consecutive_client_ports_and_peer_ports_100_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("cli.cluster_plan.is_port_free", lambda port: True)
    nodes = plan_nodes(3, tmp_path, base_port=20000)
    assert [(n.id, n.client_port, n.peer_port) for n in nodes] == [
        (1, 20000, 20100),
        (2, 20001, 20101),
        (3, 20002, 20102),
    ]
    assert nodes[0].data_dir == tmp_path.resolve() / "node1"
    with pytest.raises(InvalidUsage):
        plan_nodes(101, tmp_path, base_port=20000)


def test_a_busy_base_port_is_refused_with_a_hint(tmp_path: Path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(KvctlError, match=f"{port}.*pick another --base-port"):
            plan_nodes(1, tmp_path, base_port=port)


def test_free_ports_are_distinct(tmp_path: Path):
    nodes = plan_nodes(5, tmp_path, base_port=None)
    ports = [n.client_port for n in nodes] + [n.peer_port for n in nodes]
    assert len(set(ports)) == 10


# -- up / down / restart with real processes -------------------------------------------------


def test_cluster_up_writes_configs_and_cluster_json_and_down_stops_every_node(data_dir, run):
    result = run(
        "cluster", "up", "--nodes", "3", "--shards", "4", "--replication", "2",
        "--data-dir", str(data_dir),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cluster is up: 3 nodes, 4 shards, replication 2" in result.stdout
    record = json.loads((data_dir / "cluster.json").read_text())
    assert record["shards"] == 4
    assert record["replication"] == 2
    assert record["created"]
    assert [node["id"] for node in record["nodes"]] == [1, 2, 3]
    for node in record["nodes"]:
        config_path = data_dir.resolve() / f"node{node['id']}" / "node.toml"
        config = tomllib.loads(config_path.read_text())
        assert config["node_id"] == node["id"]
        assert config["data_dir"] == node["data_dir"] == str(config_path.parent)
        assert "http://" + config["client_listen"] == node["client_url"]
        assert config["peer_listen"] == node["peer_address"]
        assert config["cluster"]["shards"] == 4
        assert len(config["cluster"]["nodes"]) == 3
        assert node["argv"] == [sys.executable, str(FAKE_NODE), "--config", str(config_path)]
        assert node["env"] == {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        assert processes.is_running(processes.NodeProcess(node["pid"], config_path))
        log = config_path.parent / "node.log"  # ready means one node answered, not all yet
        wait_for(f"{log} to show the node serving", lambda log=log: "serving" in log.read_text())
    started = pids(data_dir)

    status = run("cluster", "status", env={"KVCTL_DATA_DIR": str(data_dir)})
    assert status.exit_code == 0, status.output
    assert "HEALTHY" in status.stdout

    down = run("cluster", "down", "--data-dir", str(data_dir))
    assert down.exit_code == 0, down.output
    assert down.stdout.count(": stopped") == 3
    assert all_gone(started.values())
    assert pids(data_dir) == {}
    again = run("cluster", "down", "--data-dir", str(data_dir))
    assert again.stdout.count(": not running") == 3


def test_cluster_up_again_keeps_running_nodes_and_restarts_dead_ones(data_dir, run):
    assert_ok(run("cluster", "up", "-n", "3", "-s", "2", "-d", str(data_dir)))
    before = pids(data_dir)
    config_before = (data_dir / "node2" / "node.toml").read_text()
    os.kill(before[2], signal.SIGKILL)
    wait_for("node 2 to die", lambda: reap_and_check_gone(before[2]))

    result = run("cluster", "up", "-d", str(data_dir))
    assert result.exit_code == 0, result.output
    assert "reusing the cluster" in result.stderr
    assert "started nodes: 2" in result.stderr
    after = pids(data_dir)
    assert after[1] == before[1]
    assert after[3] == before[3]
    assert after[2] != before[2]
    assert (data_dir / "node2" / "node.toml").read_text() == config_before
    assert run("cluster", "down", "-d", str(data_dir)).exit_code == 0
    assert all_gone(after.values())


def test_cluster_up_refuses_flags_that_differ_from_the_existing_cluster(data_dir, run):
    assert_ok(run("cluster", "up", "-n", "1", "-s", "2", "-r", "1", "-d", str(data_dir)))
    cluster_json = (data_dir / "cluster.json").read_text()
    result = run("cluster", "up", "--nodes", "3", "--shards", "2", "-d", str(data_dir))
    assert result.exit_code == EXIT_USAGE
    assert "--nodes 3 (it has 1)" in result.stderr
    assert "--shards" not in result.stderr.split("you asked for", 1)[1].split(".")[0]
    assert (data_dir / "cluster.json").read_text() == cluster_json
    assert_ok(run("cluster", "up", "-n", "1", "-s", "2", "-r", "1", "-d", str(data_dir)))
    assert run("cluster", "down", "-d", str(data_dir)).exit_code == 0


def test_replication_above_the_node_count_is_a_usage_error(data_dir, run):
    result = run("cluster", "up", "--nodes", "2", "--replication", "3", "-d", str(data_dir))
    assert result.exit_code == EXIT_USAGE
    assert not (data_dir / "cluster.json").exists()


def test_node_restart_replaces_the_process_and_records_the_new_pid(data_dir, run):
    assert_ok(run("cluster", "up", "-n", "2", "-r", "2", "-s", "1", "-d", str(data_dir)))
    before = pids(data_dir)
    result = run("node", "restart", "2", "-d", str(data_dir), "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["previous"] == "stopped"
    after = pids(data_dir)
    assert after[2] == answer["pid"] != before[2]
    assert after[1] == before[1]
    assert reap_and_check_gone(before[2])
    assert "kvctl started" in (data_dir / "node2" / "node.log").read_text().split("fake node 2")[1]
    assert run("cluster", "down", "-d", str(data_dir)).exit_code == 0
    assert all_gone(after.values())


def test_restarting_an_unknown_node_names_the_known_ones(data_dir, run):
    assert_ok(run("cluster", "up", "-n", "1", "-r", "1", "-s", "1", "-d", str(data_dir)))
    result = run("node", "restart", "9", "-d", str(data_dir))
    assert result.exit_code != 0
    assert "no node 9" in result.stderr
    assert run("cluster", "down", "-d", str(data_dir)).exit_code == 0


def test_cluster_up_times_out_with_each_nodes_log_when_shards_lack_leaders(
    data_dir, run, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("FAKE_NODE_NO_LEADER", "1")
    result = run("cluster", "up", "-n", "2", "-r", "2", "-d", str(data_dir), "--ready-timeout", "1")
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "0/8 shards have a leader" in result.stderr
    assert "last lines of" in result.stderr
    assert "fake node 1 serving" in result.stderr
    assert "kvctl cluster down --data-dir" in result.stderr
    started = pids(data_dir)
    assert run("cluster", "down", "-d", str(data_dir)).exit_code == 0
    assert all_gone(started.values())


def test_cluster_up_reports_a_node_that_exits_with_its_log(data_dir, run, monkeypatch):
    monkeypatch.setenv("FAKE_NODE_EXIT", "1")
    result = run("cluster", "up", "-n", "1", "-r", "1", "-d", str(data_dir))
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "exited while the cluster was starting" in result.stderr
    assert "exiting as asked by FAKE_NODE_EXIT" in result.stderr


def test_cluster_up_refuses_a_directory_with_node_data_but_no_cluster_json(data_dir, run):
    (data_dir / "node1").mkdir(parents=True)
    result = run("cluster", "up", "-d", str(data_dir))
    assert result.exit_code != 0
    assert "no cluster.json" in result.stderr


def test_down_without_a_cluster_points_at_data_dir(tmp_path, run):
    result = run("cluster", "down", "-d", str(tmp_path / "nothing"))
    assert result.exit_code != 0
    assert "--data-dir" in result.stderr


# -- process safety ---------------------------------------------------------------------------


def test_a_pid_whose_command_line_lacks_the_config_is_never_signalled(tmp_path: Path):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        impostor = processes.NodeProcess(stranger.pid, tmp_path / "node1" / "node.toml")
        assert not processes.is_running(impostor)
        assert processes.stop_all([impostor], timeout_s=0.1) == ["not running"]
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(timeout=10)


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FAKE_NODE_IGNORE_SIGTERM", "1")
    plan = plan_nodes(1, tmp_path, base_port=None)
    (tmp_path / "node1").mkdir()
    plan[0].config_path.write_text(node_toml(plan[0], plan, shards=1, replication=1))
    argv = [sys.executable, str(FAKE_NODE), "--config", str(plan[0].config_path)]
    pid = processes.spawn(argv, {}, tmp_path / "node1" / "node.log")
    node = processes.NodeProcess(pid, plan[0].config_path)
    try:
        wait_for(
            "the stand-in to serve (its SIGTERM handler is set by then)",
            lambda: "serving" in (tmp_path / "node1" / "node.log").read_text(),
        )
        assert processes.stop_all([node], timeout_s=0.3) == ["killed"]
        assert all_gone([pid])
    finally:
        if not is_gone(pid):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# -- foreground --------------------------------------------------------------------------------


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    stream.close()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_foreground_stops_every_node_on_a_signal(data_dir, tmp_path: Path, stop_signal):
    kvctl = subprocess.Popen(
        [sys.executable, "-m", "cli", "cluster", "up", "--foreground", "-n", "2", "-r", "2",
         "-s", "2", "-d", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(kvctl.stdout, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:

        def cluster_is_up() -> bool:
            while not lines.empty():
                seen.append(lines.get())
            return any("running in the foreground" in line for line in seen)

        wait_for("the foreground cluster to be up", cluster_is_up)
        started = pids(data_dir)
        assert len(started) == 2
        kvctl.send_signal(stop_signal)
        assert kvctl.wait(timeout=DEADLINE_S) == 0
    finally:
        if kvctl.poll() is None:
            kvctl.kill()
            kvctl.wait(timeout=10)
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    output = "".join(seen)
    assert "stopping every node" in output
    assert output.count(": stopped") == 2
    assert all_gone(started.values())
