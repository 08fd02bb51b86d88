"""The shape of a new local cluster: node ids, loopback ports, directories, and the node.toml
each node reads. Writing files and probing ports is all it does; starting processes is not."""

from __future__ import annotations

import random
import socket
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from cli.errors import InvalidUsage, KvctlError

HOST = "127.0.0.1"
PEER_PORT_OFFSET = 100  # with --base-port P: client ports P.., peer ports P+100..


@dataclass(frozen=True, slots=True)
class NodeSecurity:
    """The [tls] and [auth] sections every node of a new cluster gets (None: section absent)."""

    certs_dir: Path | None = None  # TLS on: ca.pem and node{id}.pem / node{id}-key.pem here
    admin_token_sha256: str | None = None  # auth on: the bootstrap admin's token hash
    cluster_secret_file: Path | None = None  # auth on without TLS: peers' shared secret
    encryption_key_file: Path | None = None  # values encrypted at rest with these keys

    def toml_lines(self, node_id: int) -> list[str]:
        lines: list[str] = []
        if self.certs_dir is not None:
            lines += [
                "",
                "[tls]  # HTTPS for clients, mutual TLS between nodes",
                f"ca_file = {toml_string(str(self.certs_dir / 'ca.pem'))}",
                f"cert_file = {toml_string(str(self.certs_dir / f'node{node_id}.pem'))}",
                f"key_file = {toml_string(str(self.certs_dir / f'node{node_id}-key.pem'))}",
            ]
        if self.admin_token_sha256 is not None:
            lines += [
                "",
                "[auth]  # bearer tokens; the first admin's token hash must match in every file",
                "enabled = true",
                f"bootstrap_admin_token_sha256 = {toml_string(self.admin_token_sha256)}",
            ]
            if self.cluster_secret_file is not None:
                lines.append(f"cluster_secret_file = {toml_string(str(self.cluster_secret_file))}")
        if self.encryption_key_file is not None:
            lines += [
                "",
                "[encryption]  # AES-GCM for values at rest; rotate with `kvctl encryption`",
                f"key_file = {toml_string(str(self.encryption_key_file))}",
            ]
        return lines


@dataclass(frozen=True, slots=True)
class PlannedNode:
    id: int
    client_port: int
    peer_port: int
    data_dir: Path  # absolute
    scheme: str = "http"  # https when the cluster uses TLS

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.client_port}"

    @property
    def client_listen(self) -> str:
        return f"{HOST}:{self.client_port}"

    @property
    def peer_address(self) -> str:
        return f"{HOST}:{self.peer_port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "node.toml"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"


def plan_nodes(
    count: int, data_dir: Path, base_port: int | None, *, scheme: str = "http"
) -> list[PlannedNode]:
    """Node ids 1..count, each in data_dir/node{id}, on loopback ports that are free right now."""
    if base_port is None:
        ports = free_ports(2 * count)
        client_ports, peer_ports = ports[:count], ports[count:]
    else:
        if count > PEER_PORT_OFFSET:
            raise InvalidUsage(
                f"--base-port fits at most {PEER_PORT_OFFSET} nodes; omit it for free ports"
            )
        if base_port < 1 or base_port + PEER_PORT_OFFSET + count - 1 > 65535:
            raise InvalidUsage(f"--base-port {base_port} leaves no room for {count} nodes' ports")
        client_ports = list(range(base_port, base_port + count))
        peer_ports = [port + PEER_PORT_OFFSET for port in client_ports]
        busy = [port for port in client_ports + peer_ports if not is_port_free(port)]
        if busy:
            raise KvctlError(
                f"port(s) {', '.join(map(str, busy))} on {HOST} are in use: "
                "pick another --base-port, or omit it to use free ports"
            )
    root = data_dir.resolve()
    return [
        PlannedNode(
            node_id,
            client_ports[node_id - 1],
            peer_ports[node_id - 1],
            root / f"node{node_id}",
            scheme,
        )
        for node_id in range(1, count + 1)
    ]


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10_000


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now, drawn at random below the kernel's ephemeral range: a port
    from 127.0.0.1:0 is an ephemeral one, which any outgoing connection (ours included) may take
    before the node binds it. NB: another process may still take one first; the node then fails
    to start and `cluster up` shows its log."""
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 0
    if ephemeral_low - _LOWEST_PORT < 100 * count:  # no room below it: let the kernel choose
        with ExitStack() as stack:
            sockets = []
            for _ in range(count):
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind((HOST, 0))
                sockets.append(sock)
            return [sock.getsockname()[1] for sock in sockets]
    rng = random.SystemRandom()
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(_LOWEST_PORT, ephemeral_low)
        if port not in chosen and is_port_free(port):
            chosen.append(port)
    return chosen


def is_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def node_toml(
    node: PlannedNode,
    cluster: Sequence[PlannedNode],
    *,
    shards: int,
    replication: int,
    written_by: str = "`kvctl cluster up`",
    elastic: Mapping[str, float] | None = None,
    join: bool = False,
    security: NodeSecurity | None = None,
) -> str:
    """The config one node reads; the [cluster] part is identical in every node's file."""
    lines = [
        f"# Written by {written_by}. The [cluster] section must match in every node's file.",
        f"node_id = {node.id}",
        f"data_dir = {toml_string(str(node.data_dir))}",
        f"client_listen = {toml_string(node.client_listen)}  # HTTP API",
        f"peer_listen = {toml_string(node.peer_address)}  # Raft transport",
        "",
        "[cluster]",
        f"shards = {shards}",
        f"replication = {replication}",
    ]
    if join:  # a new node in a running cluster: it fetches the map from the nodes below
        lines.append("join = true")
    for member in cluster:
        lines += [
            "",
            "[[cluster.nodes]]",
            f"id = {member.id}",
            f"client_url = {toml_string(member.client_url)}",
            f"peer_address = {toml_string(member.peer_address)}",
        ]
    if elastic:
        lines += ["", "[elastic]", *(f"{name} = {value!r}" for name, value in elastic.items())]
    if security is not None:
        lines += security.toml_lines(node.id)
    return "\n".join(lines) + "\n"


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_TOML_ESCAPES["\r"] = "\\r"


def toml_string(text: str) -> str:
    """A TOML basic string (there is no TOML writer in the stdlib)."""
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def write_configs(
    nodes: Sequence[PlannedNode],
    *,
    shards: int,
    replication: int,
    elastic: Mapping[str, float] | None = None,
    security: NodeSecurity | None = None,
) -> None:
    for node in nodes:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        text = node_toml(
            node,
            nodes,
            shards=shards,
            replication=replication,
            elastic=elastic,
            security=security,
        )
        node.config_path.write_text(text, encoding="utf-8")
