"""kvctl's cluster commands: `cluster up/down/status`, `shards`, `node restart`.

`status` and `shards` ask a node over HTTP; `up`, `down` and `node restart` manage local node
processes through cli.launcher and the cluster.json it keeps in the data directory.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from cli import cluster_file, launcher, processes
from cli.cluster_file import ClusterRecord
from cli.errors import ClusterUnavailable
from cli.output import (
    cluster_summary,
    nodes_table,
    print_json,
    shards_table,
    stderr_console,
    stdout_console,
)
from cli.settings import (
    client_options,
    json_option,
    running_in_terminal,
    seconds_option,
    settings_of,
)

FOREGROUND_STATUS_INTERVAL_S = 5.0


def data_dir_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--data-dir",
        "-d",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        envvar=cluster_file.DATA_DIR_ENV,
        show_envvar=True,
        help=f"where the cluster lives [default: {cluster_file.DEFAULT_DATA_DIR}]",
    )(command)


def _json_output() -> bool:
    return settings_of(click.get_current_context()).json_output


# -- status over HTTP ------------------------------------------------------------------------


@click.group("cluster", short_help="Start, stop and inspect a local cluster.")
def cluster_group() -> None:
    """Start, stop and inspect a cluster.

    \b
    Examples:
      kvctl cluster up                # 3 nodes, 8 shards, replication 3, in ./data/cluster
      kvctl cluster status
      kvctl cluster down
    """


@cluster_group.command("status")
@client_options
def status_command() -> None:
    """Show the nodes, whether every shard has a leader, and overall health.

    \b
    Examples:
      kvctl cluster status
      kvctl cluster status --endpoints http://10.0.0.5:7001 --json
    """
    settings = settings_of(click.get_current_context())
    status = settings.client().cluster_status()
    if settings.json_output:
        print_json(status)
        return
    console = stdout_console()
    for line in cluster_summary(status):
        console.print(line)
    console.print()
    console.print(nodes_table(status))
    console.print(Text("`kvctl shards` shows every shard's replicas and progress", style="dim"))


@click.command("shards", short_help="Show every shard's range, replicas, leader.")
@client_options
def shards_command() -> None:
    """Show every shard: token range, replicas, leader, term, commit/applied per replica.

    \b
    Examples:
      kvctl shards
      kvctl shards --json | jq '.shards[] | select(.leader == 0)'
    """
    settings = settings_of(click.get_current_context())
    status = settings.client().cluster_status()
    if settings.json_output:
        print_json({"epoch": status.get("epoch"), "shards": status.get("shards", [])})
        return
    console = stdout_console()
    console.print(shards_table(status.get("shards", [])))


# -- the local launcher ----------------------------------------------------------------------


@cluster_group.command("up")
@click.option(
    "--nodes",
    "-n",
    type=click.IntRange(min=1),
    help=f"how many node processes [default: {launcher.DEFAULT_NODES}]",
)
@click.option(
    "--shards",
    "-s",
    type=click.IntRange(min=1),
    help=f"how many shards (Raft groups) [default: {launcher.DEFAULT_SHARDS}]",
)
@click.option(
    "--replication",
    "-r",
    type=click.IntRange(min=1),
    help=f"replicas per shard, at most --nodes [default: {launcher.DEFAULT_REPLICATION}]",
)
@data_dir_option
@click.option(
    "--base-port",
    type=click.IntRange(min=1, max=65535),
    metavar="P",
    help="client ports P, P+1, ...; peer ports P+100, ... [default: free ports]",
)
@click.option(
    "--foreground",
    is_flag=True,
    help="stay attached, print status every few seconds, stop every node on Ctrl-C",
)
@click.option(
    "--tls",
    is_flag=True,
    help="new cluster: dev certificates in DATA_DIR/certs, HTTPS, mutual TLS between nodes",
)
@click.option(
    "--auth",
    is_flag=True,
    help="new cluster: bearer tokens required; the admin token goes to DATA_DIR/admin.token",
)
@click.option(
    "--encrypt",
    is_flag=True,
    help="new cluster: values encrypted at rest (AES-GCM, keys in DATA_DIR/encryption.keys)",
)
@seconds_option("--ready-timeout", 60.0, "how long to wait for every shard to have a leader")
@json_option()
def up_command(
    nodes: int | None,
    shards: int | None,
    replication: int | None,
    data_dir: Path | None,
    base_port: int | None,
    foreground: bool,
    tls: bool,
    auth: bool,
    encrypt: bool,
    ready_timeout: float,
) -> None:
    """Start a local cluster of node processes on 127.0.0.1 (or restart a stopped one).

    Writes DATA_DIR/node{i}/node.toml and DATA_DIR/cluster.json, starts the nodes in the
    background (logs in DATA_DIR/node{i}/node.log) and waits until every shard has a leader.
    Run again on the same DATA_DIR to restart whichever nodes are not running; the flags
    must then match the existing cluster (or be left out).

    \b
    Examples:
      kvctl cluster up
      kvctl cluster up --nodes 5 --shards 16 --replication 3 --data-dir /tmp/kv
      kvctl cluster up --foreground     # Ctrl-C stops the cluster
      kvctl cluster up --tls --auth     # HTTPS, mTLS between nodes, tokens (docs/security.md)
    """
    data_dir = data_dir or cluster_file.default_data_dir()
    request = launcher.UpRequest(
        data_dir, nodes, shards, replication, base_port, tls, auth, encrypt
    )
    json_output = _json_output()
    result = launcher.start_cluster(request)
    _report_started(result, data_dir, json_output)
    if foreground:
        _run_in_foreground(result.record, data_dir, ready_timeout, json_output)
        return
    try:
        _wait_with_progress(result.record, ready_timeout, json_output)
    except ClusterUnavailable as error:
        error.message += (
            f"\nThe nodes were left running: look at `kvctl cluster status`, or stop them with "
            f"`kvctl cluster down{_data_dir_flag(data_dir)}`."
        )
        raise
    _report_ready(launcher.load_cluster(data_dir), data_dir, result, json_output)


def _data_dir_flag(data_dir: Path) -> str:
    return "" if data_dir == cluster_file.default_data_dir() else f" --data-dir {data_dir}"


def _report_started(result: launcher.UpResult, data_dir: Path, json_output: bool) -> None:
    if json_output:
        return
    console = stderr_console()
    how = "created a new cluster" if result.created else "reusing the cluster"
    started = ", ".join(str(node_id) for node_id in result.started) or "none (all were running)"
    console.print(Text(f"{how} in {data_dir}; started nodes: {started}"))


def _wait_with_progress(record: ClusterRecord, timeout_s: float, json_output: bool) -> None:
    console = stderr_console()
    if json_output:
        launcher.wait_until_ready(record, timeout_s=timeout_s, on_progress=lambda _: None)
    elif running_in_terminal():
        with console.status("waiting for every shard to elect a leader") as spinner:
            launcher.wait_until_ready(
                record,
                timeout_s=timeout_s,
                on_progress=lambda text: spinner.update(f"waiting: {text}"),
            )
    else:
        launcher.wait_until_ready(
            record,
            timeout_s=timeout_s,
            on_progress=lambda text: console.print(Text(f"waiting: {text}")),
        )


def _report_ready(
    record: ClusterRecord, data_dir: Path, result: launcher.UpResult, json_output: bool
) -> None:
    if json_output:
        print_json(
            {
                "data_dir": str(data_dir.resolve()),
                "created": result.created,
                "started": list(result.started),
                "endpoints": record.endpoints,
                **record.to_json(),
            }
        )
        return
    console = stdout_console()
    console.print(
        Text(
            f"cluster is up: {_count(len(record.nodes), 'node')}, "
            f"{_count(record.shards, 'shard')}, replication {record.replication}, "
            f"data in {data_dir}",
            style="bold green",
        )
    )
    for node in record.nodes:
        console.print(Text(f"  node {node.id}  {node.client_url}  pid {node.pid}  {node.log_path}"))
    if record.security.token_file:
        console.print(
            Text(f"  auth is on: kvctl uses the admin token in {record.security.token_file}")
        )
    console.print("try:")
    if data_dir != cluster_file.default_data_dir():
        console.print(Text(f"  export {cluster_file.DATA_DIR_ENV}={data_dir.resolve()}"))
    for example in (
        "kvctl put greeting hello",
        "kvctl get greeting",
        "kvctl scan --prefix greet",
        "kvctl cluster status",
        "kvctl shards",
        f"kvctl node restart 1{_data_dir_flag(data_dir)}",
        f"kvctl cluster down{_data_dir_flag(data_dir)}",
    ):
        console.print(Text(f"  {example}"))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived while the foreground cluster was running."""


@contextmanager
def _stop_signals() -> Iterator[Callable[[], bool]]:
    """The first SIGINT/SIGTERM raises _StopRequested; a second one makes the stop hurry
    (SIGKILL without waiting). Yields "has a second signal arrived?"."""
    signals_seen = 0

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            raise _StopRequested

    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield lambda: signals_seen > 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_in_foreground(
    record: ClusterRecord, data_dir: Path, ready_timeout: float, json_output: bool
) -> None:
    """Owns the cluster until a signal: every node recorded in data_dir is stopped on the way
    out, including any this call found already running."""
    console = stdout_console()
    with _stop_signals() as is_hurried:
        try:
            try:
                _wait_with_progress(record, ready_timeout, json_output)
                record = launcher.load_cluster(data_dir)
                result = launcher.UpResult(record, created=False, started=())
                _report_ready(record, data_dir, result, json_output)
                if not json_output:
                    console.print(Text("running in the foreground: Ctrl-C stops every node"))
                while True:
                    time.sleep(FOREGROUND_STATUS_INTERVAL_S)
                    if not json_output:
                        console.print(_status_line(data_dir))
            except _StopRequested:
                pass
        finally:
            if not json_output:
                stderr_console().print("stopping every node...")
            for node, outcome in launcher.stop_cluster(data_dir, is_hurried=is_hurried):
                if not json_output:
                    stderr_console().print(f"  node {node.id} (pid {node.pid}): {outcome}")


def _status_line(data_dir: Path) -> Text:
    record = launcher.load_cluster(data_dir)
    running = [node for node in record.nodes if processes.is_running(launcher.process_of(node))]
    line = Text(time.strftime("%H:%M:%S "))
    line.append(f"nodes running {len(running)}/{len(record.nodes)}")
    status = launcher.probe_status(record)
    if status is None:
        line.append("  no node answers HTTP", style="red")
    else:
        total = len(status.get("shards", []))
        with_leader = launcher.shards_with_leader(status)
        style = "" if with_leader == total else "red"
        line.append(f"  shards with a leader {with_leader}/{total}", style=style)
    exited = [node.id for node in record.nodes if node not in running]
    if exited:
        line.append(
            f"  exited: {', '.join(map(str, exited))} (see node.log; `kvctl node restart ID`)",
            style="red",
        )
    return line


@cluster_group.command("down")
@data_dir_option
@json_option()
def down_command(data_dir: Path | None) -> None:
    """Stop every node of the local cluster (SIGTERM, then SIGKILL after 10 s).

    Only PIDs recorded in DATA_DIR/cluster.json whose command line still names their node.toml
    are signalled. The data stays: `kvctl cluster up` starts the same cluster again.

    \b
    Examples:
      kvctl cluster down
      kvctl cluster down --data-dir /tmp/kv && rm -rf /tmp/kv
    """
    data_dir = data_dir or cluster_file.default_data_dir()
    outcomes = launcher.stop_cluster(data_dir)
    if _json_output():
        print_json(
            {"nodes": [{"id": node.id, "pid": node.pid, "outcome": o} for node, o in outcomes]}
        )
        return
    for node, outcome in outcomes:
        pid = f"pid {node.pid}" if node.pid is not None else "no pid"
        click.echo(f"node {node.id} ({pid}): {outcome}")
    click.echo(
        f"cluster in {data_dir} is down; `kvctl cluster up{_data_dir_flag(data_dir)}` "
        "starts it again"
    )


@click.group("node", short_help="Add, remove or restart a node.")
def node_group() -> None:
    """Manage one node: add a new one, drain and remove one, restart one of the local cluster.

    \b
    Examples:
      kvctl node add --wait
      kvctl node remove 3 --wait
      kvctl node restart 2
    """


@node_group.command("restart")
@click.argument("node_id", metavar="ID", type=click.IntRange(min=1))
@data_dir_option
@seconds_option("--ready-timeout", 30.0, "how long to wait for the node to answer /health")
@json_option()
def restart_command(node_id: int, data_dir: Path | None, ready_timeout: float) -> None:
    """Stop node ID (SIGTERM, SIGKILL after 10 s) and start it again with the same command.

    \b
    Examples:
      kvctl node restart 2
      kvctl node restart 1 --data-dir /tmp/kv
    """
    data_dir = data_dir or cluster_file.default_data_dir()
    node, previous = launcher.restart_node(data_dir, node_id)
    launcher.wait_until_healthy(launcher.load_cluster(data_dir), node, timeout_s=ready_timeout)
    if _json_output():
        print_json({"id": node.id, "pid": node.pid, "previous": previous})
        return
    console: Console = stdout_console()
    console.print(Text(f"node {node.id} restarted: pid {node.pid} (the old process: {previous})"))


CLUSTER_COMMANDS = (cluster_group, shards_command, node_group)
