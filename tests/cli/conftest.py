"""Fixtures for kvctl tests: a fake node HTTP API (aiohttp, in a background thread, on
127.0.0.1 port 0) that follows the contract in kvstore/service.py, plus endpoints that refuse
connections or never answer, and a clean environment for every test."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from click.testing import CliRunner, Result

from cli.__main__ import kvctl


@dataclass
class Recorded:
    method: str
    raw_path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Forced:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def cluster_status_payload(url: str = "http://127.0.0.1:1", leader: int = 1) -> dict[str, Any]:
    half = 1 << 63
    replicas = [
        {
            "node": node,
            "role": "leader" if node == leader else "follower",
            "term": 3,
            "commit_index": 42,
            "applied_index": 42 if node == leader else 40,
            "last_index": 42,
            "reachable": node != 3,
        }
        for node in (1, 2, 3)
    ]
    return {
        "cluster_id": "c0ffee",
        "epoch": 7,
        "nodes": [
            {"id": 1, "client_url": url, "peer_address": "127.0.0.1:2", "reachable": True},
            {"id": 2, "client_url": "http://127.0.0.1:3", "peer_address": "x:4", "reachable": True},
            {
                "id": 3,
                "client_url": "http://127.0.0.1:5",
                "peer_address": "x:6",
                "reachable": False,
            },
        ],
        "shards": [
            {
                "id": 1,
                "start_token": 0,
                "end_token": half,
                "replicas": [1, 2, 3],
                "leader": leader,
                "term": 3,
                "replica_status": replicas,
            },
            {
                "id": 2,
                "start_token": half,
                "end_token": 1 << 64,
                "replicas": [2, 3, 1],
                "leader": 0,
                "term": 5,
                "replica_status": replicas,
            },
        ],
        "healthy": False,
    }


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, **extra}}, status=status)


class FakeApi:
    """An in-memory node: versions come from one counter, like a single shard's Raft index."""

    def __init__(self) -> None:
        self.store: dict[str, tuple[bytes, int]] = {}
        self.last_version = 0
        self.requests: list[Recorded] = []
        self.forced: Forced | None = None
        self.cluster_status = cluster_status_payload()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.router.add_route("*", "/v1/kv/{key:.*}", self._kv)
        app.router.add_get("/v1/scan", self._scan)
        app.router.add_post("/v1/txn", self._txn)
        app.router.add_get("/v1/cluster", self._cluster)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        await web.SockSite(self._runner, sock).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # -- helpers for tests ----------------------------------------------------------------------

    def force(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        """Answer every request with this from now on."""
        self.forced = Forced(status, body, headers or {})

    def put_value(self, key: str, value: bytes) -> int:
        self.last_version += 1
        self.store[key] = (value, self.last_version)
        return self.last_version

    def requests_to(self, path_prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.raw_path.startswith(path_prefix)]

    # -- handlers -------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(
            Recorded(
                request.method,
                request.raw_path.split("?", 1)[0],
                dict(request.query),
                dict(request.headers),
                await request.read(),
            )
        )
        if self.forced is not None:
            return web.json_response(
                self.forced.body, status=self.forced.status, headers=self.forced.headers
            )
        response: web.StreamResponse = await handler(request)
        return response

    async def _kv(self, request: web.Request) -> web.Response:
        key = unquote(request.raw_path.split("?", 1)[0].removeprefix("/v1/kv/"))
        current = self.store.get(key)
        current_version = current[1] if current else 0
        if_version = request.query.get("if_version")
        if if_version is not None and int(if_version) != current_version:
            return _error(
                412,
                "precondition_failed",
                f"version is {current_version}",
                current_version=current_version,
            )
        if request.method == "GET":
            if current is None:
                return _error(404, "not_found", f"no key {key!r}")
            return web.Response(body=current[0], headers={"X-KV-Version": str(current[1])})
        if request.method == "PUT":
            version = self.put_value(key, await request.read())
            return web.json_response({"key": key, "version": version})
        if request.method == "DELETE":
            if current is None:
                return _error(404, "not_found", f"no key {key!r}")
            del self.store[key]
            return web.json_response({"key": key, "version": current_version})
        return _error(405, "invalid_request", "method not allowed")

    async def _scan(self, request: web.Request) -> web.Response:
        query = request.query
        prefix = query.get("prefix", "")
        keys = sorted(
            key
            for key in self.store
            if key.startswith(prefix)
            and ("start" not in query or key >= query["start"])
            and ("end" not in query or key < query["end"])
            and ("cursor" not in query or key > query["cursor"])
        )
        limit = int(query.get("limit", "1000"))
        page, rest = keys[:limit], keys[limit:]
        items = [
            {
                "key": key,
                "value": base64.b64encode(self.store[key][0]).decode(),
                "version": self.store[key][1],
            }
            for key in page
        ]
        return web.json_response({"items": items, "next_cursor": page[-1] if rest else None})

    async def _txn(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        held = True
        for compare in body.get("compare", []):
            current = self.store.get(compare["key"])
            version = current[1] if current else 0
            if compare["target"] != "version" or compare["op"] != "==":
                return _error(400, "invalid_request", "the fake knows only version ==")
            held = held and version == compare["version"]
        results = []
        for op in body.get("success" if held else "failure", []):
            key = op["key"]
            if op["op"] == "put":
                version = self.put_value(key, base64.b64decode(op["value"]))
                results.append({"op": "put", "key": key, "version": version, "value": None})
            elif op["op"] == "get":
                current = self.store.get(key)
                results.append(
                    {
                        "op": "get",
                        "key": key,
                        "version": current[1] if current else 0,
                        "value": base64.b64encode(current[0]).decode() if current else None,
                    }
                )
            else:
                current = self.store.pop(key, None)
                version = current[1] if current else 0
                results.append({"op": "delete", "key": key, "version": version, "value": None})
        return web.json_response({"succeeded": held, "results": results})

    async def _cluster(self, _request: web.Request) -> web.Response:
        return web.json_response(self.cluster_status)

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


@pytest.fixture
def make_api() -> Iterator[Callable[[], FakeApi]]:
    started: list[FakeApi] = []

    def make() -> FakeApi:
        api = FakeApi()
        api.start()
        started.append(api)
        return api

    yield make
    for api in started:
        api.stop()


@pytest.fixture
def api(make_api: Callable[[], FakeApi]) -> FakeApi:
    return make_api()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that is bound but not listening: connecting gets ECONNREFUSED, and nobody else
    can take the port while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections (into the backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No endpoints or data dir leak in from the developer's shell, and ./data/cluster is the
    test's own (empty) directory."""
    for name in ("KVCTL_ENDPOINTS", "KVCTL_DATA_DIR", "KVCTL_NODE_COMMAND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


RunKvctl = Callable[..., Result]


@pytest.fixture
def run() -> RunKvctl:
    """run("get", "k", input=b"...", env={...}): kvctl in-process, exceptions not swallowed."""

    def invoke(
        *args: str, input: bytes | str | None = None, env: dict[str, str] | None = None
    ) -> Result:
        return CliRunner().invoke(kvctl, list(args), input=input, env=env, catch_exceptions=False)

    return invoke
