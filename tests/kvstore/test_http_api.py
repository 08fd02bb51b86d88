"""kvstore.http_api against the in-memory FakeKVService, through aiohttp's test server.

Requests go out with pre-encoded URLs (`yarl.URL(..., encoded=True)`) so the test controls every
byte of the path and query; aiohttp's client would otherwise requote escapes and drop dot segments.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from yarl import URL

from kvstore.errors import KVError, OutcomeUnknown, ShardUnavailable, StaleShardMap
from kvstore.http_api import create_app, txn_body_limit_bytes
from kvstore.service import Consistency, Limits, TxnOpKind
from tests.kvstore.fake_service import OTHER_SHARD_PREFIX, FakeKVService

LIMITS = Limits(
    max_key_bytes=64, max_value_bytes=1024, max_scan_limit=50, default_scan_limit=10, max_txn_ops=4
)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str:
        doc = self.json()
        assert set(doc) == {"error"}, doc
        assert isinstance(doc["error"]["message"], str)
        return str(doc["error"]["code"])


class Api:
    """A thin client that sends exactly the bytes of `raw` (path plus query)."""

    def __init__(self, client: TestClient[web.Request, web.Application]) -> None:
        self._client = client

    async def send(self, method: str, raw: str, **kwargs: Any) -> Reply:
        url = URL(f"http://{self._client.host}:{self._client.port}{raw}", encoded=True)
        async with self._client.session.request(method, url, **kwargs) as response:
            return Reply(response.status, dict(response.headers), await response.read())

    async def put(self, key: str, value: bytes, query: str = "", **kwargs: Any) -> Reply:
        return await self.send("PUT", f"/v1/kv/{quote(key, safe='')}{query}", data=value, **kwargs)

    async def get(self, key: str, query: str = "", **kwargs: Any) -> Reply:
        return await self.send("GET", f"/v1/kv/{quote(key, safe='')}{query}", **kwargs)

    async def delete(self, key: str, query: str = "", **kwargs: Any) -> Reply:
        return await self.send("DELETE", f"/v1/kv/{quote(key, safe='')}{query}", **kwargs)

    async def txn(self, doc: Any, **kwargs: Any) -> Reply:
        return await self.send("POST", "/v1/txn", data=json.dumps(doc).encode(), **kwargs)


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


@pytest.fixture
def fake() -> FakeKVService:
    return FakeKVService(limits=LIMITS)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def api(fake: FakeKVService, registry: CollectorRegistry) -> AsyncIterator[Api]:
    async with TestClient(TestServer(create_app(fake, registry=registry))) as client:
        yield Api(client)


# --- happy paths -----------------------------------------------------------------------------


async def test_put_then_get_returns_the_bytes_with_their_version(api: Api) -> None:
    put = await api.put("greeting", b"\x00hello\xff")
    assert put.status == 200
    assert put.json() == {"key": "greeting", "version": 1}

    got = await api.get("greeting")
    assert got.status == 200
    assert got.body == b"\x00hello\xff"
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.headers["X-KV-Version"] == "1"


async def test_versions_increase_across_keys_and_are_never_reused(api: Api) -> None:
    versions = [(await api.put(key, b"v")).json()["version"] for key in ("a", "b", "a")]
    assert versions == [1, 2, 3]
    assert (await api.delete("a")).json() == {"key": "a", "version": 3}
    assert (await api.put("a", b"again")).json()["version"] == 5  # the delete took index 4


async def test_put_with_if_version_zero_only_creates(api: Api) -> None:
    assert (await api.put("k", b"1", "?if_version=0")).status == 200
    second = await api.put("k", b"2", "?if_version=0")
    assert second.status == 412
    assert second.error_code() == "precondition_failed"
    assert second.json()["error"]["current_version"] == 1


async def test_put_with_the_current_version_succeeds_and_a_stale_one_gets_412(api: Api) -> None:
    version = (await api.put("k", b"1")).json()["version"]
    assert (await api.put("k", b"2", f"?if_version={version}")).status == 200
    stale = await api.put("k", b"3", f"?if_version={version}")
    assert stale.status == 412
    assert stale.json()["error"]["current_version"] == version + 1
    assert (await api.get("k")).body == b"2"


async def test_get_of_an_absent_key_is_a_json_404(api: Api) -> None:
    reply = await api.get("nope")
    assert reply.status == 404
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.error_code() == "not_found"


async def test_delete_returns_the_deleted_version_then_404(api: Api) -> None:
    await api.put("k", b"v")
    assert (await api.delete("k")).json() == {"key": "k", "version": 1}
    assert (await api.delete("k")).status == 404
    assert (await api.get("k")).status == 404


async def test_delete_with_a_wrong_if_version_is_412_and_keeps_the_key(api: Api) -> None:
    await api.put("k", b"v")
    reply = await api.delete("k", "?if_version=7")
    assert reply.status == 412
    assert reply.json()["error"]["current_version"] == 1
    assert (await api.delete("k", "?if_version=1")).status == 200


@pytest.mark.parametrize(
    ("raw_key", "key"),
    [
        ("dir/sub/file", "dir/sub/file"),
        ("dir%2Fsub%2Ffile", "dir/sub/file"),
        ("caf%C3%A9", "café"),
        ("a+b", "a+b"),
        ("%25ff", "%ff"),
        ("a/%2E%2E/b", "a/../b"),
        ("a/../b", "a/../b"),
        ("/lead//double", "/lead//double"),
        ("sp%20ace%09tab", "sp ace\ttab"),
    ],
)
async def test_keys_are_percent_decoded_once_and_may_hold_any_utf8(
    api: Api, fake: FakeKVService, raw_key: str, key: str
) -> None:
    reply = await api.send("PUT", f"/v1/kv/{raw_key}", data=b"v")
    assert reply.status == 200, reply.body
    assert reply.json()["key"] == key
    assert fake.stored(key) is not None
    assert (await api.get(key)).body == b"v"


async def test_consistency_defaults_to_linearizable_and_stale_is_passed_through(
    api: Api, fake: FakeKVService
) -> None:
    await api.put("k", b"v")
    await api.get("k")
    await api.get("k", "?consistency=stale&unknown=ignored")
    gets = [call.args["consistency"] for call in fake.calls if call.method == "get"]
    assert gets == [Consistency.LINEARIZABLE, Consistency.STALE]


async def test_idempotency_key_and_hops_reach_the_service(api: Api, fake: FakeKVService) -> None:
    headers = {"Idempotency-Key": "req-1 abc", "X-KV-Hops": "2"}
    await api.put("k", b"v", headers=headers)
    ctx = fake.calls[-1].ctx
    assert ctx is not None
    assert (ctx.idempotency_key, ctx.hops) == ("req-1 abc", 2)
    await api.get("k")
    ctx = fake.calls[-1].ctx
    assert ctx is not None
    assert (ctx.idempotency_key, ctx.hops) == (None, 0)


async def test_idempotency_key_is_ignored_on_reads(api: Api, fake: FakeKVService) -> None:
    await api.put("k", b"v")
    reply = await api.get("k", headers={"Idempotency-Key": "\u00e9" * 200})
    assert reply.status == 200
    assert fake.calls[-1].ctx is not None
    assert fake.calls[-1].ctx.idempotency_key is None


async def test_a_retried_put_with_the_same_idempotency_key_applies_once(
    api: Api, fake: FakeKVService
) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    first = await api.put("k", b"v", headers=headers)
    second = await api.put("k", b"v", headers=headers)
    assert first.json() == second.json() == {"key": "k", "version": 1}
    assert fake.last_version == 1


async def test_a_retried_txn_with_the_same_idempotency_key_applies_once(
    api: Api, fake: FakeKVService
) -> None:
    doc = {"success": [{"op": "put", "key": "k", "value": b64(b"v")}]}
    first = await api.txn(doc, headers={"Idempotency-Key": "t1"})
    second = await api.txn(doc, headers={"Idempotency-Key": "t1"})
    assert first.json() == second.json()
    assert fake.last_version == 1


async def test_scan_pages_through_keys_in_order(api: Api) -> None:
    keys = [f"user/{i:02d}" for i in range(7)] + ["other/x"]
    for key in reversed(keys):
        await api.put(key, key.encode())
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = "?prefix=user%2F&limit=3" + ("" if cursor is None else f"&cursor={quote(cursor)}")
        reply = await api.send("GET", f"/v1/scan{query}")
        assert reply.status == 200
        doc = reply.json()
        for item in doc["items"]:
            assert base64.b64decode(item["value"]) == item["key"].encode()
            assert item["version"] >= 1
        seen += [item["key"] for item in doc["items"]]
        pages += 1
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(k for k in keys if k.startswith("user/"))
    assert pages == 3


async def test_scan_honours_start_and_end_and_the_default_limit(
    api: Api, fake: FakeKVService
) -> None:
    for key in "abcdef":
        await api.put(key, b"v")
    reply = await api.send("GET", "/v1/scan?start=b&end=e")
    assert [item["key"] for item in reply.json()["items"]] == ["b", "c", "d"]
    assert reply.json()["next_cursor"] is None
    assert fake.calls[-1].args["limit"] == LIMITS.default_scan_limit


async def test_scan_treats_empty_parameters_as_absent(api: Api, fake: FakeKVService) -> None:
    await api.put("a", b"v")
    reply = await api.send("GET", "/v1/scan?prefix=&start=&end=&cursor=")
    assert reply.status == 200
    assert [item["key"] for item in reply.json()["items"]] == ["a"]
    args = fake.calls[-1].args
    assert (args["prefix"], args["start"], args["end"], args["cursor"]) == ("", None, None, None)


async def test_txn_runs_the_success_branch_when_every_compare_holds(api: Api) -> None:
    await api.put("a", b"old")
    reply = await api.txn(
        {
            "compare": [
                {"key": "a", "target": "version", "op": "==", "version": 1},
                {"key": "a", "target": "value", "op": "==", "value": b64(b"old")},
                {"key": "b", "target": "version", "op": "<", "version": 1},
            ],
            "success": [
                {"op": "put", "key": "b", "value": b64(b"new")},
                {"op": "get", "key": "a"},
                {"op": "delete", "key": "a"},
                {"op": "get", "key": "a"},
            ],
            "failure": [{"op": "get", "key": "a"}],
        }
    )
    assert reply.status == 200, reply.body
    assert reply.json() == {
        "succeeded": True,
        "results": [
            {"op": "put", "key": "b", "version": 2},
            {"op": "get", "key": "a", "version": 1, "value": b64(b"old")},
            {"op": "delete", "key": "a", "version": 1},
            {"op": "get", "key": "a", "version": 0, "value": None},
        ],
    }
    assert (await api.get("b")).headers["X-KV-Version"] == "2"


async def test_txn_runs_the_failure_branch_when_a_compare_fails(api: Api) -> None:
    await api.put("a", b"v")
    reply = await api.txn(
        {
            "compare": [{"key": "a", "target": "version", "op": "==", "version": 0}],
            "success": [{"op": "delete", "key": "a"}],
            "failure": [{"op": "get", "key": "a"}],
        }
    )
    assert reply.json() == {
        "succeeded": False,
        "results": [{"op": "get", "key": "a", "version": 1, "value": b64(b"v")}],
    }


async def test_an_empty_txn_succeeds_with_no_results(api: Api) -> None:
    assert (await api.txn({})).json() == {"succeeded": True, "results": []}


async def test_txn_parses_into_the_service_types(api: Api, fake: FakeKVService) -> None:
    await api.txn({"success": [{"op": "put", "key": "k", "value": ""}]})
    request = fake.calls[-1].args["request"]
    assert request.success[0].kind is TxnOpKind.PUT
    assert request.success[0].value == b""


async def test_a_txn_spanning_shards_is_400_cross_shard_txn(api: Api) -> None:
    reply = await api.txn(
        {
            "compare": [{"key": "a", "target": "version", "op": "==", "version": 0}],
            "success": [{"op": "put", "key": "other-shard/b", "value": b64(b"v")}],
        }
    )
    assert reply.status == 400
    assert reply.error_code() == "cross_shard_txn"
    assert "shard" in reply.json()["error"]["message"]


async def test_cluster_returns_the_service_status_as_is(api: Api, fake: FakeKVService) -> None:
    reply = await api.send("GET", "/v1/cluster")
    assert reply.status == 200
    assert reply.json() == fake.status


async def test_health_is_always_ok(api: Api, fake: FakeKVService) -> None:
    fake.failure = RuntimeError("everything is down")
    fake.ready = (False, "no leader for shard 3")
    reply = await api.send("GET", "/health")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})


async def test_ready_reports_the_service_readiness(api: Api, fake: FakeKVService) -> None:
    assert (await api.send("GET", "/ready")).json() == {"ready": True}
    fake.ready = (False, "no leader for shard 3")
    reply = await api.send("GET", "/ready")
    assert reply.status == 503
    assert reply.json() == {"ready": False, "reason": "no leader for shard 3"}
    assert reply.headers["Retry-After"] == "1"


async def test_metrics_count_requests_by_route_template(api: Api) -> None:
    await api.put("a/b", b"v")
    await api.get("a/b")
    await api.get("missing")
    await api.send("GET", "/no/such/route")
    reply = await api.send("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    text = reply.body.decode()
    assert 'kv_http_requests_total{method="PUT",route="/v1/kv/{key}",status="200"} 1.0' in text
    assert 'kv_http_requests_total{method="GET",route="/v1/kv/{key}",status="404"} 1.0' in text
    assert 'kv_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'kv_http_request_duration_seconds_count{method="GET",route="/v1/kv/{key}"} 2.0' in text
    assert "a/b" not in text  # raw paths never become labels


# --- errors from the service -----------------------------------------------------------------


async def test_shard_unavailable_is_503_with_retry_after(api: Api, fake: FakeKVService) -> None:
    fake.failure = ShardUnavailable("shard 2 has no leader", retry_after_s=3)
    reply = await api.get("k")
    assert reply.status == 503
    assert reply.headers["Retry-After"] == "3"
    assert reply.json()["error"] == {
        "code": "shard_unavailable",
        "message": "shard 2 has no leader",
        "retry_after_s": 3,
    }


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (OutcomeUnknown("timed out"), 504, "outcome_unknown"),
        (StaleShardMap("epoch 3 < 4"), 409, "stale_shard_map"),
    ],
)
async def test_service_errors_map_to_their_status(
    api: Api, fake: FakeKVService, failure: Exception, status: int, code: str
) -> None:
    fake.failure = failure
    reply = await api.put("k", b"v")
    assert reply.status == status
    assert reply.error_code() == code


@pytest.mark.parametrize(
    ("method", "raw", "kwargs"),
    [
        ("GET", "/v1/kv/k", {}),
        ("PUT", "/v1/kv/k", {"data": b"v"}),
        ("DELETE", "/v1/kv/k", {}),
        ("GET", "/v1/scan", {}),
        ("POST", "/v1/txn", {"data": b"{}"}),
        ("GET", "/v1/cluster", {}),
    ],
)
async def test_an_unexpected_exception_is_a_500_without_details(
    api: Api,
    fake: FakeKVService,
    caplog: pytest.LogCaptureFixture,
    method: str,
    raw: str,
    kwargs: dict[str, Any],
) -> None:
    fake.failure = RuntimeError("secret-detail")
    with caplog.at_level(logging.ERROR, logger="kvstore.http_api"):
        reply = await api.send(method, raw, headers={"Accept": "text/html"}, **kwargs)
    assert reply.status == 500
    assert reply.json() == {
        "error": {"code": "internal", "message": "internal error; see the node log"}
    }
    assert b"secret" not in reply.body
    assert b"Traceback" not in reply.body
    assert "secret-detail" in caplog.text  # the traceback goes to the log instead


async def test_a_bare_kv_error_is_treated_as_a_bug(api: Api, fake: FakeKVService) -> None:
    fake.failure = KVError("storage detail")
    reply = await api.get("k")
    assert reply.status == 500
    assert reply.json()["error"]["message"] == "internal error; see the node log"


async def test_ready_raising_is_a_json_500(api: Api, fake: FakeKVService) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    fake.is_ready = broken  # type: ignore[method-assign]
    reply = await api.send("GET", "/ready")
    assert reply.status == 500
    assert reply.error_code() == "internal"


# --- bad input -------------------------------------------------------------------------------

BAD_KEYS = [
    ("", 400),
    ("%ff", 400),  # not UTF-8
    ("%C3", 400),  # truncated UTF-8
    ("%ED%A0%80", 400),  # an encoded surrogate
    ("%zz", 400),  # malformed escape
    ("a%2", 400),
    ("a%00b", 400),
    ("k" * 65, 413),
    ("%C3%A9" * 32 + "x", 413),  # 65 bytes in 33 characters
]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize(("raw_key", "status"), BAD_KEYS)
async def test_bad_keys_are_rejected_before_the_service_sees_them(
    api: Api, fake: FakeKVService, method: str, raw_key: str, status: int
) -> None:
    reply = await api.send(method, f"/v1/kv/{raw_key}", data=b"v" if method == "PUT" else None)
    assert reply.status == status, reply.body
    assert reply.error_code() == ("invalid_request" if status == 400 else "payload_too_large")
    assert fake.calls == []


async def test_a_key_of_exactly_the_byte_limit_is_accepted(api: Api) -> None:
    assert (await api.put("\u00e9" * 32, b"v")).status == 200


async def test_a_value_of_exactly_the_limit_is_accepted(api: Api) -> None:
    assert (await api.put("k", b"x" * LIMITS.max_value_bytes)).status == 200


async def test_an_oversized_value_is_a_json_413(api: Api, fake: FakeKVService) -> None:
    reply = await api.put("k", b"x" * (LIMITS.max_value_bytes + 1))
    assert reply.status == 413
    assert reply.error_code() == "payload_too_large"
    assert fake.calls == []


async def test_an_oversized_chunked_value_is_a_json_413(api: Api, fake: FakeKVService) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * (LIMITS.max_value_bytes // 2)

    reply = await api.send("PUT", "/v1/kv/k", data=chunks())
    assert reply.status == 413
    assert reply.error_code() == "payload_too_large"
    assert fake.calls == []


async def test_an_oversized_txn_body_is_a_json_413(api: Api) -> None:
    body = io.BytesIO(b" " * (txn_body_limit_bytes(LIMITS) + 1))
    reply = await api.send("POST", "/v1/txn", data=body)
    assert reply.status == 413
    assert reply.error_code() == "payload_too_large"


@pytest.mark.parametrize(
    "value",
    ["abc", "-1", "1.5", "", "+1", "%201", "1_0", "0x1", "%D9%A1", "9223372036854775808", "9" * 50],
)
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_bad_if_version_is_400(
    api: Api, fake: FakeKVService, method: str, value: str
) -> None:
    reply = await api.send(method, f"/v1/kv/k?if_version={value}", data=b"v")
    assert reply.status == 400
    assert reply.error_code() == "invalid_request"
    assert fake.calls == []


async def test_the_largest_if_version_is_accepted(api: Api) -> None:
    reply = await api.put("k", b"v", "?if_version=9223372036854775807")
    assert reply.status == 412


async def test_a_repeated_query_parameter_is_400(api: Api) -> None:
    reply = await api.put("k", b"v", "?if_version=0&if_version=1")
    assert reply.status == 400


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=51",
        "limit=abc",
        "limit=-1",
        "limit=",
        "consistency=strong",
        "consistency=",
        "consistency=LINEARIZABLE",
        "cursor=" + "c" * 8193,
        "cursor=not-a-cursor-the-service-issued",
        "prefix=%ff",
        "start=a%00",
        "end=" + "e" * 65,
        "prefix=%zz",
        "%ff=1",
    ],
)
async def test_bad_scan_parameters_are_400(api: Api, query: str) -> None:
    reply = await api.send("GET", f"/v1/scan?{query}")
    assert reply.status == 400, reply.body
    assert reply.error_code() == "invalid_request"


async def test_bad_consistency_on_get_is_400(api: Api) -> None:
    reply = await api.get("k", "?consistency=eventual")
    assert reply.status == 400


@pytest.mark.parametrize(
    "headers",
    [
        {"Idempotency-Key": ""},
        {"Idempotency-Key": "x" * 129},
        {"Idempotency-Key": "caf\u00e9"},
        {"Idempotency-Key": "a\tb"},
        {"X-KV-Hops": "-1"},
        {"X-KV-Hops": "x"},
        {"X-KV-Hops": "1.0"},
        {"X-KV-Hops": ""},
        {"X-KV-Hops": "1001"},
        {"X-KV-Hops": "9" * 40},
    ],
)
@pytest.mark.parametrize(
    ("method", "raw", "body"),
    [("PUT", "/v1/kv/k", b"v"), ("DELETE", "/v1/kv/k", b""), ("POST", "/v1/txn", b"{}")],
)
async def test_bad_request_headers_are_400(
    api: Api, fake: FakeKVService, headers: dict[str, str], method: str, raw: str, body: bytes
) -> None:
    reply = await api.send(method, raw, data=body, headers=headers)
    assert reply.status == 400, reply.body
    assert reply.error_code() == "invalid_request"
    assert fake.calls == []


async def test_a_bad_hops_header_is_400_on_reads_too(api: Api) -> None:
    assert (await api.get("k", headers={"X-KV-Hops": "no"})).status == 400
    assert (await api.send("GET", "/v1/scan", headers={"X-KV-Hops": "no"})).status == 400


async def test_a_repeated_idempotency_key_header_is_400(api: Api) -> None:
    headers = [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    assert (await api.put("k", b"v", headers=headers)).status == 400


async def test_the_longest_idempotency_key_is_accepted(api: Api, fake: FakeKVService) -> None:
    key = "x" + "".join(map(chr, range(0x20, 0x7F))) + "x" * 32  # every printable character
    assert len(key) == 128
    assert (await api.put("k", b"v", headers={"Idempotency-Key": key})).status == 200
    assert fake.calls[-1].ctx is not None
    assert fake.calls[-1].ctx.idempotency_key == key


def _put(key: str = "k", value: str = "dg==") -> dict[str, Any]:
    return {"op": "put", "key": key, "value": value}


def _cmp(**fields: Any) -> dict[str, Any]:
    return {"compare": [{"key": "k", **fields}]}


VERSION_EQ = {"target": "version", "op": "=="}

BAD_TXNS: list[tuple[str, bytes | Any, int]] = [
    ("not json", b"{not json", 400),
    ("empty body", b"", 400),
    ("not utf-8", b"\xff\xfe{", 400),
    ("NaN", b'{"compare": [{"key": "k", "target": "version", "op": "==", "version": NaN}]}', 400),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400),
    ("array", [], 400),
    ("string", "txn", 400),
    ("unknown top-level field", {"success": [], "then": []}, 400),
    ("branch not a list", {"success": {"op": "get", "key": "k"}}, 400),
    ("op not an object", {"success": ["put"]}, 400),
    ("unknown op", {"success": [{"op": "cas", "key": "k"}]}, 400),
    ("missing op", {"success": [{"key": "k"}]}, 400),
    ("missing key", {"success": [{"op": "get"}]}, 400),
    ("key not a string", {"success": [{"op": "get", "key": 5}]}, 400),
    ("empty key", {"success": [{"op": "get", "key": ""}]}, 400),
    ("NUL in key", {"success": [{"op": "get", "key": "a\x00"}]}, 400),
    ("lone surrogate key", {"success": [{"op": "get", "key": "\ud800"}]}, 400),
    ("key too long", {"success": [{"op": "get", "key": "k" * 65}]}, 413),
    ("put without value", {"success": [{"op": "put", "key": "k"}]}, 400),
    ("value on a get", {"success": [{"op": "get", "key": "k", "value": "dg=="}]}, 400),
    ("unknown op field", {"success": [{"op": "get", "key": "k", "lease": 1}]}, 400),
    ("value not a string", {"success": [_put(value=5)]}, 400),  # type: ignore[arg-type]
    ("bad base64 alphabet", {"success": [_put(value="dg=!")]}, 400),
    ("bad base64 padding", {"success": [_put(value="dg")]}, 400),
    ("urlsafe base64", {"success": [_put(value="-_-_")]}, 400),
    ("non-ascii base64", {"success": [_put(value="d\u00e9==")]}, 400),
    ("value too long", {"success": [_put(value=b64(b"x" * 1025))]}, 413),
    ("too many success ops", {"success": [_put()] * 5}, 400),
    ("too many failure ops", {"failure": [_put()] * 5}, 400),
    ("too many compares", {"compare": _cmp(**VERSION_EQ, version=0)["compare"] * 5}, 400),
    ("compare not an object", {"compare": [1]}, 400),
    ("unknown target", _cmp(target="lease", op="=="), 400),
    ("unknown compare op", _cmp(target="version", op="<=", version=1), 400),
    ("version missing", _cmp(**VERSION_EQ), 400),
    ("version negative", _cmp(**VERSION_EQ, version=-1), 400),
    ("version a float", _cmp(**VERSION_EQ, version=1.0), 400),
    ("version a bool", _cmp(**VERSION_EQ, version=True), 400),
    ("version a string", _cmp(**VERSION_EQ, version="1"), 400),
    ("version huge", _cmp(**VERSION_EQ, version=2**63), 400),
    ("value compare without value", _cmp(target="value", op="=="), 400),
    ("value compare with version", _cmp(target="value", op="==", value="", version=1), 400),
    ("compare value bad base64", _cmp(target="value", op="==", value="%%"), 400),
    ("cross-shard", {"success": [_put("a"), _put("other-shard/b")]}, 400),
]


@pytest.mark.parametrize(
    ("body", "status"), [(b, s) for _, b, s in BAD_TXNS], ids=[n for n, _, _ in BAD_TXNS]
)
async def test_malformed_txn_bodies_are_rejected_with_json_errors(
    api: Api, body: bytes | Any, status: int
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await api.send("POST", "/v1/txn", data=data)
    assert reply.status == status, reply.body
    assert reply.error_code() in {"invalid_request", "cross_shard_txn", "payload_too_large"}


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("POST", "/v1/kv/k"),
        ("PATCH", "/v1/kv/k"),
        ("DELETE", "/v1/scan"),
        ("GET", "/v1/txn"),
        ("PUT", "/v1/cluster"),
        ("POST", "/health"),
        ("DELETE", "/metrics"),
    ],
)
async def test_a_wrong_method_is_a_json_405_with_allow(api: Api, method: str, raw: str) -> None:
    reply = await api.send(method, raw, headers={"Accept": "text/html"})
    assert reply.status == 405
    assert reply.error_code() == "method_not_allowed"
    assert reply.headers["Allow"]


@pytest.mark.parametrize("raw", ["/", "/v1", "/v1/kv", "/v2/kv/k", "/v1/scan/x", "/health/"])
async def test_an_unknown_path_is_a_json_404(api: Api, raw: str) -> None:
    reply = await api.send("GET", raw, headers={"Accept": "text/html"})
    assert reply.status == 404
    assert reply.error_code() == "route_not_found"


async def test_head_on_a_key_returns_its_version_without_the_body(api: Api) -> None:
    await api.put("k", b"value")
    reply = await api.send("HEAD", "/v1/kv/k")
    assert (reply.status, reply.headers["X-KV-Version"], reply.body) == (200, "1", b"")


async def test_a_max_size_non_ascii_key_fits_in_the_request_line() -> None:
    # 4096 bytes of "é" percent-encode to 12 KiB, over aiohttp's default request-line limit.
    fake = FakeKVService()
    app = create_app(fake, registry=CollectorRegistry())
    async with TestClient(TestServer(app)) as client:
        api = Api(client)
        key = "\u00e9" * (fake.limits.max_key_bytes // 2)
        assert (await api.put(key, b"v")).status == 200
        assert (await api.put(key + "x", b"v")).status == 413
        bounds = quote(key, safe="")
        reply = await api.send(
            "GET", f"/v1/scan?prefix={bounds}&start={bounds}&end={bounds}&cursor={'c' * 8192}"
        )
        assert reply.status == 400  # the fake rejects the cursor: the line itself got through


# --- the fuzzer ------------------------------------------------------------------------------

_ROUTES = [
    ("GET", "/v1/kv/"),
    ("PUT", "/v1/kv/"),
    ("DELETE", "/v1/kv/"),
    ("GET", "/v1/scan"),
    ("POST", "/v1/txn"),
    ("GET", "/v1/cluster"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
]
_METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD"]
_URL_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/"
_escapes = st.sampled_from(["%ff", "%00", "%C3%A9", "%2F", "%zz", "%", "%E2%82", "%F0%9F%98%80"])
_url_part = st.lists(st.one_of(st.text(_URL_CHARS, max_size=8), _escapes), max_size=6).map("".join)
_request_lines = st.one_of(
    # Mostly real routes (a key after /v1/kv/), sometimes anything at all.
    st.sampled_from(_ROUTES).flatmap(
        lambda route: st.tuples(
            st.just(route[0]),
            _url_part.map(route[1].__add__) if route[1].endswith("/") else st.just(route[1]),
        )
    ),
    st.tuples(
        st.sampled_from(_METHODS),
        st.tuples(st.sampled_from([path for _, path in _ROUTES] + ["/", "/v1"]), _url_part).map(
            "".join
        ),
    ),
)
_query_names = st.sampled_from(
    ["if_version", "consistency", "limit", "cursor", "prefix", "start", "end", "zzz"]
)
_query_values = st.one_of(
    _url_part,
    st.sampled_from(["0", "1", "-1", "stale", "linearizable", "99999999999999999999", "1e3"]),
)
_queries = st.lists(st.tuples(_query_names, _query_values), max_size=4).map(
    lambda pairs: "&".join(f"{name}={value}" for name, value in pairs)
)
_json_keys = st.one_of(
    st.sampled_from(["a", "b", "other-shard/b", "\x00", ""]), st.text(max_size=70)
)
_b64ish = st.one_of(st.binary(max_size=16).map(b64), st.text(max_size=8))
_txn_ops = st.one_of(
    st.fixed_dictionaries({"op": st.just("put"), "key": _json_keys, "value": _b64ish}),
    st.fixed_dictionaries({"op": st.sampled_from(["delete", "get"]), "key": _json_keys}),
    st.fixed_dictionaries(  # anything goes
        {"op": st.sampled_from(["put", "get", "cas"])},
        optional={"key": _json_keys, "value": _b64ish, "extra": st.none()},
    ),
)
_txn_compares = st.one_of(
    st.fixed_dictionaries(
        {
            "key": _json_keys,
            "target": st.just("version"),
            "op": st.sampled_from(["==", "!=", "<", ">"]),
            "version": st.integers(0, 5),
        }
    ),
    st.fixed_dictionaries(
        {
            "key": _json_keys,
            "target": st.just("value"),
            "op": st.sampled_from(["==", "!=", "<", ">"]),
            "value": _b64ish,
        }
    ),
    st.fixed_dictionaries(  # anything goes
        {"target": st.sampled_from(["version", "value", "lease"])},
        optional={
            "key": _json_keys,
            "op": st.sampled_from(["==", "<="]),
            "version": st.one_of(st.integers(-2, 2**64), st.booleans(), st.floats(), st.text()),
            "value": _b64ish,
        },
    ),
)
_txn_docs = st.fixed_dictionaries(
    {},
    optional={
        "compare": st.lists(_txn_compares, max_size=5),
        "success": st.lists(_txn_ops, max_size=5),
        "failure": st.lists(_txn_ops, max_size=5),
    },
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["compare", "success", "key", "x"]), children, max_size=3)
    ),
    max_leaves=10,
)
_bodies = st.one_of(
    _txn_docs.map(lambda doc: json.dumps(doc).encode()),
    st.binary(max_size=64),
    _json_values.map(lambda doc: json.dumps(doc).encode()),
)
_header_values = st.one_of(
    st.sampled_from(["", "0", "-1", "abc", "x" * 200, "\u00e9", "3"]),
    st.text(string.printable.strip(), max_size=10),
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    request_line=_request_lines,
    query=st.just("") | _queries,
    body=_bodies,
    idempotency_key=st.none() | st.none() | _header_values,
    hops=st.none() | st.none() | _header_values,
)
async def test_random_requests_never_get_a_500_and_errors_are_always_json(
    api: Api,
    request_line: tuple[str, str],
    query: str,
    body: bytes,
    idempotency_key: str | None,
    hops: str | None,
) -> None:
    method, path = request_line
    headers = {}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    if hops is not None:
        headers["X-KV-Hops"] = hops
    raw = path + (f"?{query}" if query else "")
    reply = await api.send(method, raw, data=body, headers=headers)
    assert reply.status < 500, (method, raw, reply.body)
    if reply.status >= 400 and method != "HEAD":
        assert reply.headers["Content-Type"].startswith("application/json")
        doc = reply.json()
        assert set(doc) == {"error"}
        assert set(doc["error"]) >= {"code", "message"}


# --- POST /v1/batch --------------------------------------------------------------------------


async def test_a_batch_answers_one_version_per_put_and_one_entry_per_shard(
    api: Api, fake: FakeKVService
) -> None:
    puts = [
        {"key": "a", "value": b64(b"1")},
        {"key": OTHER_SHARD_PREFIX + "b", "value": b64(b"2")},
        {"key": "c", "value": b64(b"\x00\xff")},
    ]
    reply = await api.send("POST", "/v1/batch", data=json.dumps({"puts": puts}).encode())
    assert reply.status == 200
    doc = reply.json()
    assert (doc["written"], doc["failed"], doc["errors"]) == (3, 0, [])
    versions = doc["versions"]  # in request order
    assert versions[0] == versions[2] != versions[1]  # a and c share their shard's entry
    assert fake.stored("c") == (b"\x00\xff", versions[2])


async def test_a_batch_where_some_shards_failed_reports_each_unwritten_put(
    api: Api, fake: FakeKVService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def half_written(items: Any, ctx: Any) -> list[Any]:
        return [7, ShardUnavailable("shard 2 has no leader")]

    monkeypatch.setattr(fake, "batch_put", half_written)
    puts = [{"key": "a", "value": b64(b"1")}, {"key": "b", "value": b64(b"2")}]
    reply = await api.send("POST", "/v1/batch", data=json.dumps({"puts": puts}).encode())
    assert reply.status == 200
    assert reply.json() == {
        "written": 1,
        "failed": 1,
        "versions": [7, None],
        "errors": [
            {
                "index": 1,
                "key": "b",
                "code": "shard_unavailable",
                "message": "shard 2 has no leader",
            }
        ],
    }


async def test_a_batch_that_wrote_nothing_is_that_error(api: Api, fake: FakeKVService) -> None:
    fake.failure = ShardUnavailable("no leader anywhere")
    puts = [{"key": "a", "value": b64(b"1")}]
    reply = await api.send("POST", "/v1/batch", data=json.dumps({"puts": puts}).encode())
    assert reply.status == 503
    assert reply.error_code() == "shard_unavailable"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"[]", 400),
        (b"{}", 400),
        (b'{"puts": []}', 400),
        (b'{"puts": {}}', 400),
        (b'{"puts": [1]}', 400),
        (b'{"puts": [{"key": "a"}]}', 400),
        (b'{"puts": [{"key": "a", "value": "AA==", "extra": 1}]}', 400),
        (b'{"puts": [{"key": "", "value": "AA=="}]}', 400),
        (b'{"puts": [{"key": "a", "value": "not base64!"}]}', 400),
        (b'{"puts": [{"key": 5, "value": "AA=="}]}', 400),
        (b'{"puts": [{"key": "a", "value": "AA=="}], "more": 1}', 400),
        (json.dumps({"puts": [{"key": "k" * 65, "value": "AA=="}]}).encode(), 413),
        (json.dumps({"puts": [{"key": "a", "value": b64(b"x" * 1025)}]}).encode(), 413),
        (json.dumps({"puts": [{"key": f"k{i}", "value": "AA=="} for i in range(5)]}).encode(), 400),
    ],
)
async def test_a_malformed_batch_is_rejected_whole_before_anything_is_written(
    body: bytes, status: int, fake: FakeKVService
) -> None:
    limits = Limits(
        max_key_bytes=64, max_value_bytes=1024, max_batch_puts=4, max_batch_bytes=1 << 16
    )
    fake.limits = limits
    async with TestClient(TestServer(create_app(fake, registry=CollectorRegistry()))) as client:
        reply_api = Api(client)
        reply = await reply_api.send("POST", "/v1/batch", data=body)
    assert reply.status == status
    assert reply.error_code() in {"invalid_request", "payload_too_large"}
    assert not [call for call in fake.calls if call.method == "batch_put"]


async def test_a_batch_body_over_its_byte_limit_is_413(fake: FakeKVService) -> None:
    fake.limits = Limits(max_batch_bytes=100)
    body = json.dumps({"puts": [{"key": "k" * 100, "value": "AA=="}]}).encode()
    async with TestClient(TestServer(create_app(fake, registry=CollectorRegistry()))) as client:
        reply = await Api(client).send("POST", "/v1/batch", data=body)
    assert reply.status == 413
    assert reply.error_code() == "payload_too_large"
