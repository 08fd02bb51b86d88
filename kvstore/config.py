"""Node configuration: a TOML file, overridden by environment variables, overridden by flags."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvstore.query.spec import DEFAULT_LIMITS
from kvstore.query_runner import QuerySettings
from kvstore.service import Limits
from kvstore.sharding import NodeInfo
from kvstore.tls import TlsFiles
from raft.core.types import MAX_NODE_ID, NodeId


class ConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """[auth]: bearer tokens checked on every client route (off unless enabled)."""

    enabled: bool = False
    # SHA-256 (hex) of the first admin's token: the founding nodes write user "admin" with it
    # into the initial metadata, as they write the initial shard map. Same in every node's file.
    bootstrap_admin_token_sha256: str | None = None
    # Without TLS, peers prove themselves on the internal routes with this shared secret.
    cluster_secret_file: Path | None = None

    def cluster_secret(self) -> str | None:
        if self.cluster_secret_file is None:
            return None
        try:
            secret = self.cluster_secret_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"cannot read auth.cluster_secret_file: {error}") from error
        if len(secret) < 32:
            raise ConfigError("auth.cluster_secret_file must hold at least 32 characters")
        return secret


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
    query: QuerySettings = field(default_factory=QuerySettings)
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
    split_keys: int = 0  # a shard holding more keys than this is split in two (0: never)
    # How often this node checks that the replicas of the shards it leads agree (0: never).
    check_interval_s: float = 300.0
    tls: TlsFiles | None = None  # [tls]: HTTPS for clients, mutual TLS between peers
    auth: AuthConfig = field(default_factory=AuthConfig)
    # [encryption] key_file: AES-GCM keys for values at rest (see kvstore.encryption).
    encryption_key_file: Path | None = None


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


def _query_settings(raw: dict[str, Any]) -> QuerySettings:
    settings = dict(raw)
    limits = replace(DEFAULT_LIMITS, **settings.pop("limits", {}))
    return QuerySettings(**settings, limits=limits)


def _path(raw: Any, base: Path, what: str) -> Path:
    """A path from the config; a relative one is relative to the config file's directory."""
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{what} must be a file path")
    path = Path(raw)
    return path if path.is_absolute() else base / path


def _tls(raw: dict[str, Any], base: Path) -> TlsFiles | None:
    if not raw:
        return None
    files = TlsFiles(
        _path(raw.get("ca_file"), base, "tls.ca_file"),
        _path(raw.get("cert_file"), base, "tls.cert_file"),
        _path(raw.get("key_file"), base, "tls.key_file"),
    )
    for path in (files.ca_file, files.cert_file, files.key_file):
        if not path.is_file():
            raise ConfigError(f"[tls] names {path}, which is not a readable file")
    return files


def _auth(raw: dict[str, Any], base: Path) -> AuthConfig:
    digest = raw.get("bootstrap_admin_token_sha256")
    if digest is not None and (
        not isinstance(digest, str)
        or len(digest) != 64
        or any(c not in "0123456789abcdef" for c in digest)
    ):
        raise ConfigError("auth.bootstrap_admin_token_sha256 must be 64 lower-case hex digits")
    secret_file = raw.get("cluster_secret_file")
    return AuthConfig(
        enabled=bool(raw.get("enabled", False)),
        bootstrap_admin_token_sha256=digest,
        cluster_secret_file=None
        if secret_file is None
        else _path(secret_file, base, "auth.cluster_secret_file"),
    )


_ENV_PREFIX = "KVSTORE_"
_CHECK_INTERVAL_ENV = _ENV_PREFIX + "CHECK_INTERVAL_S"  # overrides [integrity] check_interval_s
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
    base = args.config.parent if args.config is not None else Path.cwd()
    cluster = raw.get("cluster", {})
    limits_raw = raw.get("limits", {})
    raft_raw = raw.get("raft", {})
    elastic_raw = raw.get("elastic", {})
    check_interval_s = os.environ.get(_CHECK_INTERVAL_ENV) or raw.get("integrity", {}).get(
        "check_interval_s", 300.0
    )
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
            query=_query_settings(raw.get("query", {})),
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
            split_keys=int(elastic_raw.get("split_keys", 0)),
            check_interval_s=float(check_interval_s),
            tls=_tls(raw.get("tls", {}), base),
            auth=_auth(raw.get("auth", {}), base),
            encryption_key_file=None
            if "key_file" not in raw.get("encryption", {})
            else _path(raw["encryption"]["key_file"], base, "encryption.key_file"),
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
    if config.split_keys < 0:
        raise ConfigError(f"[elastic] split_keys must be >= 0 (0: never), got {config.split_keys}")
    if not 1 <= config.node_id <= MAX_NODE_ID:
        raise ConfigError(f"node_id must be from 1 to {MAX_NODE_ID}")
    if not config.check_interval_s >= 0:  # also refuses NaN
        raise ConfigError(f"check_interval_s must be >= 0, got {config.check_interval_s}")
    if config.auth.enabled and config.tls is None and config.auth.cluster_secret_file is None:
        raise ConfigError(
            "[auth] enabled without [tls] needs auth.cluster_secret_file: otherwise anyone "
            "could call the internal routes and skip authentication"
        )
    if config.auth.enabled:
        config.auth.cluster_secret()  # fail now, not on the first forwarded request
    if not config.initial_nodes:
        raise ConfigError("the config needs the initial cluster: one [[cluster.nodes]] per node")
    if config.node_id not in {node.id for node in config.initial_nodes}:
        raise ConfigError(f"node {config.node_id} is not listed in [[cluster.nodes]]")
    return config
