"""Authentication and authorization of kvstore.http_api, against FakeKVService and an in-memory
user table: 401 without or with a bad token, 403 without the grant, and nothing reaches the
service when a request is refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from kvstore.auth import Grants, User, hash_token
from kvstore.errors import NotFound
from kvstore.http_api import AuthSettings, create_app
from kvstore.service import Limits
from tests.kvstore.fake_service import FakeKVService

ADMIN_TOKEN = "kvt_admin-token-for-tests"
READER_TOKEN = "kvt_reader-of-everything"
A_TOKEN = "kvt_may-read-and-write-a"


@dataclass
class MemoryUsers:
    """kvstore.auth.UserDirectory and UserAdmin, in a dict."""

    by_name: dict[str, User] = field(default_factory=dict)

    def user_by_token_hash(self, token_sha256: bytes) -> User | None:
        return next((u for u in self.by_name.values() if u.token_sha256 == token_sha256), None)

    def users(self) -> list[User]:
        return sorted(self.by_name.values(), key=lambda user: user.name)

    async def put_user(self, user: User) -> None:
        self.by_name[user.name] = user

    async def delete_user(self, name: str) -> None:
        if self.by_name.pop(name, None) is None:
            raise NotFound(f"there is no user {name!r}")


def _users() -> MemoryUsers:
    users = MemoryUsers()
    for name, grants, token in (
        ("admin", Grants(admin=True), ADMIN_TOKEN),
        ("reader", Grants(read=("",)), READER_TOKEN),
        ("alice", Grants(read=("a/",), write=("a/",)), A_TOKEN),
    ):
        users.by_name[name] = User(name, grants, hash_token(token))
    return users


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    fake: FakeKVService
    users: MemoryUsers

    async def send(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> tuple[int, dict[str, str], Any]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.client.request(method, path, headers=headers, **kwargs) as response:
            body = await response.read()
            try:
                parsed: Any = json.loads(body)
            except ValueError:
                parsed = body
            return response.status, dict(response.headers), parsed


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    fake = FakeKVService(limits=Limits(max_requests_in_flight_per_client=2))
    users = _users()
    auth = AuthSettings(enabled=True, directory=users, admin=users)
    app = create_app(fake, registry=CollectorRegistry(), auth=auth)
    async with TestClient(TestServer(app)) as client:
        yield Api(client, fake, users)


def _code(body: Any) -> str:
    return str(body["error"]["code"])


async def test_a_request_without_a_token_gets_401_with_a_bearer_challenge(api: Api) -> None:
    status, headers, body = await api.send("PUT", "/v1/kv/a/x", data=b"v")
    assert (status, _code(body)) == (401, "unauthenticated")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert api.fake.stored("a/x") is None


@pytest.mark.parametrize(
    "authorization",
    ["Bearer kvt_nobody-was-given-this", "Basic YWRtaW46YWRtaW4=", "Bearer", "bearer  x y"],
)
async def test_a_wrong_or_malformed_token_gets_401(api: Api, authorization: str) -> None:
    status, _, body = await api.send(
        "PUT", "/v1/kv/a/x", data=b"v", headers={"Authorization": authorization}
    )
    assert (status, _code(body)) == (401, "unauthenticated")
    assert api.fake.stored("a/x") is None
    assert api.fake.calls == []


async def test_a_read_only_token_cannot_write_and_nothing_is_written(api: Api) -> None:
    for method, path in (("PUT", "/v1/kv/a/x"), ("DELETE", "/v1/kv/a/x")):
        status, _, body = await api.send(method, path, READER_TOKEN, data=b"v")
        assert (status, _code(body)) == (403, "forbidden"), body
    txn = {"success": [{"op": "put", "key": "a/x", "value": "dg=="}]}
    status, _, body = await api.send("POST", "/v1/txn", READER_TOKEN, json=txn)
    assert (status, _code(body)) == (403, "forbidden")
    assert api.fake.calls == []
    status, _, _ = await api.send("GET", "/v1/scan", READER_TOKEN)
    assert status == 200


async def test_a_token_for_prefix_a_cannot_read_b_nor_scan_across_both(api: Api) -> None:
    assert (await api.send("PUT", "/v1/kv/a/x", A_TOKEN, data=b"1"))[0] == 200
    status, _, body = await api.send("GET", "/v1/kv/b/y", A_TOKEN)
    assert (status, _code(body)) == (403, "forbidden")
    assert "'b/y'" in body["error"]["message"]
    status, _, body = await api.send("GET", "/v1/scan", A_TOKEN)  # every key: a/ and b/
    assert (status, _code(body)) == (403, "forbidden")
    assert "prefix ''" in body["error"]["message"]
    status, _, body = await api.send("GET", "/v1/scan?prefix=a/", A_TOKEN)
    assert status == 200
    assert [item["key"] for item in body["items"]] == ["a/x"]
    txn = {"compare": [{"key": "b/y", "target": "version", "op": "==", "version": 0}]}
    txn["success"] = [{"op": "put", "key": "a/z", "value": "dg=="}]
    status, _, body = await api.send("POST", "/v1/txn", A_TOKEN, json=txn)
    assert (status, _code(body)) == (403, "forbidden")
    assert api.fake.stored("a/z") is None


@pytest.mark.parametrize(
    ("bounds", "allowed"),
    [
        ({}, False),  # every key
        ({"prefix": "b/"}, False),
        ({"start": "a/", "end": "b/"}, False),  # shares only "": may hold a/ and b/ keys
        ({"start": "a/"}, False),  # unbounded above
        ({"prefix": "a/"}, True),
        ({"start": "a/k", "end": "a/m"}, True),  # every key in it starts with a/
    ],
)
async def test_a_token_for_prefix_a_may_query_only_ranges_inside_a(
    api: Api, bounds: dict[str, str], allowed: bool
) -> None:
    for key in ("a/l", "b/l"):
        assert (await api.send("PUT", f"/v1/kv/{key}", ADMIN_TOKEN, data=b"{}"))[0] == 200
    query = {**bounds, "select": "*"}
    status, _, body = await api.send("POST", "/v1/query", A_TOKEN, json=query)
    if allowed:
        assert status == 200, body
        assert [row["key"] for row in body["rows"]] == ["a/l"]
    else:
        assert (status, _code(body)) == (403, "forbidden"), body
        assert "query" not in [call.method for call in api.fake.calls]


async def test_probes_and_metrics_need_no_token_but_the_cluster_view_does(api: Api) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert (await api.send("GET", path))[0] == 200, path
    assert (await api.send("GET", "/v1/cluster"))[0] == 401
    assert (await api.send("GET", "/v1/cluster", READER_TOKEN))[0] == 200
    assert (await api.send("GET", "/no/such/route"))[0] == 401  # no routing hints before auth


async def test_only_an_admin_manages_users_and_a_new_token_works_at_once(api: Api) -> None:
    new_user = {"name": "bob", "grants": {"read": ["b/"]}}
    status, _, body = await api.send("POST", "/v1/auth/users", A_TOKEN, json=new_user)
    assert (status, _code(body)) == (403, "forbidden")
    status, _, body = await api.send("POST", "/v1/auth/users", ADMIN_TOKEN, json=new_user)
    assert status == 200, body
    token = body["token"]
    assert token.startswith("kvt_")
    assert len(token) > 40
    assert api.users.by_name["bob"].token_sha256 == hash_token(token)  # only the hash is kept
    status, _, who = await api.send("GET", "/v1/auth/whoami", token)
    assert (status, who["name"], who["grants"]["read"]) == (200, "bob", ["b/"])
    status, _, listed = await api.send("GET", "/v1/auth/users", ADMIN_TOKEN)
    assert "bob" in [user["name"] for user in listed["users"]]
    assert "token" not in json.dumps(listed)
    assert (await api.send("DELETE", "/v1/auth/users/bob", ADMIN_TOKEN))[0] == 200
    assert (await api.send("GET", "/v1/auth/whoami", token))[0] == 401


@pytest.mark.parametrize(
    "doc",
    [
        {"name": "bad name!", "grants": {}},
        {"name": "x", "grants": {"read": "a/"}},
        {"name": "x", "grants": {"admin": "yes"}},
        {"name": "x", "grants": {"sudo": True}},
        {"name": "x"},
    ],
)
async def test_a_malformed_user_is_a_400(api: Api, doc: dict[str, Any]) -> None:
    status, _, body = await api.send("POST", "/v1/auth/users", ADMIN_TOKEN, json=doc)
    assert (status, _code(body)) == (400, "invalid_request")


async def test_a_client_over_its_concurrency_limit_gets_429(api: Api) -> None:
    gate = api.fake.cluster_status_gate = asyncio.Event()
    entered = api.fake.cluster_status_entered = asyncio.Queue()
    held = [asyncio.create_task(api.send("GET", "/v1/cluster", READER_TOKEN)) for _ in range(2)]
    async with asyncio.timeout(10):  # both requests are inside the service, in flight
        await entered.get()
        await entered.get()
    status, _, body = await api.send("GET", "/v1/cluster", READER_TOKEN)
    assert (status, _code(body)) == (429, "too_many_requests")
    gate.set()
    assert [reply[0] for reply in await asyncio.gather(*held)] == [200, 200]
    assert (await api.send("GET", "/v1/cluster", READER_TOKEN))[0] == 200  # slots came back


async def test_with_auth_off_everyone_is_the_anonymous_superuser() -> None:
    app = create_app(FakeKVService(), registry=CollectorRegistry())
    async with TestClient(TestServer(app)) as client:
        async with client.put("/v1/kv/b/y", data=b"v") as response:
            assert response.status == 200
        async with client.get("/v1/auth/whoami") as response:
            who = await response.json()
    assert who == {
        "name": "anonymous",
        "grants": {"admin": True, "read": [], "write": []},
        "auth_enabled": False,
    }
