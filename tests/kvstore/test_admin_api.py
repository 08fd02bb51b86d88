"""The /v1/admin/* routes over a fake AdminService: status codes, headers, JSON errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from kvstore.admin_api import add_admin_routes
from kvstore.http_api import create_app
from tests.kvstore.fake_admin import FakeAdminService
from tests.kvstore.fake_service import FakeKVService


@pytest.fixture
def admin() -> FakeAdminService:
    return FakeAdminService()


@pytest.fixture
async def client(admin: FakeAdminService) -> AsyncIterator[TestClient]:
    app = create_app(FakeKVService(), registry=CollectorRegistry())
    add_admin_routes(app, admin)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_a_check_reports_every_shard_and_is_remembered(client: TestClient) -> None:
    response = await client.post("/v1/admin/check")
    assert response.status == 200
    report = await response.json()
    assert report["consistent"] is True
    assert report["divergent"] == []
    assert [shard["shard"] for shard in report["shards"]] == [1, 2]
    assert (await (await client.get("/v1/admin/check")).json()) == report


async def test_a_shard_backup_comes_with_its_facts_in_headers(client: TestClient) -> None:
    response = await client.get("/v1/admin/snapshot/2")
    assert response.status == 200
    assert await response.read() == b"backup-of-2"
    assert response.headers["X-KV-Shard"] == "2"
    assert response.headers["X-KV-Applied-Index"] == "7"
    assert response.headers["X-KV-Content-Digest"] == "0000000000000abc"


async def test_a_restore_refuses_a_shard_with_keys_unless_replace(client: TestClient) -> None:
    first = await client.put("/v1/admin/snapshot/1", data=b"backup-of-1data")
    assert first.status == 200
    assert (await first.json())["content_digest"] == "0000000000000abc"
    again = await client.put("/v1/admin/snapshot/1", data=b"backup-of-1more")
    assert again.status == 412
    replaced = await client.put("/v1/admin/snapshot/1?replace=true", data=b"backup-of-1more")
    assert replaced.status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/admin/snapshot/99", 404, "not_found"),
        ("GET", "/v1/admin/snapshot/-1", 400, "invalid_request"),
        ("GET", "/v1/admin/snapshot/1x", 400, "invalid_request"),
        ("GET", "/v1/admin/snapshot/99999999999999999999", 400, "invalid_request"),
        ("PUT", "/v1/admin/snapshot/1?replace=yes", 400, "invalid_request"),
        ("PUT", "/v1/admin/snapshot/1?replace=true&replace=true", 400, "invalid_request"),
        ("PUT", "/v1/admin/snapshot/1", 400, "invalid_request"),  # not a backup of shard 1
        ("DELETE", "/v1/admin/snapshot/1", 405, "method_not_allowed"),
    ],
)
async def test_bad_admin_requests_get_json_errors(
    client: TestClient, method: str, path: str, status: int, code: str
) -> None:
    response = await client.request(method, path, data=b"garbage")
    assert response.status == status
    assert (await response.json())["error"]["code"] == code


async def test_a_backup_over_the_limit_is_refused_with_413(
    client: TestClient, admin: FakeAdminService
) -> None:
    admin.limits = type(admin.limits)(max_shard_backup_bytes=16)
    response = await client.put("/v1/admin/snapshot/1", data=b"backup-of-1" + b"x" * 100)
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"
