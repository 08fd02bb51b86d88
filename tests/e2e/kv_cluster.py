"""A real KV cluster for tests: node processes started by kvctl's launcher on free loopback
ports, stopped (by PID) when the test ends. Plain HTTP from the test, nothing mocked."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, urlsplit

from cli import launcher
from cli.cluster_file import ClusterRecord

DEADLINE_S = 60.0


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class KVCluster:
    def __init__(
        self,
        data_dir: Path,
        nodes: int = 3,
        shards: int = 4,
        replication: int = 3,
        *,
        elastic: dict[str, float] | None = None,
        tls: bool = False,
        auth: bool = False,
        encrypt: bool = False,
    ):
        self.data_dir = data_dir
        result = launcher.start_cluster(
            launcher.UpRequest(
                data_dir,
                nodes,
                shards,
                replication,
                None,
                elastic=elastic,
                tls=tls,
                auth=auth,
                encrypt=encrypt,
            )
        )
        self.record: ClusterRecord = result.record
        security = self.record.security
        # Sent when a request names no Authorization itself: the bootstrap admin's, if auth is on.
        self.token: str | None = security.token()
        self.tls_context = security.tls_options().context() if security.ca_file else None
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # the fixture's cleanup never runs if construction fails
            raise

    # -- processes --
    def wait_ready(self) -> None:
        launcher.wait_until_ready(self.record, timeout_s=DEADLINE_S, on_progress=lambda _: None)

    def pid(self, node_id: int) -> int:
        pid = self.record.node(node_id).pid
        assert pid is not None
        return pid

    def kill(self, node_id: int) -> None:
        """SIGKILL: the node gets no chance to flush or say goodbye."""
        pid = self.record.node(node_id).pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def restart_dead(self) -> None:
        self.record = launcher.start_cluster(
            launcher.UpRequest(self.data_dir, None, None, None, base_port=None)
        ).record

    def stop(self) -> None:
        launcher.stop_cluster(self.data_dir)

    def restart(self, node_id: int) -> None:
        launcher.restart_node(self.data_dir, node_id)
        self.record = launcher.load_cluster(self.data_dir)

    def add_node(self) -> int:
        """Starts a new node and joins it (as `kvctl node add`); returns its id."""
        node = launcher.add_node(self.data_dir)
        self.record = launcher.load_cluster(self.data_dir)
        return node.id

    def forget_node(self, node_id: int) -> None:
        """Stops a node that has left the cluster and drops it from the record."""
        launcher.forget_node(self.data_dir, node_id)
        self.record = launcher.load_cluster(self.data_dir)

    @property
    def node_ids(self) -> list[int]:
        return [node.id for node in self.record.nodes]

    def url(self, node_id: int) -> str:
        return self.record.node(node_id).client_url

    # -- HTTP --
    def request(
        self,
        node_id: int,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 10.0,
        *,
        send_default_token: bool = True,
        context: ssl.SSLContext | None = None,
    ) -> Response:
        """One request; over HTTPS (with `context`, else the cluster's CA and client
        certificate) when the cluster uses TLS."""
        parts = urlsplit(self.url(node_id))
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout_s, context=context or self.tls_context
            )
        else:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        headers = dict(headers or {})
        if send_default_token and self.token is not None and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return Response(response.status, dict(response.getheaders()), response.read())
        finally:
            connection.close()

    def put(self, node_id: int, key: str, value: bytes, **params: Any) -> Response:
        headers = {}
        if "idempotency_key" in params:
            headers["Idempotency-Key"] = params.pop("idempotency_key")
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return self.request(
            node_id,
            "PUT",
            f"/v1/kv/{quote(key, safe='')}" + (f"?{query}" if query else ""),
            value,
            headers,
        )

    def get(self, node_id: int, key: str, consistency: str = "linearizable") -> Response:
        return self.request(
            node_id, "GET", f"/v1/kv/{quote(key, safe='')}?consistency={consistency}"
        )

    def kvctl(self, *args: str) -> tuple[int, str, str]:
        """Run kvctl in-process against every node; (exit code, stdout, stderr)."""
        from click.testing import CliRunner

        from cli.__main__ import kvctl

        endpoints = ",".join(self.url(node) for node in self.node_ids)
        result = CliRunner().invoke(
            kvctl, [*args, "--endpoints", endpoints], catch_exceptions=False
        )
        return result.exit_code, result.stdout, result.stderr

    def status(self, node_id: int) -> dict[str, Any]:
        return self.request(node_id, "GET", "/v1/cluster").json()

    def shard_leader(self, key_shard: int) -> int:
        for node_id in self.node_ids:
            try:
                shards = self.status(node_id)["shards"]
            except OSError:
                continue
            for shard in shards:
                if shard["id"] == key_shard and shard["leader"]:
                    return int(shard["leader"])
        raise AssertionError(f"shard {key_shard} has no leader")


class LoadThread:
    """A test's load in a background thread: a subclass's _run loops until self.stopping is
    set (and within its own deadline); `with load.running():` starts it and stops it."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    @contextmanager
    def running(self) -> Iterator[Self]:
        self._thread.start()
        try:
            yield self
        finally:
            self.stopping.set()
            self._thread.join(timeout=30)


def wait_for(what: str, condition: Callable[[], Any], deadline_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except OSError as error:
            last_error = error
        time.sleep(0.1)
    raise AssertionError(f"timed out after {deadline_s}s waiting for {what} ({last_error})")
