"""The local cluster launcher behind `kvctl cluster up/down` and `kvctl node restart`.

It writes one node.toml per node, starts `python -m kvstore --config ...` detached, records the
PIDs in cluster.json and waits over HTTP until every shard has a leader. It knows the node only
as a command line and an HTTP API: it never imports kvstore.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cli import certs, cluster_file, encryption_keys, processes
from cli.client import ClusterStatus
from cli.cluster_file import ClusterRecord, NodeRecord
from cli.cluster_plan import (
    NodeSecurity,
    PlannedNode,
    free_ports,
    node_toml,
    plan_nodes,
    write_configs,
)
from cli.errors import ClusterUnavailable, InvalidUsage, KvctlError

NODE_COMMAND_ENV = "KVCTL_NODE_COMMAND"  # tests only: replaces `python -m kvstore`
NODE_ENV = {
    "PYTHONUNBUFFERED": "1",
    "PYTHONFAULTHANDLER": "1",
}  # log current; a crash or SIGABRT dumps every thread
DEFAULT_NODES = 3
DEFAULT_SHARDS = 8
DEFAULT_REPLICATION = 3
CERTS_DIR = "certs"
ADMIN_TOKEN_FILE = "admin.token"
CLUSTER_SECRET_FILE = "cluster.secret"
ENCRYPTION_KEY_FILE = "encryption.keys"
TOKEN_PREFIX = "kvt_"  # as the node's tokens: greppable in logs and secret scanners
_POLL_INTERVAL_S = 0.2
_PROBE_TIMEOUT_S = 1.0


def node_command() -> list[str]:
    override = os.environ.get(NODE_COMMAND_ENV)
    return shlex.split(override) if override else [sys.executable, "-m", "kvstore"]


@dataclass(frozen=True, slots=True)
class UpRequest:
    data_dir: Path
    nodes: int | None  # None: keep the existing cluster's value, or the default for a new one
    shards: int | None
    replication: int | None
    base_port: int | None
    tls: bool = False  # a new cluster gets dev certificates (DATA_DIR/certs) and HTTPS
    auth: bool = False  # a new cluster gets auth on and a bootstrap admin token
    encrypt: bool = False  # a new cluster encrypts values at rest (DATA_DIR/encryption.keys)
    elastic: Mapping[str, float] | None = None  # node.toml [elastic] settings, new clusters


@dataclass(frozen=True, slots=True)
class UpResult:
    record: ClusterRecord
    created: bool  # False: an existing cluster.json was reused
    started: tuple[int, ...]  # ids of the nodes this call started


def process_of(node: NodeRecord) -> processes.NodeProcess:
    return processes.NodeProcess(node.pid, node.config_path)


def start_cluster(request: UpRequest) -> UpResult:
    """Creates the cluster (or reuses the one recorded in data_dir) and starts every node that
    is not running. Does not wait for leaders: see wait_until_ready."""
    data_dir = request.data_dir
    with cluster_file.locked(data_dir):
        existing = cluster_file.load(data_dir)
        if existing is not None:
            _refuse_mismatch(existing, request)
            record, created = existing, False
        else:
            record, created = _create(request), True
        started = []
        for node in record.nodes:
            if processes.is_running(process_of(node)):
                continue
            if not node.config_path.exists():
                raise KvctlError(
                    f"{node.config_path} is missing, so node {node.id} cannot start; "
                    f"restore it, or remove {data_dir} and run `kvctl cluster up` again"
                )
            pid = processes.spawn(node.argv, node.env, node.log_path)
            record = record.with_pid(node.id, pid)
            started.append(node.id)
            cluster_file.save(data_dir, record)  # saved per node: a crash here loses no PID
        cluster_file.save(data_dir, record)
    return UpResult(record, created, tuple(started))


def _create(request: UpRequest) -> ClusterRecord:
    count = request.nodes or DEFAULT_NODES
    shards = request.shards or DEFAULT_SHARDS
    replication = request.replication or DEFAULT_REPLICATION
    if replication > count:
        raise InvalidUsage(
            f"--replication {replication} needs at least {replication} nodes, not {count}"
        )
    leftovers = sorted(str(path) for path in request.data_dir.glob("node*") if path.is_dir())
    if leftovers:
        raise KvctlError(
            f"{request.data_dir} holds node directories ({', '.join(leftovers)}) but no "
            f"{cluster_file.CLUSTER_FILE_NAME}, so kvctl did not make them; remove them "
            "or pick another --data-dir"
        )
    planned = plan_nodes(
        count, request.data_dir, request.base_port, scheme="https" if request.tls else "http"
    )
    elastic = dict(request.elastic or {})
    node_security, client_security = _create_security(request, [node.id for node in planned])
    write_configs(
        planned,
        shards=shards,
        replication=replication,
        elastic=elastic,
        security=node_security,
    )
    command = node_command()
    nodes = tuple(
        NodeRecord(
            id=node.id,
            pid=None,
            client_url=node.client_url,
            peer_address=node.peer_address,
            data_dir=str(node.data_dir),
            argv=[*command, "--config", str(node.config_path)],
            env=dict(NODE_ENV),
        )
        for node in planned
    )
    return ClusterRecord(
        nodes,
        shards,
        replication,
        cluster_file.now_iso(),
        elastic=elastic,
        security=client_security,
    )


def _create_security(
    request: UpRequest, node_ids: list[int]
) -> tuple[NodeSecurity, cluster_file.ClientSecurity]:
    """Certificates, the bootstrap admin token and the cluster secret of a new cluster, as
    --tls and --auth ask; secrets land in files of mode 0600 in the data directory."""
    root = request.data_dir.resolve()
    certs_dir = root / CERTS_DIR if request.tls else None
    if certs_dir is not None:
        certs.init_certs(certs_dir, node_ids)
    token_file = root / ADMIN_TOKEN_FILE if request.auth else None
    admin_hash = None
    secret_file = None
    if token_file is not None:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        cluster_file.write_private(token_file, token + "\n")
        admin_hash = hashlib.sha256(token.encode()).hexdigest()
        if certs_dir is None:  # without TLS, peers prove themselves with a shared secret
            secret_file = root / CLUSTER_SECRET_FILE
            cluster_file.write_private(secret_file, secrets.token_urlsafe(32) + "\n")
    key_file = root / ENCRYPTION_KEY_FILE if request.encrypt else None
    if key_file is not None:
        encryption_keys.rotate(key_file)
    client_pair = certs.client_cert_pair(certs_dir) if certs_dir is not None else None
    return (
        NodeSecurity(certs_dir, admin_hash, secret_file, key_file),
        cluster_file.ClientSecurity(
            ca_file=str(certs_dir / certs.CA_FILE) if certs_dir is not None else None,
            cert_file=str(client_pair.cert_file) if client_pair else None,
            key_file=str(client_pair.key_file) if client_pair else None,
            token_file=str(token_file) if token_file is not None else None,
        ),
    )


def _refuse_mismatch(existing: ClusterRecord, request: UpRequest) -> None:
    wanted = {
        "--nodes": (request.nodes, len(existing.nodes)),
        "--shards": (request.shards, existing.shards),
        "--replication": (request.replication, existing.replication),
        "--base-port": (request.base_port, existing.nodes[0].client_port),
        # Only asking for a protection the cluster lacks is a mismatch; omitting the flag reuses.
        "--tls": (request.tls or None, existing.security.ca_file is not None),
        "--auth": (request.auth or None, existing.security.token_file is not None),
    }
    differ = [
        f"{flag} {asked} (it has {actual})"
        for flag, (asked, actual) in wanted.items()
        if asked is not None and asked != actual
    ]
    if differ:
        raise InvalidUsage(
            f"{request.data_dir} already holds a cluster with {len(existing.nodes)} nodes, "
            f"{existing.shards} shards, replication {existing.replication}; you asked for "
            f"{'; '.join(differ)}. Run `kvctl cluster up` without those flags to reuse it, "
            "pass another --data-dir for a new cluster, or `kvctl cluster down` and remove "
            f"{request.data_dir} to start over"
        )


def shards_with_leader(status: ClusterStatus) -> int:
    return sum(1 for shard in status.get("shards", []) if shard.get("leader"))


def is_ready(status: ClusterStatus, expected_shards: int) -> bool:
    shards = status.get("shards", [])
    return len(shards) >= expected_shards and shards_with_leader(status) == len(shards)


def probe_status(record: ClusterRecord) -> ClusterStatus | None:
    """/v1/cluster from the first node that answers quickly, or None."""
    for endpoint in record.endpoints:
        try:
            return record.client([endpoint], timeout_s=_PROBE_TIMEOUT_S).cluster_status()
        except KvctlError:
            continue
    return None


def wait_until_ready(
    record: ClusterRecord,
    *,
    timeout_s: float,
    on_progress: Callable[[str], None],
) -> ClusterStatus:
    """Polls until /v1/cluster shows a leader for every shard. Raises ClusterUnavailable, with
    the tail of every node's log, when a node dies or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_progress = ""
    while True:
        dead = [node for node in record.nodes if not processes.is_running(process_of(node))]
        if dead:
            ids = ", ".join(str(node.id) for node in dead)
            raise ClusterUnavailable(
                f"node(s) {ids} exited while the cluster was starting.\n" + logs_report(dead)
            )
        status = probe_status(record)
        if status is not None and is_ready(status, record.shards):
            return status
        if status is None:
            progress = "waiting for a node to answer on HTTP"
        else:
            total = len(status.get("shards", []))
            progress = f"{shards_with_leader(status)}/{total} shards have a leader"
        if progress != last_progress:
            on_progress(progress)
            last_progress = progress
        if time.monotonic() >= deadline:
            raise ClusterUnavailable(
                f"not every shard had a leader after {timeout_s:g}s ({progress}).\n"
                + logs_report(list(record.nodes))
            )
        time.sleep(_POLL_INTERVAL_S)


def wait_until_healthy(record: ClusterRecord, node: NodeRecord, *, timeout_s: float) -> None:
    """Polls the node's /health until it answers 200."""
    deadline = time.monotonic() + timeout_s
    client = record.client([node.client_url], timeout_s=_PROBE_TIMEOUT_S)
    while True:
        if not processes.is_running(process_of(node)):
            raise ClusterUnavailable(
                f"node {node.id} exited after starting.\n" + logs_report([node])
            )
        try:
            client.request("GET", "/health", safe_to_retry=True)
            return
        except KvctlError:
            pass
        if time.monotonic() >= deadline:
            raise ClusterUnavailable(
                f"node {node.id} did not answer {node.client_url}/health within {timeout_s:g}s.\n"
                + logs_report([node])
            )
        time.sleep(_POLL_INTERVAL_S)


def logs_report(nodes: list[NodeRecord], lines: int = 15) -> str:
    parts = []
    for node in nodes:
        parts.append(f"--- last lines of {node.log_path} (node {node.id}) ---")
        parts.append(processes.log_tail(node.log_path, lines))
    return "\n".join(parts)


def stop_cluster(
    data_dir: Path, *, is_hurried: Callable[[], bool] = lambda: False
) -> list[tuple[NodeRecord, str]]:
    """Stops every node recorded in data_dir; returns (node, outcome) pairs."""
    with cluster_file.locked(data_dir):
        record = load_cluster(data_dir)
        outcomes = processes.stop_all(
            [process_of(node) for node in record.nodes], is_hurried=is_hurried
        )
        stopped = record
        for node in record.nodes:
            stopped = stopped.with_pid(node.id, None)
        cluster_file.save(data_dir, stopped)
    return list(zip(record.nodes, outcomes, strict=True))


def restart_node(data_dir: Path, node_id: int) -> tuple[NodeRecord, str]:
    """Stops one node (if running) and starts it with its recorded argv and env.
    Returns the updated node and how the old process ended."""
    with cluster_file.locked(data_dir):
        record = load_cluster(data_dir)
        node = record.node(node_id)
        (outcome,) = processes.stop_all([process_of(node)])
        pid = processes.spawn(node.argv, node.env, node.log_path)
        record = record.with_pid(node_id, pid)
        cluster_file.save(data_dir, record)
    return record.node(node_id), outcome


def add_node(data_dir: Path) -> NodeRecord:
    """Registers a new node with the running cluster (it enters the shard map, so the
    balancer starts moving replicas to it) and starts its process. Returns its record."""
    with cluster_file.locked(data_dir):
        record = load_cluster(data_dir)
        node_id = max(node.id for node in record.nodes) + 1
        client_port, peer_port = free_ports(2)
        scheme = "https" if record.security.ca_file else "http"
        root = data_dir.resolve()
        new = PlannedNode(node_id, client_port, peer_port, root / f"node{node_id}", scheme)
        if new.data_dir.exists():
            raise KvctlError(f"{new.data_dir} exists already; remove it or pick another cluster")
        security = _existing_security(root, record)
        if security.certs_dir is not None:
            certs.issue_node_cert(security.certs_dir, node_id)
        members = [_planned(node, scheme) for node in record.nodes]
        new.data_dir.mkdir(parents=True)
        new.config_path.write_text(
            node_toml(
                new,
                [*members, new],
                shards=record.shards,
                replication=record.replication,
                written_by="`kvctl node add`",
                elastic=record.elastic,
                join=True,
                security=security,
            ),
            encoding="utf-8",
        )
        record.client().add_node(node_id, new.client_url, new.peer_address)
        argv = [*node_command(), "--config", str(new.config_path)]
        pid = processes.spawn(argv, dict(NODE_ENV), new.log_path)
        node = NodeRecord(
            node_id, pid, new.client_url, new.peer_address, str(new.data_dir), argv, dict(NODE_ENV)
        )
        cluster_file.save(data_dir, record.with_node(node))
    return node


def _existing_security(root: Path, record: ClusterRecord) -> NodeSecurity:
    """The NodeSecurity `_create_security` gave the cluster's first nodes, found again from
    the files it wrote, for a node that joins later."""
    token_file = record.security.token_file
    admin_hash = None
    if token_file is not None:
        admin_hash = hashlib.sha256(cluster_file.read_token(Path(token_file)).encode()).hexdigest()
    secret_file = root / CLUSTER_SECRET_FILE
    key_file = root / ENCRYPTION_KEY_FILE
    return NodeSecurity(
        Path(record.security.ca_file).parent if record.security.ca_file else None,
        admin_hash,
        secret_file if secret_file.exists() else None,
        key_file if key_file.exists() else None,
    )


def forget_node(data_dir: Path, node_id: int) -> str:
    """Stops a node that has left the cluster (drained) and drops it from cluster.json.
    Its directory stays, for the operator to inspect or delete. Returns how it ended."""
    with cluster_file.locked(data_dir):
        record = load_cluster(data_dir)
        (outcome,) = processes.stop_all([process_of(record.node(node_id))])
        cluster_file.save(data_dir, record.without_node(node_id))
    return outcome


def _planned(node: NodeRecord, scheme: str) -> PlannedNode:
    peer_port = int(node.peer_address.rpartition(":")[2])
    return PlannedNode(node.id, node.client_port, peer_port, Path(node.data_dir), scheme)


def load_cluster(data_dir: Path) -> ClusterRecord:
    record = cluster_file.load(data_dir)
    if record is None:
        raise KvctlError(
            f"no cluster recorded in {data_dir} (no {cluster_file.CLUSTER_FILE_NAME}); "
            "pass the --data-dir you gave `kvctl cluster up`"
        )
    return record
