"""Workloads: what the clients ask of the store, over its public HTTP API only, and how each
answer becomes an outcome in the history.

ok   = it happened (and a read's value is what it saw);
fail = it definitely did not happen (a 4xx refusal, a failed compare, 503: no leader took it);
info = unknown (a timeout, a dropped connection, 504): it may take effect at any later time.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import xxhash

REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Invocation:
    f: str
    key: str | None
    value: Any


@dataclass(frozen=True, slots=True)
class Completion:
    kind: str  # "ok" | "fail" | "info"
    value: Any
    error: str | None = None


class Unknown(Exception):
    """The request may or may not have taken effect."""


class Refused(Exception):
    """The store definitely did not apply the request."""


class _Sent:
    """Per-request flag: did any attempt put the request on the wire?"""

    def __init__(self) -> None:
        self.headers_sent = False


async def _on_headers_sent(session: Any, context: Any, params: Any) -> None:
    context.trace_request_ctx.headers_sent = True


def new_session() -> aiohttp.ClientSession:
    """A client session that can tell "never sent" from "maybe applied".

    aiohttp silently retries an idempotent request (PUT, DELETE, GET) once when its connection
    breaks; if the node died, the retry's "cannot connect" error hides that the first attempt
    was delivered (and may have applied). Tracing when headers go out tells them apart.
    """
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_on_headers_sent)
    return aiohttp.ClientSession(trace_configs=[trace])


class HttpClient:
    """One client's view of the store: JSON/bytes over HTTP to one node at a time."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def _call(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        sent = _Sent()
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                data=body,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                trace_request_ctx=sent,
            ) as response:
                return response.status, dict(response.headers), await response.read()
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as error:
            if sent.headers_sent:  # an earlier attempt reached the node: maybe applied
                raise Unknown(f"connect after sending: {error}") from error
            raise Refused(f"connect: {error}") from error  # never reached the node
        except (TimeoutError, aiohttp.ClientError) as error:
            raise Unknown(type(error).__name__) from error

    @staticmethod
    def _judge(status: int, body: bytes) -> None:
        """Raise for anything but 2xx: 504 is unknown, other errors definitely did not apply."""
        if status < 300:
            return
        code = ""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            code = json.loads(body)["error"]["code"]
        if status == 504 or (status >= 500 and status != 503):
            raise Unknown(f"{status} {code}")
        raise Refused(f"{status} {code}")

    async def get(self, key: str) -> tuple[bytes | None, int]:
        status, headers, body = await self._call("GET", f"/v1/kv/{quote(key, safe='')}")
        if status == 404:
            return None, 0
        self._judge(status, body)
        return body, int(headers.get("X-KV-Version", "0"))

    async def put(self, key: str, value: bytes, if_version: int | None = None) -> int:
        query = f"?if_version={if_version}" if if_version is not None else ""
        status, _, body = await self._call("PUT", f"/v1/kv/{quote(key, safe='')}{query}", value)
        if status == 412:
            raise PreconditionFailed()
        self._judge(status, body)
        return int(json.loads(body)["version"])

    async def txn(self, request: dict[str, Any]) -> dict[str, Any]:
        status, _, body = await self._call("POST", "/v1/txn", json.dumps(request).encode())
        self._judge(status, body)
        result: dict[str, Any] = json.loads(body)
        return result

    async def query(self, spec: dict[str, Any]) -> dict[str, Any]:
        status, _, body = await self._call("POST", "/v1/query", json.dumps(spec).encode())
        if status == 503:  # a read: nothing happened either way
            raise Refused(f"503 {body[:200]!r}")
        self._judge(status, body)
        result: dict[str, Any] = json.loads(body)
        return result

    async def scan_all(self, prefix: str) -> list[tuple[str, bytes]]:
        items: list[tuple[str, bytes]] = []
        cursor = ""
        for _ in range(100_000):
            path = f"/v1/scan?prefix={quote(prefix, safe='')}&limit=1000{cursor}"
            status, _, body = await self._call("GET", path)
            self._judge(status, body)
            page = json.loads(body)
            items += [(i["key"], base64.b64decode(i["value"])) for i in page["items"]]
            if page["next_cursor"] is None:
                return items
            cursor = f"&cursor={page['next_cursor']}"
        raise Unknown("scan did not finish")


class PreconditionFailed(Refused):
    pass


class Workload(Protocol):
    name: str
    checkers: tuple[str, ...]

    def setup(self, cluster_status: dict[str, Any]) -> None: ...

    def next_invocation(self, rng: random.Random) -> Invocation: ...

    async def invoke(self, client: HttpClient, op: Invocation) -> Completion: ...

    def final_invocations(self) -> list[Invocation]: ...


async def _complete(call: Any) -> Completion:
    """Run a request and turn the store's answer into ok / fail / info."""
    try:
        return Completion("ok", await call)
    except PreconditionFailed:
        return Completion("fail", None, "precondition failed")
    except Refused as error:
        return Completion("fail", None, str(error))
    except Unknown as error:
        return Completion("info", None, str(error))


@dataclass
class RegisterWorkload:
    """Per-key registers: reads, writes and compare-and-set on small integer values (so that
    CAS often matters), many keys so the checker can split the history by key."""

    keys: int = 12
    name: str = "register"
    checkers: tuple[str, ...] = ("linearizable",)

    def setup(self, cluster_status: dict[str, Any]) -> None:
        pass

    def next_invocation(self, rng: random.Random) -> Invocation:
        key = f"reg/{rng.randrange(self.keys)}"
        roll = rng.random()
        if roll < 0.5:
            return Invocation("read", key, None)
        if roll < 0.8:
            return Invocation("write", key, rng.randrange(5))
        return Invocation("cas", key, [rng.randrange(5), rng.randrange(5)])

    async def invoke(self, client: HttpClient, op: Invocation) -> Completion:
        assert op.key is not None
        if op.f == "read":
            return await _complete(self._read(client, op.key))
        if op.f == "write":
            return await _complete(client.put(op.key, str(op.value).encode()))
        return await _complete(self._cas(client, op.key, op.value[0], op.value[1]))

    async def _read(self, client: HttpClient, key: str) -> int | None:
        value, _ = await client.get(key)
        return None if value is None else int(value)

    async def _cas(self, client: HttpClient, key: str, expected: int, new: int) -> int:
        # Compare on the value, atomically through the key's version: the read fixes the
        # version, and the conditional put applies only if nobody wrote in between.
        value, version = await client.get(key)
        if value is None or int(value) != expected:
            raise PreconditionFailed()
        return await client.put(key, str(new).encode(), if_version=version)

    def final_invocations(self) -> list[Invocation]:
        return [Invocation("read", f"reg/{i}", None) for i in range(self.keys)]


@dataclass
class SetWorkload:
    """Unique adds, each its own key spread over every shard; one final scan reads the set."""

    name: str = "set"
    checkers: tuple[str, ...] = ("set",)
    _next: int = 0

    def setup(self, cluster_status: dict[str, Any]) -> None:
        pass

    def next_invocation(self, rng: random.Random) -> Invocation:
        self._next += 1
        return Invocation("add", None, self._next)

    async def invoke(self, client: HttpClient, op: Invocation) -> Completion:
        if op.f == "add":
            return await _complete(client.put(f"set/{op.value:09d}", str(op.value).encode()))
        items = await _complete(client.scan_all("set/"))
        if items.kind != "ok":
            return items
        return Completion("ok", sorted(int(value) for _, value in items.value))

    def final_invocations(self) -> list[Invocation]:
        return [Invocation("read_set", None, None)]


@dataclass
class AppendWorkload:
    """List-append transactions in the spirit of Elle: each txn reads and appends (unique
    values) on a few keys of one shard; reads return whole lists, so the checker can infer
    every key's version order and look for dependency cycles."""

    keys_per_shard: int = 4
    name: str = "append"
    checkers: tuple[str, ...] = ("append",)
    _shard_keys: list[list[str]] = field(default_factory=list)
    _next_value: int = 0

    def setup(self, cluster_status: dict[str, Any]) -> None:
        self._shard_keys = keys_per_shard(cluster_status, "app/", self.keys_per_shard)

    def next_invocation(self, rng: random.Random) -> Invocation:
        keys = rng.choice(self._shard_keys)
        micro_ops: list[list[Any]] = []
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(keys)
            if rng.random() < 0.5:
                micro_ops.append(["r", key, None])
            else:
                self._next_value += 1
                micro_ops.append(["append", key, self._next_value])
        return Invocation("txn", None, micro_ops)

    async def invoke(self, client: HttpClient, op: Invocation) -> Completion:
        return await _complete(self._txn(client, op.value))

    async def _txn(self, client: HttpClient, micro_ops: list[list[Any]]) -> list[list[Any]]:
        keys = sorted({key for _, key, _ in micro_ops})
        current: dict[str, tuple[list[int], int]] = {}
        for key in keys:
            value, version = await client.get(key)
            current[key] = (json.loads(value) if value else [], version)
        lists = {key: list(current[key][0]) for key in keys}
        success: list[dict[str, Any]] = []
        reads: list[int] = []  # positions of micro-ops that read
        for position, (kind, key, value) in enumerate(micro_ops):
            if kind == "r":
                reads.append(position)
                success.append({"op": "get", "key": key})
            else:
                lists[key].append(value)
                encoded = base64.b64encode(json.dumps(lists[key]).encode()).decode()
                success.append({"op": "put", "key": key, "value": encoded})
        request = {
            "compare": [
                {"key": key, "target": "version", "op": "==", "version": current[key][1]}
                for key in keys
            ],
            "success": success,
            "failure": [],
        }
        result = await client.txn(request)
        if not result["succeeded"]:
            raise PreconditionFailed()
        completed = [list(micro) for micro in micro_ops]
        for position in reads:
            raw = result["results"][position]["value"]
            completed[position][2] = json.loads(base64.b64decode(raw)) if raw else []
        return completed

    def final_invocations(self) -> list[Invocation]:
        return [
            Invocation("txn", None, [["r", key, None] for key in keys]) for keys in self._shard_keys
        ]


def keys_per_shard(cluster_status: dict[str, Any], prefix: str, count: int) -> list[list[str]]:
    """`count` keys `prefix + n` for each shard, by the public token ranges (xxh64 of the key, as
    /v1/cluster says), so that a transaction on keys of one list stays in one shard."""
    shards = cluster_status["shards"]
    found: list[list[str]] = [[] for _ in shards]
    candidate = 0
    while any(len(keys) < count for keys in found):
        key = f"{prefix}{candidate}"
        token = xxhash.xxh64_intdigest(key.encode())
        for position, shard in enumerate(shards):
            if shard["start_token"] <= token < shard["end_token"]:
                if len(found[position]) < count:
                    found[position].append(key)
                break
        candidate += 1
    return found


@dataclass
class BankWorkload:
    """Transfers between accounts of one shard (a compare-on-versions transaction), and reads
    of every balance at once by a map-reduce query: rows (`read_all`) or a sum and a count
    (`read_total`). An account never written holds the opening balance."""

    accounts_per_shard: int = 3
    opening_balance: int = 100
    name: str = "bank"
    checkers: tuple[str, ...] = ("bank",)
    _shard_accounts: list[list[str]] = field(default_factory=list)

    @property
    def _bank(self) -> dict[str, int]:
        accounts = sum(len(keys) for keys in self._shard_accounts)
        return {"accounts": accounts, "opening_balance": self.opening_balance}

    def setup(self, cluster_status: dict[str, Any]) -> None:
        self._shard_accounts = keys_per_shard(cluster_status, "bank/", self.accounts_per_shard)

    def next_invocation(self, rng: random.Random) -> Invocation:
        roll = rng.random()
        if roll < 0.15:
            return Invocation("read_all", None, self._bank)
        if roll < 0.3:
            return Invocation("read_total", None, self._bank)
        source, target = rng.sample(rng.choice(self._shard_accounts), 2)
        return Invocation("transfer", None, [source, target, rng.randint(1, 30)])

    async def invoke(self, client: HttpClient, op: Invocation) -> Completion:
        if op.f == "transfer":
            return await _complete(self._transfer(client, *op.value))
        if op.f == "read_all":
            return await _complete(self._read_all(client))
        return await _complete(self._read_total(client))

    async def _transfer(self, client: HttpClient, source: str, target: str, amount: int) -> None:
        found = {key: await client.get(key) for key in (source, target)}
        balance = {
            key: self.opening_balance if value is None else int(json.loads(value)["balance"])
            for key, (value, _) in found.items()
        }
        if balance[source] < amount:
            raise Refused("insufficient funds")
        new = {source: balance[source] - amount, target: balance[target] + amount}
        request = {
            "compare": [
                {"key": key, "target": "version", "op": "==", "version": version}
                for key, (_, version) in found.items()
            ],
            "success": [
                {"op": "put", "key": key, "value": _b64_json({"balance": balance})}
                for key, balance in new.items()
            ],
            "failure": [],
        }
        if not (await client.txn(request))["succeeded"]:
            raise PreconditionFailed()

    async def _read_all(self, client: HttpClient) -> dict[str, int]:
        answer = await client.query({"prefix": "bank/", "select": "*", "limit": 10_000})
        return {row["key"]: int(row["value"]["balance"]) for row in answer["rows"]}

    async def _read_total(self, client: HttpClient) -> dict[str, int]:
        spec = {
            "prefix": "bank/",
            "aggregates": {"sum": {"fn": "sum", "field": "balance"}, "present": {"fn": "count"}},
        }
        answer = await client.query(spec)
        aggregates = answer["groups"][0]["aggregates"]
        return {"sum": int(aggregates["sum"]), "present": int(aggregates["present"])}

    def final_invocations(self) -> list[Invocation]:
        return [Invocation("read_all", None, self._bank)]


def _b64_json(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


WORKLOADS = {
    "register": RegisterWorkload,
    "set": SetWorkload,
    "append": AppendWorkload,
    "bank": BankWorkload,
}
