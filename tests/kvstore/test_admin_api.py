"""The admin routes turn a request into one shard map change, and bad input into a JSON 400."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from kvstore.admin_api import add_admin_routes
from kvstore.errors import PreconditionFailed
from kvstore.http_api import create_app
from kvstore.map_changes import AddNode, DrainNode, MapChange, decode_change
from kvstore.service import KeyVersion, RequestContext
from kvstore.sharding import META_GROUP_ID, NodeInfo
from raft.core.types import NodeId
from tests.kvstore.fake_service import FakeKVService


class RecordingProposer:
    def __init__(self) -> None:
        self.changes: list[MapChange] = []
        self.refuse = False

    async def propose(self, shard_id: int, command: bytes, ctx: RequestContext) -> object:
        assert shard_id == META_GROUP_ID
        tag, *fields = msgpack.unpackb(command)
        self.changes.append(decode_change(tag, fields))
        if self.refuse:
            raise PreconditionFailed("node 4 is already in the cluster", 7)
        return KeyVersion("(shard map)", 8)


@pytest.fixture
async def admin() -> AsyncIterator[tuple[TestClient, RecordingProposer]]:  # type: ignore[type-arg]
    proposer = RecordingProposer()
    app = create_app(FakeKVService(), registry=CollectorRegistry())
    add_admin_routes(app, proposer)
    async with TestClient(TestServer(app)) as client:
        yield client, proposer


async def test_adding_a_node_proposes_it_and_answers_the_new_epoch(admin):
    client, proposer = admin
    body = {"id": 4, "client_url": "http://127.0.0.1:7004/", "peer_address": "127.0.0.1:7104"}
    response = await client.post("/v1/admin/nodes", data=json.dumps(body))
    assert response.status == 200
    assert await response.json() == {"epoch": 8}
    assert proposer.changes == [
        AddNode(NodeInfo(NodeId(4), "http://127.0.0.1:7004", ("127.0.0.1", 7104)))
    ]


async def test_draining_a_node_proposes_it(admin):
    client, proposer = admin
    response = await client.post("/v1/admin/nodes/3/drain")
    assert response.status == 200
    assert proposer.changes == [DrainNode(NodeId(3))]


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
        b"{" + b" " * 5000 + b"}",
    ],
)
async def test_a_malformed_node_is_a_json_400_and_proposes_nothing(admin, body):
    client, proposer = admin
    response = await client.post("/v1/admin/nodes", data=body)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"
    assert proposer.changes == []


@pytest.mark.parametrize("node_id", ["0", "x", "-1", "99999", "1.5"])
async def test_a_bad_node_id_to_drain_is_a_json_400(admin, node_id):
    client, proposer = admin
    response = await client.post(f"/v1/admin/nodes/{node_id}/drain")
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"
    assert proposer.changes == []


async def test_a_refused_change_is_a_412(admin):
    client, proposer = admin
    proposer.refuse = True
    body = {"id": 4, "client_url": "http://a:1", "peer_address": "a:2"}
    response = await client.post("/v1/admin/nodes", data=json.dumps(body))
    assert response.status == 412
    assert (await response.json())["error"]["code"] == "precondition_failed"
