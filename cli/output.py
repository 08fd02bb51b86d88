"""How kvctl shows results: rich tables for people, one JSON object per command for scripts.

Nothing a user stored is ever parsed as rich markup: keys and values go into `Text` objects.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.client import ClusterStatus, KeyValue, ShardStatus

TOKEN_SPACE = 1 << 64
PREVIEW_CHARS = 40


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False)


def print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def decoded_text(value: bytes) -> str | None:
    """The value as UTF-8 text, or None when it is not valid UTF-8."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def key_value_json(item: KeyValue) -> dict[str, Any]:
    return {
        "key": item.key,
        "value": base64.b64encode(item.value).decode("ascii"),
        "text": decoded_text(item.value),
        "version": item.version,
    }


def value_preview(value: bytes, limit: int = PREVIEW_CHARS) -> Text:
    """A one-line glimpse: text when it decodes and prints, else the size and leading bytes."""
    text = decoded_text(value)
    if text is not None and text.isprintable():
        if len(text) > limit:
            return Text(text[: limit - 1] + "…")
        return Text(text)
    if text is not None:  # text with newlines, tabs or other controls: show it escaped
        escaped = json.dumps(text, ensure_ascii=False)[1:-1]
        return Text(escaped[: limit - 1] + "…" if len(escaped) > limit else escaped)
    head = value[:8].hex(" ")
    more = " …" if len(value) > 8 else ""
    return Text(f"<{len(value)} bytes: {head}{more}>", style="dim")


def scan_table(items: Iterable[KeyValue]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("KEY", overflow="fold")
    table.add_column("VERSION", justify="right")
    table.add_column("VALUE", overflow="ellipsis", no_wrap=True)
    for item in items:
        table.add_row(Text(item.key), str(item.version), value_preview(item.value))
    return table


def txn_results_table(results: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("OP")
    table.add_column("KEY", overflow="fold")
    table.add_column("VERSION", justify="right")
    table.add_column("VALUE", overflow="ellipsis", no_wrap=True)
    for result in results:
        raw = result.get("value")
        if raw is None:
            value = Text("-" if result.get("op") != "get" else "(absent)", style="dim")
        else:
            try:
                value = value_preview(base64.b64decode(str(raw)))
            except ValueError:
                value = Text(str(raw))
        table.add_row(
            Text(str(result.get("op", "?"))),
            Text(str(result.get("key", ""))),
            str(result.get("version", "")),
            value,
        )
    return table


def token_range(shard: ShardStatus) -> Text:
    """[start, end) as inclusive 16-digit hex bounds, one per line, and its share of the ring."""
    start, end = int(shard["start_token"]), int(shard["end_token"])
    share = 100 * (end - start) / TOKEN_SPACE
    return Text(f"{start:016x}\n{max(end - 1, start):016x}\n{share:.3g}% of the ring")


def shards_table(shards: Sequence[ShardStatus]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("SHARD", justify="right")
    table.add_column("TOKEN RANGE", no_wrap=True)
    table.add_column("LEADER", justify="right")
    table.add_column("TERM", justify="right")
    table.add_column("REPLICAS: ROLE COMMIT/APPLIED", no_wrap=True)
    for shard in sorted(shards, key=lambda shard: int(shard["id"])):
        leader = int(shard.get("leader") or 0)
        replica_lines = Text()
        statuses: Sequence[Mapping[str, Any]] = shard.get("replica_status") or [
            {"node": node, "role": "?"} for node in shard.get("replicas", [])
        ]
        for index, replica in enumerate(statuses):
            if index:
                replica_lines.append("\n")
            replica_lines.append(_replica_line(replica))
        table.add_row(
            str(shard["id"]),
            token_range(shard),
            str(leader) if leader else Text("none", style="bold red"),
            str(shard.get("term", "")),
            replica_lines,
        )
    return table


def _replica_line(replica: Mapping[str, Any]) -> Text:
    node = replica.get("node", "?")
    if not replica.get("reachable", True):
        return Text(f"{node}: unreachable", style="red")
    role = str(replica.get("role", "?"))
    line = f"{node}: {role} {replica.get('commit_index', '?')}/{replica.get('applied_index', '?')}"
    return Text(line, style="bold" if role == "leader" else "")


def cluster_summary(status: ClusterStatus) -> list[Text]:
    shards = status.get("shards", [])
    without_leader = [shard for shard in shards if not shard.get("leader")]
    unreachable = [node for node in status.get("nodes", []) if not node.get("reachable", True)]
    healthy = bool(status.get("healthy"))
    verdict = (
        Text("HEALTHY", style="bold green") if healthy else Text("UNHEALTHY", style="bold red")
    )
    head = Text(f"cluster {status.get('cluster_id', '?')}  epoch {status.get('epoch', '?')}  ")
    head.append(verdict)
    lines = [head]
    lines.append(
        Text(f"shards: {len(shards)} total, {len(shards) - len(without_leader)} with a leader")
    )
    if without_leader:
        ids = ", ".join(str(shard["id"]) for shard in without_leader)
        lines.append(Text(f"shards without a leader: {ids}", style="red"))
    if unreachable:
        ids = ", ".join(str(node["id"]) for node in unreachable)
        lines.append(Text(f"unreachable nodes: {ids}", style="red"))
    for flag, style in (("down", "red"), ("draining", "yellow")):
        flagged = [str(node["id"]) for node in status.get("nodes", []) if node.get(flag)]
        if flagged:
            lines.append(Text(f"{flag} nodes: {', '.join(flagged)}", style=style))
    moves = status.get("moves", [])
    for move in moves:
        lines.append(
            Text(
                f"moving: group {move['group']} replica node {move['from_node']} -> "
                f"node {move['to_node']}",
                style="yellow",
            )
        )
    for split in status.get("splits", []):
        lines.append(
            Text(f"splitting: shard {split['shard']} -> new shard {split['child']}", style="yellow")
        )
    if "balanced" in status:
        lines.append(Text("placement: balanced" if status["balanced"] else "placement: balancing"))
    return lines


def nodes_table(status: ClusterStatus) -> Table:
    leads: dict[int, int] = {}
    holds: dict[int, int] = {}
    for shard in status.get("shards", []):
        leader = int(shard.get("leader") or 0)
        if leader:
            leads[leader] = leads.get(leader, 0) + 1
        for replica in shard.get("replicas", []):
            holds[int(replica)] = holds.get(int(replica), 0) + 1
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("NODE", justify="right")
    table.add_column("CLIENT URL", overflow="fold")
    table.add_column("PEER ADDRESS", overflow="fold")
    table.add_column("REACHABLE")
    table.add_column("REPLICAS", justify="right")
    table.add_column("LEADS", justify="right")
    for node in sorted(status.get("nodes", []), key=lambda node: int(node["id"])):
        node_id = int(node["id"])
        reachable = node.get("reachable", True)
        table.add_row(
            str(node_id),
            Text(str(node.get("client_url", ""))),
            Text(str(node.get("peer_address", ""))),
            Text("yes", style="green") if reachable else Text("no", style="bold red"),
            str(holds.get(node_id, 0)),
            str(leads.get(node_id, 0)),
        )
    return table
