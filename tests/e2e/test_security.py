"""Security against real node processes: a cluster started by kvctl's launcher with --tls --auth
--encrypt (HTTPS, mutual TLS between nodes, bearer tokens, AES-GCM values at rest). Each refused
request gets the right status, is counted where the issue asks, and writes nothing."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from cli import launcher
from cli.certs import CA_FILE, init_certs, node_cert_pair
from cli.cluster_plan import free_ports
from tests.e2e.kv_cluster import KVCluster, Response, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KVCluster]:
    cluster = KVCluster(
        tmp_path_factory.mktemp("secure") / "cluster",
        shards=2,
        tls=True,
        auth=True,
        encrypt=True,
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def call(
    cluster: KVCluster,
    node_id: int,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> Response:
    """One HTTPS request carrying exactly `token` (none at all when None)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return cluster.request(
        node_id, method, path, body, headers, 15.0, send_default_token=False, context=context
    )


def kv_path(key: str) -> str:
    return "/v1/kv/" + quote(key, safe="")


def add_user(cluster: KVCluster, name: str, grants: dict[str, Any]) -> str:
    body = json.dumps({"name": name, "grants": grants}).encode()
    response = call(cluster, 1, "POST", "/v1/auth/users", token=cluster.token, body=body)
    assert response.status == 200, response.body
    return str(response.json()["token"])


def admin_get_status(cluster: KVCluster, key: str) -> int:
    """The status an admin's linearizable read of `key` gets (404: nothing was written)."""
    return call(cluster, 2, "GET", kv_path(key), token=cluster.token).status


def metric(cluster: KVCluster, node_id: int, name: str, labels: str = "") -> float:
    text = call(cluster, node_id, "GET", "/metrics").body.decode()
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def assert_refused(response: Response, status: int, code: str) -> None:
    assert response.status == status, response.body
    assert response.json()["error"]["code"] == code


def test_a_client_without_a_token_or_with_a_wrong_one_gets_401(secure_cluster: KVCluster) -> None:
    for token in (None, "kvt_" + "x" * 43):
        response = call(secure_cluster, 1, "PUT", kv_path("anon/k"), token=token, body=b"v")
        assert_refused(response, 401, "unauthenticated")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert admin_get_status(secure_cluster, "anon/k") == 404


def test_a_read_only_token_cannot_write_and_nothing_is_written(secure_cluster: KVCluster) -> None:
    reader = add_user(secure_cluster, "reader", {"read": [""]})
    for node_id in secure_cluster.node_ids:  # the node that leads the shard or one forwarding
        response = call(secure_cluster, node_id, "PUT", kv_path("ro/k"), token=reader, body=b"v")
        assert_refused(response, 403, "forbidden")
    txn = {"success": [{"op": "put", "key": "ro/k", "value": "dg=="}]}
    response = call(
        secure_cluster, 1, "POST", "/v1/txn", token=reader, body=json.dumps(txn).encode()
    )
    assert_refused(response, 403, "forbidden")
    assert admin_get_status(secure_cluster, "ro/k") == 404
    assert call(secure_cluster, 3, "GET", "/v1/scan?prefix=ro/", token=reader).status == 200


def test_a_token_for_prefix_a_reads_and_writes_a_but_not_b_nor_a_scan_of_both(
    secure_cluster: KVCluster,
) -> None:
    alice = add_user(secure_cluster, "alice", {"read": ["a/"], "write": ["a/"]})
    assert call(
        secure_cluster, 1, "PUT", kv_path("b/secret"), token=secure_cluster.token, body=b"b"
    )
    for node_id in secure_cluster.node_ids:  # writes forwarded between nodes over mutual TLS
        response = call(
            secure_cluster, node_id, "PUT", kv_path(f"a/{node_id}"), token=alice, body=b"a"
        )
        assert response.status == 200, response.body
    assert_refused(
        call(secure_cluster, 2, "GET", kv_path("b/secret"), token=alice), 403, "forbidden"
    )
    assert_refused(
        call(secure_cluster, 2, "PUT", kv_path("b/new"), token=alice, body=b"x"), 403, "forbidden"
    )
    across = call(secure_cluster, 3, "GET", "/v1/scan", token=alice)
    assert_refused(across, 403, "forbidden")
    assert "prefix ''" in across.json()["error"]["message"]
    own = call(secure_cluster, 3, "GET", "/v1/scan?prefix=a/", token=alice)
    assert [item["key"] for item in own.json()["items"]] == ["a/1", "a/2", "a/3"]
    query_all = json.dumps({"select": "*"}).encode()
    assert_refused(
        call(secure_cluster, 1, "POST", "/v1/query", token=alice, body=query_all), 403, "forbidden"
    )
    query_a = json.dumps({"prefix": "a/", "aggregates": {"n": {"fn": "count"}}})
    counted = call(secure_cluster, 2, "POST", "/v1/query", token=alice, body=query_a.encode())
    assert counted.status == 200, counted.body
    assert counted.json()["groups"] == [{"group": {}, "aggregates": {"n": 3}}], counted.body
    assert admin_get_status(secure_cluster, "b/new") == 404


def test_kvctl_manages_users_and_logs_in_with_the_cluster_file(
    secure_cluster: KVCluster, tmp_path: Path
) -> None:
    env = {**os.environ, "KVCTL_DATA_DIR": str(secure_cluster.data_dir)}
    env.pop("KVCTL_ENDPOINTS", None)

    def kvctl(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = {"KVCTL_TOKEN": token} if token else {}
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    added = kvctl("user", "add", "carol", "--role", "readwrite:c/", "--json")
    assert added.returncode == 0, added.stderr
    carol = json.loads(added.stdout)["token"]
    assert kvctl("put", "c/k", "v", token=carol).returncode == 0
    refused = kvctl("get", "a/1", token=carol)
    assert refused.returncode == 7, refused.stderr
    assert "403" in refused.stderr
    who = kvctl("whoami", "--json", token=carol)
    assert json.loads(who.stdout)["name"] == "carol"


def test_a_peer_with_a_certificate_of_another_ca_is_refused_at_the_handshake(
    secure_cluster: KVCluster, tmp_path: Path
) -> None:
    init_certs(tmp_path, [1])  # a CA the cluster never heard of
    pair = node_cert_pair(tmp_path, 1)
    intruder = ssl.create_default_context(cafile=str(tmp_path / CA_FILE))
    intruder.check_hostname = False
    intruder.verify_mode = ssl.CERT_NONE
    intruder.load_cert_chain(str(pair.cert_file), str(pair.key_file))
    refusals = 'kv_peer_connections_refused_total{reason="tls_handshake"}'
    before = metric(secure_cluster, 1, refusals)
    host, port = secure_cluster.record.node(1).peer_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as raw:
        try:
            with intruder.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(b"\x00\x00\x00\x08intruder")
                assert tls.recv(1) == b""  # TLS 1.3: the refusal comes after our Finished
        except (ssl.SSLError, ConnectionError):
            pass  # refused during the handshake itself
    wait_for("the refusal to be counted", lambda: metric(secure_cluster, 1, refusals) > before)
    log = Path(secure_cluster.record.node(1).log_path).read_text()
    assert "refused a peer connection at the TLS handshake" in log
    # The same certificate on the HTTP port: refused there too, and counted.
    http_refusals = 'kv_http_connections_refused_total{reason="tls_handshake"}'
    before = metric(secure_cluster, 2, http_refusals)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        call(secure_cluster, 2, "GET", "/health", context=intruder)
    wait_for("the refusal to be counted", lambda: metric(secure_cluster, 2, http_refusals) > before)


def plain_http_put(url: str, path: str) -> int:
    """The status of an http:// PUT sent to the node's https:// port."""
    parts = urlsplit(url)
    plain = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    try:
        plain.request("PUT", path, body=b"v", headers={"Authorization": "Bearer x"})
        return plain.getresponse().status
    finally:
        plain.close()


def test_plain_http_to_the_tls_port_gets_no_answer_and_writes_nothing(
    secure_cluster: KVCluster,
) -> None:
    refusals = 'kv_http_connections_refused_total{reason="tls_handshake"}'
    before = metric(secure_cluster, 3, refusals)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain_http_put(secure_cluster.url(3), kv_path("plain/k"))
    wait_for("the refusal to be counted", lambda: metric(secure_cluster, 3, refusals) > before)
    assert admin_get_status(secure_cluster, "plain/k") == 404


def test_internal_routes_need_a_node_certificate(secure_cluster: KVCluster) -> None:
    # kvctl's certificate is signed by the cluster CA but is not a node's.
    before = metric(secure_cluster, 1, "kv_internal_requests_refused_total")
    response = call(secure_cluster, 1, "GET", "/v1/internal/status")
    assert_refused(response, 403, "forbidden")
    no_client_cert = ssl.create_default_context(cafile=secure_cluster.record.security.ca_file)
    response = call(secure_cluster, 1, "GET", "/v1/internal/status", context=no_client_cert)
    assert_refused(response, 403, "forbidden")
    assert metric(secure_cluster, 1, "kv_internal_requests_refused_total") == before + 2


def test_values_encrypted_at_rest_survive_a_key_rotation_and_restarts(
    secure_cluster: KVCluster,
) -> None:
    token = secure_cluster.token
    assert (
        call(secure_cluster, 1, "PUT", kv_path("rot/old"), token=token, body=b"old").status == 200
    )
    key_file = secure_cluster.data_dir / launcher.ENCRYPTION_KEY_FILE
    rotated = subprocess.run(
        [sys.executable, "-m", "cli", "encryption", "rotate-key", str(key_file), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(rotated.stdout)["active"] == "k2"
    for node_id in secure_cluster.node_ids:
        launcher.restart_node(secure_cluster.data_dir, node_id)
    secure_cluster.record = launcher.load_cluster(secure_cluster.data_dir)
    secure_cluster.wait_ready()
    deadline = time.monotonic() + 60
    while (
        status := call(
            secure_cluster, 2, "PUT", kv_path("rot/new"), token=token, body=b"new"
        ).status
    ) != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    for key, value in (("rot/old", b"old"), ("rot/new", b"new")):
        response = call(secure_cluster, 3, "GET", kv_path(key), token=token)
        assert (response.status, response.body) == (200, value)
    for node_id in secure_cluster.node_ids:
        assert (
            "encrypted at rest with key 'k2'"
            in Path(secure_cluster.record.node(node_id).log_path).read_text()
        )


def test_auth_without_tls_lets_nodes_forward_with_the_cluster_secret_only(
    tmp_path: Path,
) -> None:
    cluster = KVCluster(tmp_path / "cluster", shards=2, auth=True)
    try:
        for node_id in cluster.node_ids:  # some of these are forwarded to the shard leader
            assert cluster.put(node_id, f"s/{node_id}", b"v").status == 200
        assert cluster.get(1, "s/3").body == b"v"
        for headers in ({}, {"X-KV-Cluster-Secret": "guessed-" + "x" * 40}):
            response = cluster.request(1, "GET", "/v1/internal/status", headers=headers)
            assert (response.status, response.json()["error"]["code"]) == (403, "forbidden")
        secret = (cluster.data_dir / launcher.CLUSTER_SECRET_FILE).read_text().strip()
        response = cluster.request(
            1, "GET", "/v1/internal/status", headers={"X-KV-Cluster-Secret": secret}
        )
        assert response.status == 200
    finally:
        cluster.stop()


def test_a_node_with_auth_on_and_no_admin_account_refuses_to_start(tmp_path: Path) -> None:
    secret = tmp_path / "cluster.secret"
    secret.write_text("s" * 40)
    config = tmp_path / "node.toml"
    config.write_text(
        f"""node_id = 1
data_dir = "{tmp_path / "data"}"
client_listen = "127.0.0.1:0"
peer_listen = "127.0.0.1:0"

[cluster]
shards = 1
replication = 1

[[cluster.nodes]]
id = 1
client_url = "http://127.0.0.1:1"
peer_address = "127.0.0.1:2"

[auth]
enabled = true
cluster_secret_file = "{secret}"
"""
    )
    node = subprocess.run(
        [sys.executable, "-m", "kvstore", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert node.returncode == 2, node.stderr
    assert "refuses to start" in node.stderr
    assert "no admin" in node.stderr


def test_connections_over_the_cap_are_closed_at_accept_and_counted(tmp_path: Path) -> None:
    """One node with limits.max_client_connections = 4: idle sockets cannot crowd it out for
    longer than they stay open, and each refusal is counted."""
    ports = free_ports(2)
    config = tmp_path / "node.toml"
    config.write_text(
        f"""node_id = 1
data_dir = "{tmp_path / "data"}"
client_listen = "127.0.0.1:{ports[0]}"
peer_listen = "127.0.0.1:{ports[1]}"

[cluster]
shards = 1
replication = 1

[[cluster.nodes]]
id = 1
client_url = "http://127.0.0.1:{ports[0]}"
peer_address = "127.0.0.1:{ports[1]}"

[limits]
max_client_connections = 4
"""
    )
    log = (tmp_path / "node.log").open("w")
    node = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "--config", str(config)], stdout=log, stderr=log
    )
    idle: list[socket.socket] = []
    try:
        url = f"http://127.0.0.1:{ports[0]}"
        wait_for("the node to answer", lambda: http_status(url, "/health") == 200)
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", ports[0]), timeout=15))
            idle[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # kept alive after
            assert idle[-1].recv(12).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=15) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_without_answer(extra)
        for sock in idle:
            sock.close()
        idle.clear()
        wait_for("a connection slot", lambda: http_status(url, "/health") == 200)
        metrics = http_body(url, "/metrics")
        assert re.search(
            r'^kv_http_connections_refused_total\{reason="too_many"\} [1-9]', metrics, re.MULTILINE
        ), metrics
    finally:
        for sock in idle:
            sock.close()
        node.terminate()
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait(timeout=20)
        log.close()


def closed_without_answer(sock: socket.socket) -> bool:
    """Whether the node closed the connection (cleanly or by reset) without answering."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def http_body(url: str, path: str) -> str:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def http_status(url: str, path: str) -> int:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        connection.close()
