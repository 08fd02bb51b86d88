"""A typed, synchronous client for the node's HTTP API (the contract in kvstore/service.py).

It tries the endpoints in order: a node that cannot be reached, or that answers 503, hands the
request to the next one. A request that was sent but got no answer is retried elsewhere only when
retrying is safe (a read, or a write carrying an idempotency key). Stdlib only: no event loop,
no proxy settings picked up from the environment, fast to start.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict
from urllib.parse import quote, urlencode, urlsplit

from cli.errors import (
    ClusterUnavailable,
    KeyNotFound,
    KvctlError,
    NotAuthorized,
    OutcomeUnknown,
    PreconditionFailed,
)

START_A_CLUSTER = "is the cluster running? start one with `kvctl cluster up`"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    version: int


@dataclass(frozen=True, slots=True)
class KeyVersion:
    key: str
    version: int


@dataclass(frozen=True, slots=True)
class ScanPage:
    items: tuple[KeyValue, ...]
    next_cursor: str | None  # None: no more pages


@dataclass(frozen=True, slots=True)
class ShardBackup:
    shard_id: int
    blob: bytes  # opaque: the node checks its inner checksum on restore
    applied_index: int
    key_count: int
    content_digest: str  # 16 hex digits; a restore of this blob reports the same


class NodeStatus(TypedDict, total=False):
    id: int
    client_url: str
    peer_address: str
    reachable: bool
    draining: bool  # being removed: its replicas move away
    down: bool  # unreachable past down_after: its replicas are re-created elsewhere
    replicas: int  # shard replicas the map places on it
    leads: int


class MoveStatus(TypedDict):
    group: int  # a shard id, or 0: the meta group
    from_node: int
    to_node: int
    from_replica: int
    to_replica: int


class SplitStatus(TypedDict):
    shard: int  # the shard being cut; it keeps the lower half
    child: int  # the new shard's id: it gets the upper half
    split_token: int


class ReplicaStatus(TypedDict):
    node: int
    role: str
    term: int
    commit_index: int
    applied_index: int
    last_index: int
    reachable: bool


class ShardStatus(TypedDict):
    id: int
    start_token: int  # inclusive
    end_token: int  # exclusive
    replicas: list[int]
    leader: int  # 0: no leader known
    term: int
    replica_status: list[ReplicaStatus]


class ClusterStatus(TypedDict):
    cluster_id: str
    epoch: int
    nodes: list[NodeStatus]
    shards: list[ShardStatus]
    healthy: bool
    moves: NotRequired[list[MoveStatus]]  # replica moves in progress
    splits: NotRequired[list[SplitStatus]]  # shard splits in progress
    meta_voters: NotRequired[list[int]]
    balanced: NotRequired[bool]  # no move in progress and none planned


@dataclass(frozen=True, slots=True)
class Response:
    endpoint: str
    status: int
    headers: Mapping[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise KvctlError(
                f"{self.endpoint} answered HTTP {self.status} with a body that is not JSON: "
                f"{self.body[:200]!r}",
                status=self.status,
            ) from None


@dataclass(frozen=True, slots=True)
class _Attempt:
    endpoint: str
    problem: str  # "connection refused", "timed out after 5s", "HTTP 503: ..."


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """Verify https:// nodes against ca_file (None: the system's CAs); present cert_file and
    key_file when given (mutual TLS)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            raise KvctlError(f"cannot load the TLS files ({self}): {error}") from None
        return context


class KVClient:
    def __init__(
        self,
        endpoints: Sequence[str],
        timeout_s: float = 10.0,
        *,
        tls: TlsOptions | None = None,
        token: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("KVClient needs at least one endpoint")
        self.endpoints = tuple(endpoint.rstrip("/") for endpoint in endpoints)
        self.timeout_s = timeout_s
        self._tls_context = (
            (tls or TlsOptions()).context()
            if any(e.startswith("https://") for e in self.endpoints)
            else None
        )
        self._auth_headers = {"Authorization": f"Bearer {token}"} if token else {}

    # -- the API ------------------------------------------------------------------------------

    def get(self, key: str, *, stale: bool = False) -> KeyValue:
        response = self.request(
            "GET", _key_path(key), query={"consistency": _consistency(stale)}, safe_to_retry=True
        )
        version = response.headers.get("x-kv-version", "")
        if not version.isdigit():
            raise KvctlError(
                f"{response.endpoint} answered GET without a valid X-KV-Version header",
                status=response.status,
            )
        return KeyValue(key, response.body, int(version))

    def put(
        self,
        key: str,
        value: bytes,
        *,
        if_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> KeyVersion:
        headers = {"Content-Type": "application/octet-stream"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        response = self.request(
            "PUT",
            _key_path(key),
            query={"if_version": if_version},
            body=value,
            headers=headers,
            safe_to_retry=idempotency_key is not None,
        )
        return _key_version(response)

    def delete(self, key: str, *, if_version: int | None = None) -> KeyVersion:
        response = self.request("DELETE", _key_path(key), query={"if_version": if_version})
        return _key_version(response)

    def scan_page(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        stale: bool = False,
    ) -> ScanPage:
        query = {
            "prefix": prefix or None,
            "start": start,
            "end": end,
            "limit": limit,
            "cursor": cursor,
            "consistency": _consistency(stale),
        }
        body = self.request("GET", "/v1/scan", query=query, safe_to_retry=True).json()
        try:
            items = tuple(
                KeyValue(str(item["key"]), base64.b64decode(item["value"]), int(item["version"]))
                for item in body["items"]
            )
            next_cursor = body.get("next_cursor")
        except (KeyError, TypeError, ValueError) as error:
            raise KvctlError(f"malformed scan response: {error!r}") from None
        return ScanPage(items, str(next_cursor) if next_cursor else None)

    def scan(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        stale: bool = False,
    ) -> Iterator[ScanPage]:
        """Every page from `cursor` on, following next_cursor until the server has no more."""
        while True:
            page = self.scan_page(
                prefix=prefix, start=start, end=end, limit=limit, cursor=cursor, stale=stale
            )
            yield page
            if page.next_cursor is None or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    def txn(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Sends the request as given (values base64, as the API wants); returns the raw answer."""
        body = json.dumps(request).encode()
        response = self.request(
            "POST", "/v1/txn", body=body, headers={"Content-Type": "application/json"}
        )
        answer = response.json()
        if not isinstance(answer, dict) or not isinstance(answer.get("succeeded"), bool):
            raise KvctlError(f"malformed txn response from {response.endpoint}: {answer!r:.200}")
        return answer

    def query(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """POST /v1/query (docs/query.md): one answer, as the API gives it. A query only reads,
        so it is retried on the next endpoint when one fails."""
        response = self.request(
            "POST",
            "/v1/query",
            body=json.dumps(spec).encode(),
            headers={"Content-Type": "application/json"},
            safe_to_retry=True,
        )
        answer = response.json()
        if not isinstance(answer, dict) or not isinstance(answer.get("rows"), list):
            raise KvctlError(f"malformed query answer from {response.endpoint}: {answer!r:.200}")
        return answer

    def query_pages(self, spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Every page of a select query, following next_cursor (an aggregate query: one)."""
        cursor = spec.get("cursor")
        while True:
            page = self.query({**spec, "cursor": cursor} if cursor else spec)
            yield page
            if not page.get("next_cursor") or page["next_cursor"] == cursor:
                return
            cursor = page["next_cursor"]

    def whoami(self) -> dict[str, Any]:
        answer = self.request("GET", "/v1/auth/whoami", safe_to_retry=True).json()
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            raise KvctlError(f"malformed whoami answer: {answer!r:.200}")
        return answer

    def put_user(self, name: str, grants: Mapping[str, Any]) -> dict[str, Any]:
        """Creates the user, or gives it new grants and a new token; returns {name, token...}."""
        body = json.dumps({"name": name, "grants": dict(grants)}).encode()
        answer = self.request(
            "POST", "/v1/auth/users", body=body, headers={"Content-Type": "application/json"}
        ).json()
        if not isinstance(answer, dict) or not isinstance(answer.get("token"), str):
            raise KvctlError(f"malformed answer to adding a user: {answer!r:.200}")
        return answer

    def list_users(self) -> list[dict[str, Any]]:
        answer = self.request("GET", "/v1/auth/users", safe_to_retry=True).json()
        if not isinstance(answer, dict) or not isinstance(answer.get("users"), list):
            raise KvctlError(f"malformed user list: {answer!r:.200}")
        return list(answer["users"])

    def delete_user(self, name: str) -> None:
        self.request("DELETE", "/v1/auth/users/" + quote(name, safe=""))

    def cluster_status(self) -> ClusterStatus:
        response = self.request("GET", "/v1/cluster", safe_to_retry=True)
        answer = response.json()
        if not isinstance(answer, dict) or not isinstance(answer.get("shards"), list):
            raise KvctlError(
                f"malformed /v1/cluster response from {response.endpoint}: {answer!r:.200}"
            )
        status: ClusterStatus = answer  # type: ignore[assignment]  # checked loosely above
        return status

    # -- admin ----------------------------------------------------------------------------------

    def add_node(self, node_id: int, client_url: str, peer_address: str) -> int:
        """Registers a node in the shard map; returns the map's new epoch."""
        body = {"id": node_id, "client_url": client_url, "peer_address": peer_address}
        response = self.request("POST", "/v1/admin/nodes", body=json.dumps(body).encode())
        return int(response.json()["epoch"])

    def drain_node(self, node_id: int) -> int:
        """Starts moving every replica off the node; it leaves the map once it hosts none."""
        response = self.request("POST", f"/v1/admin/nodes/{node_id}/drain")
        return int(response.json()["epoch"])

    def split_shard(self, shard_id: int) -> int:
        """Starts cutting the shard in two; returns the shard map's new epoch."""
        response = self.request("POST", f"/v1/admin/shards/{shard_id}/split")
        return int(response.json()["epoch"])

    def check(self) -> dict[str, Any]:
        """Compare every shard's replicas now (POST /v1/admin/check); the raw report."""
        response = self.request("POST", "/v1/admin/check", safe_to_retry=True)
        answer = response.json()
        if not isinstance(answer, dict) or not isinstance(answer.get("shards"), list):
            raise KvctlError(f"malformed check report from {response.endpoint}: {answer!r:.200}")
        return answer

    def shard_backup(self, shard_id: int) -> ShardBackup:
        response = self.request("GET", f"/v1/admin/snapshot/{shard_id}", safe_to_retry=True)
        headers = response.headers
        try:
            backup = ShardBackup(
                int(headers["x-kv-shard"]),
                response.body,
                int(headers["x-kv-applied-index"]),
                int(headers["x-kv-key-count"]),
                headers["x-kv-content-digest"],
            )
        except (KeyError, ValueError):
            raise KvctlError(
                f"{response.endpoint} answered a shard backup without its X-KV-* headers"
            ) from None
        if backup.shard_id != shard_id:
            raise KvctlError(f"asked for shard {shard_id}'s backup, got shard {backup.shard_id}'s")
        return backup

    def restore_shard(self, shard_id: int, blob: bytes, *, replace: bool) -> dict[str, Any]:
        response = self.request(
            "PUT",
            f"/v1/admin/snapshot/{shard_id}",
            query={"replace": "true" if replace else "false"},
            body=blob,
            headers={"Content-Type": "application/octet-stream"},
        )
        answer = response.json()
        if not isinstance(answer, dict) or "content_digest" not in answer:
            raise KvctlError(f"malformed restore answer from {response.endpoint}: {answer!r:.200}")
        return answer

    # -- transport ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, object] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        safe_to_retry: bool = False,
    ) -> Response:
        """Sends to the first endpoint that answers; raises the KvctlError matching the status."""
        target = path
        if query:
            pairs = [(name, str(value)) for name, value in query.items() if value is not None]
            if pairs:
                target += "?" + urlencode(pairs)
        attempts: list[_Attempt] = []
        unavailable: Response | None = None
        for endpoint in self.endpoints:
            try:
                response = self._send_once(endpoint, method, target, body, headers or {})
            except _Unreachable as unreachable:
                attempts.append(_Attempt(endpoint, unreachable.problem))
                continue
            except _NoAnswer as no_answer:
                if not safe_to_retry:
                    raise OutcomeUnknown(
                        f"{method} {path} was sent to {endpoint} but no answer came back "
                        f"({no_answer.problem}): it may or may not have applied. Read the key to "
                        "find out, or retry with --idempotency-key so a repeat applies once."
                    ) from None
                attempts.append(_Attempt(endpoint, no_answer.problem))
                continue
            if response.status == 503:
                unavailable = response
                attempts.append(_Attempt(endpoint, f"HTTP 503: {_error_message(response)}"))
                continue
            _raise_for_status(response, path)
            return response
        tried = "; ".join(f"{a.endpoint} ({a.problem})" for a in attempts)
        if unavailable is not None:
            retry_after = _retry_after_s(unavailable)
            hint = f"retry in {retry_after:g}s" if retry_after is not None else "retry shortly"
            raise ClusterUnavailable(
                f"the cluster cannot serve this right now: {tried}. {hint}; "
                "`kvctl cluster status` shows which shards lack a leader",
                status=503,
                retry_after_s=retry_after,
            )
        raise ClusterUnavailable(f"no node answered: {tried}. {START_A_CLUSTER}")

    def _send_once(
        self,
        endpoint: str,
        method: str,
        target: str,
        body: bytes | None,
        headers: Mapping[str, str],
    ) -> Response:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise KvctlError(f"endpoint {endpoint!r} is not an http:// or https:// URL")
        connection: http.client.HTTPConnection
        if url.scheme == "https":
            connection = http.client.HTTPSConnection(
                url.hostname, url.port, timeout=self.timeout_s, context=self._tls_context
            )
        else:
            connection = http.client.HTTPConnection(url.hostname, url.port, timeout=self.timeout_s)
        try:
            try:
                connection.connect()
            except (OSError, http.client.HTTPException) as error:
                raise _Unreachable(_describe(error, self.timeout_s)) from None
            try:
                connection.request(
                    method, url.path.rstrip("/") + target, body, {**headers, **self._auth_headers}
                )
                answer = connection.getresponse()
                data = answer.read()
            except (OSError, http.client.HTTPException) as error:
                raise _NoAnswer(_describe(error, self.timeout_s)) from None
            return Response(
                endpoint,
                answer.status,
                {name.lower(): value for name, value in answer.getheaders()},
                data,
            )
        finally:
            connection.close()


class _Unreachable(Exception):
    """The connection was never made: nothing was sent, so any request may go elsewhere."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


class _NoAnswer(Exception):
    """The request went out but no complete answer came back."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _describe(error: BaseException, timeout_s: float) -> str:
    if isinstance(error, socket.timeout | TimeoutError):
        return f"timed out after {timeout_s:g}s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host: {error.strerror}"
    return str(error) or type(error).__name__


def _key_path(key: str) -> str:
    return "/v1/kv/" + quote(key, safe="")


def _consistency(stale: bool) -> str:
    return "stale" if stale else "linearizable"


def _key_version(response: Response) -> KeyVersion:
    answer = response.json()
    try:
        return KeyVersion(str(answer["key"]), int(answer["version"]))
    except (KeyError, TypeError, ValueError):
        raise KvctlError(f"malformed answer from {response.endpoint}: {answer!r:.200}") from None


def _error_body(response: Response) -> dict[str, Any]:
    try:
        body = json.loads(response.body)
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _error_message(response: Response) -> str:
    message = _error_body(response).get("message")
    if isinstance(message, str) and message:
        return message
    text = response.body[:200].decode("utf-8", "replace").strip()
    return text or http.client.responses.get(response.status, "error")


def _retry_after_s(response: Response) -> float | None:
    raw = response.headers.get("retry-after", "")
    try:
        return float(raw)
    except ValueError:
        return None


def _raise_for_status(response: Response, path: str) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    message = _error_message(response)
    if status == 404 and path.startswith("/v1/kv/"):
        raise KeyNotFound(message, status=status)
    if status == 412:
        current = _error_body(response).get("current_version")
        raise PreconditionFailed(
            message,
            status=status,
            current_version=current if isinstance(current, int) else None,
        )
    if status == 504:
        raise OutcomeUnknown(
            f"{message} (HTTP 504 from {response.endpoint}): the write may or may not have "
            "applied; read the key to find out",
            status=status,
        )
    code = _error_body(response).get("code") or http.client.responses.get(status, "error")
    if status == 401:
        raise NotAuthorized(
            f"HTTP 401 from {response.endpoint}: {message}. Pass --token, set $KVCTL_TOKEN, "
            "or run `kvctl login`",
            status=status,
        )
    if status == 403:
        raise NotAuthorized(f"HTTP 403 from {response.endpoint}: {message}", status=status)
    raise KvctlError(f"HTTP {status} {code} from {response.endpoint}: {message}", status=status)
