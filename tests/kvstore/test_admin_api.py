"""The /v1/admin/* routes over a fake AdminService and a recording meta proposer: status codes,
headers, JSON errors; a membership request becomes one shard map change."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from kvstore.admin_api import add_admin_routes
from kvstore.http_api import create_app
from kvstore.map_changes import AddNode, DrainNode, StartSplit
from kvstore.sharding import TOKEN_SPACE, NodeInfo
from raft.core.types import NodeId
from tests.kvstore.fake_admin import FakeAdminService, RecordingMetaProposer
from tests.kvstore.fake_service import FakeKVService


@pytest.fixture
def admin() -> FakeAdminService:
    return FakeAdminService()


@pytest.fixture
def proposer() -> RecordingMetaProposer:
    return RecordingMetaProposer()


@pytest.fixture
async def client(
    admin: FakeAdminService, proposer: RecordingMetaProposer
) -> AsyncIterator[TestClient]:
    app = create_app(FakeKVService(), registry=CollectorRegistry())
    add_admin_routes(app, admin, proposer)
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


async def test_adding_a_node_proposes_it_and_answers_the_new_epoch(client, proposer):
    body = {"id": 4, "client_url": "http://127.0.0.1:7004/", "peer_address": "127.0.0.1:7104"}
    response = await client.post("/v1/admin/nodes", data=json.dumps(body))
    assert response.status == 200
    assert await response.json() == {"epoch": 8}
    assert proposer.changes == [
        AddNode(NodeInfo(NodeId(4), "http://127.0.0.1:7004", ("127.0.0.1", 7104)))
    ]


async def test_draining_a_node_proposes_it(client, proposer):
    response = await client.post("/v1/admin/nodes/3/drain")
    assert response.status == 200
    assert proposer.changes == [DrainNode(NodeId(3))]


async def test_splitting_a_shard_proposes_a_cut_at_the_middle_of_its_range(client, proposer):
    response = await client.post("/v1/admin/shards/2/split")
    assert response.status == 200
    assert await response.json() == {"epoch": 8}
    upper_half = proposer.shard_map.shard(2)
    assert upper_half.end_token == TOKEN_SPACE
    middle = (upper_half.start_token + TOKEN_SPACE) // 2
    assert proposer.changes == [StartSplit(2, middle)]


@pytest.mark.parametrize(("shard", "status"), [("9", 404), ("x", 400), ("-1", 400)])
async def test_splitting_a_bad_shard_is_a_json_error_and_proposes_nothing(
    client, proposer, shard, status
):
    response = await client.post(f"/v1/admin/shards/{shard}/split")
    assert response.status == status
    assert "error" in await response.json()
    assert proposer.changes == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"id": 4}',
        b'{"id": 0, "client_url": "http://a:1", "peer_address": "a:2"}',
        b'{"id": 70000, "client_url": "http://a:1", "peer_address": "a:2"}',
        b'{"id": "4x", "client_url": "http://a:1", "peer_address": "a:2"}',
        b'{"id": 4, "client_url": "ftp://a:1", "peer_address": "a:2"}',
        b'{"id": 4, "client_url": "http://a:1", "peer_address": "a"}',
        b'{"id": 4, "client_url": "http://a:1", "peer_address": "a:2", "x": 1}',
    ],
)
async def test_a_malformed_node_is_a_json_400_and_proposes_nothing(client, proposer, body):
    response = await client.post("/v1/admin/nodes", data=body)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"
    assert proposer.changes == []


@pytest.mark.parametrize("node_id", ["0", "x", "-1", "99999", "1.5"])
async def test_a_bad_node_id_to_drain_is_a_json_400(client, proposer, node_id):
    response = await client.post(f"/v1/admin/nodes/{node_id}/drain")
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"
    assert proposer.changes == []


async def test_a_refused_change_is_a_412(client, proposer):
    proposer.refuse = True
    body = {"id": 4, "client_url": "http://a:1", "peer_address": "a:2"}
    response = await client.post("/v1/admin/nodes", data=json.dumps(body))
    assert response.status == 412
    assert (await response.json())["error"]["code"] == "precondition_failed"


async def test_a_node_description_over_the_limit_is_a_413(client, proposer):
    response = await client.post("/v1/admin/nodes", data=b"{" + b" " * 5000 + b"}")
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"
    assert proposer.changes == []
