"""`kvctl node add`, `kvctl node remove`, `kvctl rebalance` and `kvctl shard split`: grow,
shrink, watch the balancer, split a shard. They change the cluster through the HTTP admin
routes only, and follow the work through /v1/cluster (moves and splits in progress, replicas
per node, `balanced`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from cli import cluster_file, launcher
from cli.client import ClusterStatus, KVClient
from cli.cluster_commands import data_dir_option, node_group
from cli.errors import ClusterUnavailable, KvctlError
from cli.output import print_json, stdout_console
from cli.settings import client_options, json_option, seconds_option, settings_of

_POLL_INTERVAL_S = 0.5


def moves_left_to_balance(status: ClusterStatus) -> int:
    """About how many replica moves the balancer still has to make: replicas on nodes that
    are leaving (draining or down), plus what active nodes hold above an even share."""
    nodes = status.get("nodes", [])
    active = [n for n in nodes if not (n.get("draining") or n.get("down"))]
    leaving = sum(n.get("replicas", 0) for n in nodes if n not in active)
    total = sum(n.get("replicas", 0) for n in nodes)
    share = math.ceil(total / len(active)) if active else 0
    over = sum(max(0, n.get("replicas", 0) - share) for n in active)
    return leaving + over + len(status.get("moves", []))


def _node_ids(status: ClusterStatus) -> set[int]:
    return {int(node["id"]) for node in status.get("nodes", [])}


def wait_with_bar(
    client: KVClient,
    *,
    what: str,
    remaining: Callable[[ClusterStatus], int],
    is_done: Callable[[ClusterStatus], bool],
    timeout_s: float,
    show_bar: bool,
) -> ClusterStatus:
    """Polls /v1/cluster until is_done, drawing `remaining` as a progress bar."""
    deadline = time.monotonic() + timeout_s
    status = client.cluster_status()
    total = max(remaining(status), 1)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[left]}"))
    with Progress(*columns, TimeElapsedColumn(), disable=not show_bar) as progress:
        task = progress.add_task(what, total=total, left="")
        while not is_done(status):
            if time.monotonic() > deadline:
                raise ClusterUnavailable(
                    f"{what}: not done after {timeout_s:g}s ({remaining(status)} moves left); "
                    "`kvctl cluster status` shows the moves in progress"
                )
            left = remaining(status)
            total = max(total, left)
            progress.update(task, total=total, completed=total - left, left=f"{left} left")
            time.sleep(_POLL_INTERVAL_S)
            try:
                status = client.cluster_status()
            except KvctlError:
                continue  # a node being drained or killed may not answer; ask again
        progress.update(task, total=total, completed=total, left="done")
    return status


_TIMEOUT_OPTION = seconds_option(
    "--wait-timeout", 600.0, "with --wait: give up (exit 4) after this long"
)
_WAIT_OPTION = click.option("--wait", is_flag=True, help="show a progress bar until done")


@node_group.command("add")
@data_dir_option
@_WAIT_OPTION
@_TIMEOUT_OPTION
@json_option()
def add_command(data_dir: Path | None, wait: bool, wait_timeout: float) -> None:
    """Start a new node for the local cluster and join it; the balancer moves replicas to it.

    \b
    Examples:
      kvctl node add --wait
    """
    data_dir = data_dir or cluster_file.default_data_dir()
    node = launcher.add_node(data_dir)
    json_output = settings_of(click.get_current_context()).json_output
    if not json_output:
        stdout_console().print(Text(f"node {node.id} started (pid {node.pid}) and joined"))
    if wait:
        record = launcher.load_cluster(data_dir)
        launcher.wait_until_healthy(record, node, timeout_s=60.0)
        wait_with_bar(
            record.client(),
            what=f"balancing onto node {node.id}",
            remaining=moves_left_to_balance,
            is_done=lambda status: bool(status.get("balanced")),
            timeout_s=wait_timeout,
            show_bar=not json_output,
        )
    if json_output:
        print_json({"id": node.id, "pid": node.pid, "client_url": node.client_url})


@node_group.command("remove")
@click.argument("node_id", metavar="ID", type=click.IntRange(min=1))
@client_options
@_WAIT_OPTION
@_TIMEOUT_OPTION
@data_dir_option
def remove_command(node_id: int, wait: bool, wait_timeout: float, data_dir: Path | None) -> None:
    """Drain node ID: its replicas and leaderships move to other nodes, then it leaves the
    cluster. With --wait, waits for that and, for a local cluster, stops its process.

    \b
    Examples:
      kvctl node remove 3 --wait
    """
    settings = settings_of(click.get_current_context())
    client = settings.client()
    epoch = client.drain_node(node_id)
    if not settings.json_output:
        stdout_console().print(Text(f"node {node_id} is draining (shard map epoch {epoch})"))
    stopped = None
    if wait:

        def replicas_left(status: ClusterStatus) -> int:
            nodes = [n for n in status.get("nodes", []) if int(n["id"]) == node_id]
            return nodes[0].get("replicas", 0) + 1 if nodes else 0

        wait_with_bar(
            client,
            what=f"draining node {node_id}",
            remaining=replicas_left,
            is_done=lambda status: node_id not in _node_ids(status),
            timeout_s=wait_timeout,
            show_bar=not settings.json_output,
        )
        local = data_dir or cluster_file.default_data_dir()
        record = cluster_file.load(local)
        if record is not None and any(node.id == node_id for node in record.nodes):
            stopped = launcher.forget_node(local, node_id)
    if settings.json_output:
        print_json({"id": node_id, "epoch": epoch, "left": wait, "process": stopped})
    elif wait:
        ended = f"; its process: {stopped}" if stopped else ""
        stdout_console().print(Text(f"node {node_id} has left the cluster{ended}"))


@click.command("rebalance", short_help="Show (or wait for) the balancer's progress.")
@client_options
@_WAIT_OPTION
@_TIMEOUT_OPTION
def rebalance_command(wait: bool, wait_timeout: float) -> None:
    """The balancer runs by itself on the meta leader: it evens out replicas and leaders and
    re-creates replicas of down nodes. This shows how far it is; --wait follows it to the end.

    \b
    Examples:
      kvctl rebalance --wait
    """
    settings = settings_of(click.get_current_context())
    client = settings.client()
    status = client.cluster_status()
    if wait:
        status = wait_with_bar(
            client,
            what="rebalancing",
            remaining=moves_left_to_balance,
            is_done=lambda s: bool(s.get("balanced")),
            timeout_s=wait_timeout,
            show_bar=not settings.json_output,
        )
    summary = {
        "balanced": bool(status.get("balanced")),
        "moves": status.get("moves", []),
        "moves_left": moves_left_to_balance(status),
    }
    if settings.json_output:
        print_json(summary)
        return
    state = "balanced" if summary["balanced"] else f"balancing: ~{summary['moves_left']} moves left"
    stdout_console().print(Text(state))


@click.group("shard", short_help="Split a shard.")
def shard_group() -> None:
    """Operations on one shard (`kvctl shards` lists them)."""


@shard_group.command("split")
@click.argument("shard_id", metavar="ID", type=click.IntRange(min=1))
@client_options
@_WAIT_OPTION
@_TIMEOUT_OPTION
def split_command(shard_id: int, wait: bool, wait_timeout: float) -> None:
    """Cut shard ID in two at the middle of its token range: a new shard on the same replicas
    takes the upper half's keys. Every key stays readable meanwhile.

    \b
    Examples:
      kvctl shard split 3 --wait
    """
    settings = settings_of(click.get_current_context())
    client = settings.client()
    epoch = client.split_shard(shard_id)
    if not settings.json_output:
        stdout_console().print(Text(f"shard {shard_id} is splitting (shard map epoch {epoch})"))
    child = None
    if wait:

        def splitting(status: ClusterStatus) -> int:
            return sum(1 for split in status.get("splits", []) if split["shard"] == shard_id)

        status = wait_with_bar(
            client,
            what=f"splitting shard {shard_id}",
            remaining=splitting,
            # Past the split's own epoch: a node whose map lags the split shows none under way.
            is_done=lambda status: int(status.get("epoch", 0)) > epoch and splitting(status) == 0,
            timeout_s=wait_timeout,
            show_bar=not settings.json_output,
        )
        child = _upper_half_of(status, shard_id)
    if settings.json_output:
        print_json({"shard": shard_id, "epoch": epoch, "done": wait, "child": child})
    elif wait:
        stdout_console().print(Text(f"shard {shard_id} split; shard {child} holds its upper half"))


def _upper_half_of(status: ClusterStatus, shard_id: int) -> int | None:
    """The shard whose range starts where shard_id's ends (its split's child, just after)."""
    shards = {shard["id"]: shard for shard in status.get("shards", [])}
    end = shards[shard_id]["end_token"] if shard_id in shards else None
    return next((i for i, shard in shards.items() if shard["start_token"] == end), None)


ELASTIC_COMMANDS = (rebalance_command, shard_group)
