"""Node configuration: a TOML file, overridden by environment variables, overridden by flags."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvstore.service import Limits
from kvstore.sharding import NodeInfo
from raft.core.types import MAX_NODE_ID, NodeId


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: NodeId
    data_dir: Path
    client_listen: tuple[str, int]
    peer_listen: tuple[str, int]
    initial_nodes: tuple[NodeInfo, ...]
    shards: int = 8
    replication: int = 3
    limits: Limits = field(default_factory=Limits)
    tick_ms: int = 50
    election_timeout_ticks: int = 10
    request_timeout_s: float = 5.0
    fsync: bool = True
    # How this node reaches a peer, when not by the shard map's addresses: jepsen_like routes
    # every link through a proxy it controls, to cut traffic for partitions.
    peer_address_overrides: dict[NodeId, tuple[str, int]] = field(default_factory=dict)
    client_url_overrides: dict[NodeId, str] = field(default_factory=dict)
    # Test-only fault: linearizable reads served by any replica without ReadIndex. Refused
    # unless the process was started with --unsafe-test-faults.
    unsafe_stale_reads: bool = False
    # Elasticity. join: this node is new to a running cluster; it fetches the shard map from
    # the [[cluster.nodes]] listed (after `kvctl node add` registered it) instead of founding.
    join: bool = False
    down_after_s: float = 300.0  # unreachable this long: its replicas are re-created elsewhere
    max_moves: int = 2  # replica moves in flight at once, cluster-wide
    reconcile_interval_s: float = 0.5


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} must look like HOST:PORT, got {text!r}")
    return host, int(port)


def _nodes(raw: list[dict[str, Any]]) -> tuple[NodeInfo, ...]:
    nodes = []
    for item in raw:
        try:
            nodes.append(
                NodeInfo(
                    NodeId(int(item["id"])),
                    str(item["client_url"]).rstrip("/"),
                    parse_address(str(item["peer_address"]), "cluster.nodes.peer_address"),
                )
            )
        except KeyError as missing:
            raise ConfigError(f"each [[cluster.nodes]] needs {missing}") from None
    ids = [node.id for node in nodes]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"duplicate node ids in [[cluster.nodes]]: {sorted(ids)}")
    return tuple(nodes)


_ENV_PREFIX = "KVSTORE_"
_OVERRIDABLE = ("node_id", "data_dir", "client_listen", "peer_listen")


def load_config(argv: list[str] | None = None) -> NodeConfig:
    parser = argparse.ArgumentParser(
        prog="kvstore-node",
        description="Run one node of the KV store. Settings come from --config FILE (TOML), "
        "then KVSTORE_NODE_ID / KVSTORE_DATA_DIR / KVSTORE_CLIENT_LISTEN / KVSTORE_PEER_LISTEN, "
        "then these flags. `kvctl cluster up` writes the file for you.",
    )
    parser.add_argument("--config", type=Path, help="TOML file (see docs/operations.md)")
    parser.add_argument("--node-id", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--client-listen", help="HOST:PORT of the HTTP API")
    parser.add_argument("--peer-listen", help="HOST:PORT of the Raft transport")
    parser.add_argument(
        "--unsafe-test-faults",
        action="store_true",
        help="allow test-only fault switches (makes the store unsafe; for jepsen_like only)",
    )
    args = parser.parse_args(argv)
    raw: dict[str, Any] = {}
    if args.config is not None:
        try:
            raw = tomllib.loads(args.config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config {args.config}: {error}") from error
    settings = {key: raw.get(key) for key in _OVERRIDABLE}
    for key in _OVERRIDABLE:
        env = os.environ.get(_ENV_PREFIX + key.upper())
        if env:
            settings[key] = env
        flag = getattr(args, key)
        if flag is not None:
            settings[key] = flag
    missing = [key for key in _OVERRIDABLE if settings[key] in (None, "")]
    if missing:
        raise ConfigError(f"missing settings: {', '.join(missing)} (give --config or flags)")
    cluster = raw.get("cluster", {})
    limits_raw = raw.get("limits", {})
    raft_raw = raw.get("raft", {})
    elastic_raw = raw.get("elastic", {})
    try:
        config = NodeConfig(
            node_id=NodeId(int(str(settings["node_id"]))),
            data_dir=Path(str(settings["data_dir"])),
            client_listen=parse_address(str(settings["client_listen"]), "client_listen"),
            peer_listen=parse_address(str(settings["peer_listen"]), "peer_listen"),
            initial_nodes=_nodes(cluster.get("nodes", [])),
            shards=int(cluster.get("shards", 8)),
            replication=int(cluster.get("replication", 3)),
            limits=replace(Limits(), **limits_raw),
            tick_ms=int(raft_raw.get("tick_ms", 50)),
            election_timeout_ticks=int(raft_raw.get("election_timeout_ticks", 10)),
            request_timeout_s=float(raw.get("request_timeout_s", 5.0)),
            fsync=bool(raw.get("fsync", True)),
            peer_address_overrides={
                NodeId(int(node)): parse_address(str(route["peer_address"]), "routes.peer_address")
                for node, route in raw.get("routes", {}).items()
                if "peer_address" in route
            },
            client_url_overrides={
                NodeId(int(node)): str(route["client_url"]).rstrip("/")
                for node, route in raw.get("routes", {}).items()
                if "client_url" in route
            },
            unsafe_stale_reads=bool(raw.get("unsafe", {}).get("stale_reads", False)),
            join=bool(cluster.get("join", False)),
            down_after_s=float(elastic_raw.get("down_after_s", 300.0)),
            max_moves=int(elastic_raw.get("max_moves", 2)),
            reconcile_interval_s=float(elastic_raw.get("reconcile_interval_s", 0.5)),
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid setting: {error}") from error
    if config.unsafe_stale_reads and not args.unsafe_test_faults:
        raise ConfigError(
            "[unsafe] stale_reads makes reads non-linearizable and exists only to prove the "
            "test harness can catch it; refusing to start without --unsafe-test-faults"
        )
    if config.down_after_s <= 0 or config.max_moves < 1 or config.reconcile_interval_s <= 0:
        raise ConfigError("[elastic] down_after_s, max_moves, reconcile_interval_s must be > 0")
    if not 1 <= config.node_id <= MAX_NODE_ID:
        raise ConfigError(f"node_id must be from 1 to {MAX_NODE_ID}")
    if not config.initial_nodes:
        raise ConfigError("the config needs the initial cluster: one [[cluster.nodes]] per node")
    if config.node_id not in {node.id for node in config.initial_nodes}:
        raise ConfigError(f"node {config.node_id} is not listed in [[cluster.nodes]]")
    return config
