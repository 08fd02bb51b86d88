"""cluster.json: what `kvctl cluster up` launched, so later commands can find, stop and restart it.

Written atomically (temp file + rename) under an flock on the data directory, so two kvctl
processes never interleave their updates. It records the extra environment given to each node,
never a copy of kvctl's whole environment (which may hold secrets).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cli.client import KVClient, TlsOptions
from cli.errors import KvctlError

DATA_DIR_ENV = "KVCTL_DATA_DIR"
DEFAULT_DATA_DIR = Path("data/cluster")
CLUSTER_FILE_NAME = "cluster.json"
_LOCK_FILE_NAME = ".kvctl.lock"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    id: int
    pid: int | None  # None once stopped by kvctl; trust it only after processes.is_running()
    client_url: str
    peer_address: str
    data_dir: str  # absolute
    argv: list[str]
    env: dict[str, str]  # added to kvctl's environment when the node starts

    @property
    def config_path(self) -> Path:
        return Path(self.data_dir) / "node.toml"

    @property
    def log_path(self) -> Path:
        return Path(self.data_dir) / "node.log"

    @property
    def client_listen(self) -> str:
        return urlsplit(self.client_url).netloc

    @property
    def client_port(self) -> int:
        return int(urlsplit(self.client_url).port or 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": self.pid,
            "client_url": self.client_url,
            "peer_address": self.peer_address,
            "data_dir": self.data_dir,
            "config": str(self.config_path),
            "log": str(self.log_path),
            "argv": list(self.argv),
            "env": dict(self.env),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> NodeRecord:
        pid = raw.get("pid")
        return cls(
            id=int(raw["id"]),
            pid=int(pid) if pid is not None else None,
            client_url=str(raw["client_url"]),
            peer_address=str(raw["peer_address"]),
            data_dir=str(raw["data_dir"]),
            argv=[str(arg) for arg in raw["argv"]],
            env={str(name): str(value) for name, value in raw.get("env", {}).items()},
        )


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """How kvctl reaches a cluster started with --tls/--auth: file paths only, never secrets."""

    ca_file: str | None = None  # TLS on: verify the nodes against this CA
    cert_file: str | None = None  # kvctl's client certificate and key (mutual TLS)
    key_file: str | None = None
    token_file: str | None = None  # auth on: the bootstrap admin token

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClientSecurity:
        return cls(**{f.name: str(raw[f.name]) for f in fields(cls) if raw.get(f.name)})

    def tls_options(self) -> TlsOptions:
        return TlsOptions(self.ca_file, self.cert_file, self.key_file)

    def token(self) -> str | None:
        return read_token(Path(self.token_file)) if self.token_file else None


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise KvctlError(f"cannot read the token file {path}: {error}") from None
    if not token:
        raise KvctlError(f"the token file {path} is empty")
    return token


def write_private(path: Path, content: str | bytes) -> None:
    """Writes a secret readable by its owner only (mode 0600, set before any byte lands)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content.encode() if isinstance(content, str) else content)


@dataclass(frozen=True, slots=True)
class ClusterRecord:
    nodes: tuple[NodeRecord, ...]
    shards: int
    replication: int
    created: str  # ISO-8601, UTC
    # The node.toml [elastic] settings every node gets, nodes added later too (tests shorten
    # down_after_s); empty: the node's defaults.
    elastic: dict[str, float] = field(default_factory=dict)
    security: ClientSecurity = ClientSecurity()

    @property
    def endpoints(self) -> list[str]:
        return [node.client_url for node in self.nodes]

    def client(self, endpoints: list[str] | None = None, timeout_s: float = 10.0) -> KVClient:
        """A client for this cluster's nodes with its TLS files and admin token, if any."""
        return KVClient(
            endpoints or self.endpoints,
            timeout_s=timeout_s,
            tls=self.security.tls_options(),
            token=self.security.token(),
        )

    def node(self, node_id: int) -> NodeRecord:
        for node in self.nodes:
            if node.id == node_id:
                return node
        known = ", ".join(str(node.id) for node in self.nodes)
        raise KvctlError(f"there is no node {node_id} in this cluster (nodes: {known})")

    def with_node(self, node: NodeRecord) -> ClusterRecord:
        return replace(self, nodes=(*(n for n in self.nodes if n.id != node.id), node))

    def without_node(self, node_id: int) -> ClusterRecord:
        return replace(self, nodes=tuple(n for n in self.nodes if n.id != node_id))

    def with_pid(self, node_id: int, pid: int | None) -> ClusterRecord:
        nodes = tuple(replace(node, pid=pid) if node.id == node_id else node for node in self.nodes)
        return replace(self, nodes=nodes)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [node.to_json() for node in self.nodes],
            "shards": self.shards,
            "replication": self.replication,
            "created": self.created,
            "elastic": self.elastic,
            "security": self.security.to_json(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClusterRecord:
        return cls(
            nodes=tuple(NodeRecord.from_json(node) for node in raw["nodes"]),
            shards=int(raw["shards"]),
            replication=int(raw["replication"]),
            created=str(raw.get("created", "")),
            elastic={str(k): float(v) for k, v in raw.get("elastic", {}).items()},
            security=ClientSecurity.from_json(raw.get("security", {})),
        )


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def cluster_file(data_dir: Path) -> Path:
    return data_dir / CLUSTER_FILE_NAME


def load(data_dir: Path) -> ClusterRecord | None:
    """The cluster recorded in data_dir, or None when there is no cluster.json."""
    path = cluster_file(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise KvctlError(f"cannot read {path}: {error}") from None
    try:
        return ClusterRecord.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as error:
        raise KvctlError(
            f"{path} is damaged ({error!r}); stop any nodes by hand, then remove {data_dir}"
        ) from None


def save(data_dir: Path, record: ClusterRecord) -> None:
    path = cluster_file(data_dir)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record.to_json(), indent=2) + "\n")
    os.replace(temporary, path)


@contextmanager
def locked(data_dir: Path, timeout_s: float = 15.0) -> Iterator[None]:
    """Holds an exclusive lock on data_dir for a read-modify-write of cluster.json, waiting up
    to timeout_s for another kvctl (which holds it at most ~15 s, while stopping nodes)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(data_dir / _LOCK_FILE_NAME, "a") as lock_file:
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise KvctlError(
                        f"another kvctl has been changing the cluster in {data_dir} for "
                        f"{timeout_s:g}s; wait for it to finish and retry"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
