"""The node's public HTTP/JSON API: routes, input validation, error responses, request metrics.

It depends only on the `KVService` Protocol and the error tree, never on Raft, routing or LMDB.
`error_response` is the one place that maps exceptions to HTTP; every error body has the shape
{"error": {"code", "message", ...}}, and no traceback or HTML page ever leaves this module.
Access control: a middleware authenticates every non-public route (401 without a valid bearer
token when auth is on); each handler then calls `authorize(request, action, key_or_prefix)`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from kvstore.auth import (
    ANONYMOUS_SUPERUSER,
    Action,
    Grants,
    User,
    UserAdmin,
    UserDirectory,
    check_user_name,
    hash_token,
    new_token,
    require,
)
from kvstore.errors import (
    InvalidRequest,
    KVError,
    PayloadTooLarge,
    PreconditionFailed,
    ReplicaCorrupted,
    ShardUnavailable,
    TooManyRequests,
    Unauthenticated,
)
from kvstore.service import (
    MAX_HOPS,
    CompareOp,
    CompareTarget,
    Consistency,
    KeyValue,
    KVService,
    Limits,
    RequestContext,
    TxnCompare,
    TxnOp,
    TxnOpKind,
    TxnOpResult,
    TxnRequest,
)

__all__ = [
    "KV_ROUTE_PREFIX",
    "PUBLIC_ROUTES",
    "AuthSettings",
    "authorize",
    "create_app",
    "current_user",
    "error_response",
    "parse_batch",
    "parse_txn",
    "read_body",
    "txn_body_limit_bytes",
]

logger = logging.getLogger(__name__)

KV_ROUTE_PREFIX: Final = "/v1/kv/"
MAX_VERSION: Final = 2**63 - 1
MAX_CURSOR_BYTES: Final = 8192
MAX_IDEMPOTENCY_KEY_CHARS: Final = 128
MAX_QUERY_BODY_BYTES: Final = 1 << 20
# Nodes forward over /v1/internal/*; a client's X-KV-Hops must leave one forward to the leader.
MAX_CLIENT_HOPS: Final = MAX_HOPS - 1
_BODY_CHUNK_BYTES: Final = 64 * 1024
_INTERNAL_ERROR_MESSAGE: Final = "internal error; see the node log"

_DECIMAL = re.compile(r"[0-9]+")
_BAD_PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")

_Enum = TypeVar("_Enum", bound=enum.Enum)


def txn_body_limit_bytes(limits: Limits) -> int:
    """A txn's JSON body may carry about two max-size values in base64 plus its keys."""
    return 2 * limits.max_value_bytes + (1 << 20)


# --- errors: the one mapping from exceptions to HTTP responses -------------------------------

# Errors aiohttp raises itself (routing, its own body cap) and the code we give each.
_HTTP_EXCEPTION_CODES: Final[Mapping[int, tuple[str, str]]] = {
    400: ("invalid_request", "bad request"),
    404: ("route_not_found", "no such route; see docs/api.md"),
    405: ("method_not_allowed", "method not allowed on this route"),
    413: ("payload_too_large", "request body too large"),
}


def _error_json(
    status: int, code: str, message: str, *, extra: Mapping[str, Any] | None = None
) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if extra:
        body.update(extra)
    headers: dict[str, str] = {}
    if status == 503:
        headers["Retry-After"] = str(body.get("retry_after_s", 1))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="kvstore"'  # RFC 6750
    return web.json_response({"error": body}, status=status, headers=headers)


def error_response(exc: BaseException) -> web.Response:
    """The response for any exception a handler raises (KVError, aiohttp's, or a bug)."""
    if isinstance(exc, KVError) and exc.code != "internal":
        extra: dict[str, Any] = {}
        if isinstance(exc, PreconditionFailed):
            extra["current_version"] = exc.current_version
        if isinstance(exc, ShardUnavailable):
            extra["retry_after_s"] = max(0, int(exc.retry_after_s))
        if isinstance(exc, ReplicaCorrupted):
            extra.update(shard=exc.shard_id, key=exc.key)
        return _error_json(exc.status, exc.code, exc.message, extra=extra)
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        code, message = _HTTP_EXCEPTION_CODES.get(exc.status, (f"http_{exc.status}", exc.reason))
        response = _error_json(exc.status, code, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    return _error_json(500, "internal", _INTERNAL_ERROR_MESSAGE)


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        return error_response(exc)
    except Exception as exc:
        if not isinstance(exc, KVError) or exc.code == "internal":
            # A bug: the traceback goes to the log, never to the client.
            logger.exception("unhandled error in %s %s", request.method, _route_label(request))
        return error_response(exc)


# --- authentication, authorization and per-client limits ------------------------------------

# Routes anyone may call, even with auth on: probes and scrapes carry no data or key names.
PUBLIC_ROUTES: Final = frozenset({"/health", "/ready", "/metrics"})
INTERNAL_ROUTE_PREFIX: Final = "/v1/internal/"  # peers only: guarded by kvstore.internal_api
_USER_KEY: Final = web.RequestKey("kv_user", User)
_BEARER = re.compile(r"Bearer ([\x21-\x7e]{1,512})", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    enabled: bool
    directory: UserDirectory
    admin: UserAdmin


def _authenticate(request: web.Request, directory: UserDirectory) -> User:
    headers = request.headers.getall("Authorization", [])
    if not headers:
        raise Unauthenticated("this route needs an Authorization: Bearer <token> header")
    match = _BEARER.fullmatch(headers[0]) if len(headers) == 1 else None
    if match is None:
        raise Unauthenticated("the Authorization header must be one 'Bearer <token>'")
    user = directory.user_by_token_hash(hash_token(match.group(1)))
    if user is None:
        raise Unauthenticated("the bearer token is not valid (unknown, revoked or mistyped)")
    return user


def _auth_middleware(auth: AuthSettings | None) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if auth is None or not auth.enabled:
            request[_USER_KEY] = ANONYMOUS_SUPERUSER
        elif path not in PUBLIC_ROUTES and not path.startswith(INTERNAL_ROUTE_PREFIX):
            # Even unmatched routes: an unauthenticated caller learns nothing about routing.
            request[_USER_KEY] = _authenticate(request, auth.directory)
        return await handler(request)

    return middleware


def current_user(request: web.Request) -> User:
    """Who the request runs as (the anonymous superuser when auth is off)."""
    user = request.get(_USER_KEY)
    if not isinstance(user, User):
        # Only internal routes skip authentication, and they never ask.
        raise Unauthenticated("this route needs an Authorization: Bearer <token> header")
    return user


def authorize(
    request: web.Request, action: Action, key_or_prefix: str, *, what: str = "key"
) -> User:
    """The one check every route makes: raises Forbidden (403) unless the request's user may
    `action` every key under `key_or_prefix` (a key is its own prefix; "" means every key).
    A scan or query over a prefix the user may not wholly read is refused, never clipped."""
    user = current_user(request)
    require(user, action, key_or_prefix, what=what)
    return user


def _per_client_limit_middleware(limits: Limits) -> Middleware:
    in_flight: dict[str, int] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(INTERNAL_ROUTE_PREFIX):
            return await handler(request)  # peers forward many clients' requests
        client = request.remote or "unknown"
        count = in_flight.get(client, 0)
        if count >= limits.max_requests_in_flight_per_client:
            raise TooManyRequests(
                f"{count} requests from {client} are in flight; the limit is "
                f"{limits.max_requests_in_flight_per_client}: wait for some to finish"
            )
        in_flight[client] = count + 1
        try:
            return await handler(request)
        finally:
            remaining = in_flight[client] - 1
            if remaining:
                in_flight[client] = remaining
            else:
                del in_flight[client]

    return middleware


# --- metrics ---------------------------------------------------------------------------------

_METHOD_LABELS: Final = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})


def _route_label(request: web.Request) -> str:
    # Route templates only, never raw paths: label cardinality stays bounded.
    match_info = request.match_info
    if match_info.http_exception is not None:
        return "unmatched"
    resource = match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _metrics_middleware(registry: CollectorRegistry) -> Middleware:
    requests_total = Counter(
        "kv_http_requests_total",
        "HTTP requests answered, by method, route template and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    duration_s = Histogram(
        "kv_http_request_duration_seconds",
        "HTTP request latency, by method and route template.",
        ["method", "route"],
        registry=registry,
    )

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started_s = time.perf_counter()
        status = "500"
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        except asyncio.CancelledError:
            status = "499"  # the client went away first (nginx's convention)
            raise
        finally:
            method = request.method if request.method in _METHOD_LABELS else "other"
            route = _route_label(request)
            requests_total.labels(method, route, status).inc()
            duration_s.labels(method, route).observe(time.perf_counter() - started_s)

    return middleware


# --- parsing and validation ------------------------------------------------------------------


def _percent_decode(raw: str, what: str) -> str:
    """Strict percent-decoding: every escape well formed, the result valid UTF-8."""
    if _BAD_PERCENT_ESCAPE.search(raw):
        raise InvalidRequest(f"{what} has a malformed percent-escape")
    # surrogateescape: raw non-ASCII bytes in the request line come through as surrogates.
    data = raw.encode("utf-8", "surrogateescape")
    parts = data.split(b"%")
    decoded = bytearray(parts[0])
    for part in parts[1:]:
        decoded.append(int(part[:2], 16))
        decoded += part[2:]
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8 after percent-decoding") from None


def _check_key(key: str, limits: Limits, what: str = "key") -> str:
    if not key:
        raise InvalidRequest(f"{what} must not be empty")
    if "\x00" in key:
        raise InvalidRequest(f"{what} must not contain NUL")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8 (lone surrogate)") from None
    if size > limits.max_key_bytes:
        raise PayloadTooLarge(f"{what} is {size} bytes; the limit is {limits.max_key_bytes}")
    return key


def _check_bound(value: str, limits: Limits, what: str) -> str:
    """A scan prefix/start/end: like a key, but may be empty and is a parameter (400, not 413)."""
    if "\x00" in value:
        raise InvalidRequest(f"{what} must not contain NUL")
    if len(value.encode("utf-8")) > limits.max_key_bytes:
        raise InvalidRequest(f"{what} is longer than {limits.max_key_bytes} bytes")
    return value


def _key_from_path(request: web.Request, limits: Limits) -> str:
    # Decode the raw path ourselves: aiohttp's match_info leaves invalid UTF-8 escapes such as
    # %ff as literal text, which would silently turn them into a different key.
    raw_path = request.rel_url.raw_path
    if not raw_path.startswith(KV_ROUTE_PREFIX):
        raise AssertionError(f"kv handler reached for {raw_path!r}")
    return _check_key(_percent_decode(raw_path[len(KV_ROUTE_PREFIX) :], "key"), limits)


def _query(request: web.Request) -> dict[str, list[str]]:
    """The query string decoded strictly (aiohttp turns bad UTF-8 into U+FFFD silently)."""
    params: dict[str, list[str]] = {}
    for field in request.rel_url.raw_query_string.split("&"):
        if not field:
            continue
        raw_name, _, raw_value = field.partition("=")
        name = _percent_decode(raw_name.replace("+", " "), "query parameter name")
        params.setdefault(name, []).append(
            _percent_decode(raw_value.replace("+", " "), f"query parameter {name!r}")
        )
    return params


def _param(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if values is None:
        return None
    if len(values) > 1:
        raise InvalidRequest(f"query parameter {name!r} given more than once")
    return values[0]


def _decimal(raw: str, what: str, *, low: int, high: int) -> int:
    if len(raw) > 32 or not _DECIMAL.fullmatch(raw):
        raise InvalidRequest(f"{what} must be a decimal integer in [{low}, {high}]")
    number = int(raw)
    if not low <= number <= high:
        raise InvalidRequest(f"{what} must be a decimal integer in [{low}, {high}]")
    return number


def _if_version(params: dict[str, list[str]]) -> int | None:
    raw = _param(params, "if_version")
    return None if raw is None else _decimal(raw, "if_version", low=0, high=MAX_VERSION)


def _consistency(params: dict[str, list[str]]) -> Consistency:
    raw = _param(params, "consistency")
    if raw is None:
        return Consistency.LINEARIZABLE
    try:
        return Consistency(raw)
    except ValueError:
        raise InvalidRequest("consistency must be 'linearizable' or 'stale'") from None


def _context(request: web.Request, *, accepts_idempotency_key: bool) -> RequestContext:
    hops_values = request.headers.getall("X-KV-Hops", [])
    if len(hops_values) > 1:
        raise InvalidRequest("X-KV-Hops given more than once")
    hops = _decimal(hops_values[0], "X-KV-Hops", low=0, high=MAX_CLIENT_HOPS) if hops_values else 0
    idempotency_key: str | None = None
    if accepts_idempotency_key:
        keys = request.headers.getall("Idempotency-Key", [])
        if len(keys) > 1:
            raise InvalidRequest("Idempotency-Key given more than once")
        if keys:
            idempotency_key = keys[0]
            if (
                not _PRINTABLE_ASCII.fullmatch(idempotency_key)
                or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS
            ):
                raise InvalidRequest(
                    "Idempotency-Key must be 1 to "
                    f"{MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters"
                )
    return RequestContext(hops=hops, idempotency_key=idempotency_key)


async def read_body(request: web.Request, limit: int, what: str) -> bytes:
    # Our own capped reader, so the limit is exact and the error names what was too large;
    # the Application's client_max_size only guards handlers that call request.read().
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"{what} is {request.content_length} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.content.iter_chunked(_BODY_CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
    return bytes(body)


def _compact_json(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _b64encode(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


# --- the transaction body --------------------------------------------------------------------

_TXN_FIELDS: Final = frozenset({"compare", "success", "failure"})
_COMPARE_FIELDS: Final[Mapping[CompareTarget, frozenset[str]]] = {
    CompareTarget.VERSION: frozenset({"key", "target", "op", "version"}),
    CompareTarget.VALUE: frozenset({"key", "target", "op", "value"}),
}
_OP_FIELDS: Final[Mapping[TxnOpKind, frozenset[str]]] = {
    TxnOpKind.PUT: frozenset({"op", "key", "value"}),
    TxnOpKind.DELETE: frozenset({"op", "key"}),
    TxnOpKind.GET: frozenset({"op", "key"}),
}


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not valid JSON")


def _object(
    doc: Any, where: str, allowed: frozenset[str], *, optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    unknown = sorted(doc.keys() - allowed)
    if unknown:
        # Echo a few, shortened: the names come from the client and may be huge.
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise InvalidRequest(f"{where} has unknown field(s) {shown}")
    missing = sorted(allowed - optional - doc.keys())
    if missing:
        raise InvalidRequest(f"{where} is missing field(s) {', '.join(missing)}")
    return doc


def _enum_field(doc: dict[str, Any], name: str, enum_type: type[_Enum], where: str) -> _Enum:
    raw = doc.get(name)
    choices = ", ".join(repr(member.value) for member in enum_type)
    if not isinstance(raw, str):
        raise InvalidRequest(f"{where}.{name} must be one of {choices}")
    try:
        return enum_type(raw)
    except ValueError:
        raise InvalidRequest(f"{where}.{name} must be one of {choices}") from None


def _key_field(doc: dict[str, Any], where: str, limits: Limits) -> str:
    key = doc.get("key")
    if not isinstance(key, str):
        raise InvalidRequest(f"{where}.key must be a string")
    return _check_key(key, limits, f"{where}.key")


def _value_field(doc: dict[str, Any], where: str, limits: Limits) -> bytes:
    raw = doc.get("value")
    if not isinstance(raw, str):
        raise InvalidRequest(f"{where}.value must be a base64 string")
    try:
        value = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}.value is not valid base64 (RFC 4648, padded)") from None
    if len(value) > limits.max_value_bytes:
        raise PayloadTooLarge(
            f"{where}.value is {len(value)} bytes; the limit is {limits.max_value_bytes}"
        )
    return value


def _list_field(doc: dict[str, Any], name: str, limits: Limits) -> list[Any]:
    items = doc.get(name, [])
    if not isinstance(items, list):
        raise InvalidRequest(f"{name} must be a JSON array")
    if len(items) > limits.max_txn_ops:
        raise InvalidRequest(f"{name} has {len(items)} entries; the limit is {limits.max_txn_ops}")
    return items


def _parse_compare(doc: Any, where: str, limits: Limits) -> TxnCompare:
    if not isinstance(doc, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    target = _enum_field(doc, "target", CompareTarget, where)
    _object(doc, where, _COMPARE_FIELDS[target])
    key = _key_field(doc, where, limits)
    op = _enum_field(doc, "op", CompareOp, where)
    if target is CompareTarget.VALUE:
        return TxnCompare(key, target, op, value=_value_field(doc, where, limits))
    version = doc["version"]
    if type(version) is not int or not 0 <= version <= MAX_VERSION:
        raise InvalidRequest(f"{where}.version must be an integer in [0, {MAX_VERSION}]")
    return TxnCompare(key, target, op, version=version)


def _parse_op(doc: Any, where: str, limits: Limits) -> TxnOp:
    if not isinstance(doc, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    kind = _enum_field(doc, "op", TxnOpKind, where)
    _object(doc, where, _OP_FIELDS[kind])
    key = _key_field(doc, where, limits)
    if kind is TxnOpKind.PUT:
        return TxnOp(kind, key, _value_field(doc, where, limits))
    return TxnOp(kind, key)


def parse_txn(body: bytes, limits: Limits) -> TxnRequest:
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidRequest("the body is not valid JSON") from None
    _object(doc, "the body", _TXN_FIELDS, optional=_TXN_FIELDS)  # absent branch = []
    return TxnRequest(
        compare=tuple(
            _parse_compare(item, f"compare[{i}]", limits)
            for i, item in enumerate(_list_field(doc, "compare", limits))
        ),
        success=tuple(
            _parse_op(item, f"success[{i}]", limits)
            for i, item in enumerate(_list_field(doc, "success", limits))
        ),
        failure=tuple(
            _parse_op(item, f"failure[{i}]", limits)
            for i, item in enumerate(_list_field(doc, "failure", limits))
        ),
    )


# --- the batch body --------------------------------------------------------------------------

_BATCH_FIELDS: Final = frozenset({"puts"})
_BATCH_PUT_FIELDS: Final = frozenset({"key", "value"})


def parse_batch(body: bytes, limits: Limits) -> list[tuple[str, bytes]]:
    """{"puts": [{"key": str, "value": base64}, ...]} -> [(key, value)], all checked."""
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest("the body is not valid JSON") from None
    puts = _object(doc, "the body", _BATCH_FIELDS)["puts"]
    if not isinstance(puts, list) or not puts:
        raise InvalidRequest("puts must be a non-empty JSON array")
    if len(puts) > limits.max_batch_puts:
        raise InvalidRequest(
            f"puts has {len(puts)} entries; the limit is {limits.max_batch_puts}: split the batch"
        )
    items = []
    for i, item in enumerate(puts):
        # The common case checked in one comparison; _object explains what is wrong otherwise.
        if not isinstance(item, dict) or item.keys() != _BATCH_PUT_FIELDS:
            _object(item, f"puts[{i}]", _BATCH_PUT_FIELDS)
        where = f"puts[{i}]"
        items.append((_key_field(item, where, limits), _value_field(item, where, limits)))
    return items


def _txn_result_json(result: TxnOpResult) -> dict[str, Any]:
    item: dict[str, Any] = {"op": result.kind.value, "key": result.key, "version": result.version}
    if result.kind is TxnOpKind.GET:
        item["value"] = None if result.value is None else _b64encode(result.value)
    return item


def _kv_json(item: KeyValue) -> dict[str, Any]:
    return {"key": item.key, "value": _b64encode(item.value), "version": item.version}


# --- handlers --------------------------------------------------------------------------------


class _Routes:
    def __init__(self, service: KVService, registry: CollectorRegistry) -> None:
        self._service = service
        self._limits = service.limits
        self._registry = registry

    async def get_key(self, request: web.Request) -> web.Response:
        key = _key_from_path(request, self._limits)
        authorize(request, Action.READ, key)
        params = _query(request)
        consistency = _consistency(params)
        ctx = _context(request, accepts_idempotency_key=False)
        item = await self._service.get(key, consistency, ctx)
        return web.Response(
            body=item.value,
            content_type="application/octet-stream",
            headers={"X-KV-Version": str(item.version)},
        )

    async def put_key(self, request: web.Request) -> web.Response:
        key = _key_from_path(request, self._limits)
        authorize(request, Action.WRITE, key)
        if_version = _if_version(_query(request))
        ctx = _context(request, accepts_idempotency_key=True)
        value = await read_body(request, self._limits.max_value_bytes, "value")
        written = await self._service.put(key, value, if_version, ctx)
        return web.json_response({"key": written.key, "version": written.version})

    async def delete_key(self, request: web.Request) -> web.Response:
        key = _key_from_path(request, self._limits)
        authorize(request, Action.WRITE, key)
        if_version = _if_version(_query(request))
        ctx = _context(request, accepts_idempotency_key=True)
        deleted = await self._service.delete(key, if_version, ctx)
        return web.json_response({"key": deleted.key, "version": deleted.version})

    async def scan(self, request: web.Request) -> web.Response:
        params = _query(request)
        limits = self._limits
        prefix = _check_bound(_param(params, "prefix") or "", limits, "prefix")
        authorize(request, Action.READ, prefix, what="the keys with prefix")
        start = _param(params, "start") or None  # empty = unbounded
        end = _param(params, "end") or None
        raw_limit = _param(params, "limit")
        limit = (
            limits.default_scan_limit
            if raw_limit is None
            else _decimal(raw_limit, "limit", low=1, high=limits.max_scan_limit)
        )
        cursor = _param(params, "cursor") or None
        if cursor is not None and len(cursor.encode("utf-8")) > MAX_CURSOR_BYTES:
            raise InvalidRequest(f"cursor is longer than {MAX_CURSOR_BYTES} bytes")
        page = await self._service.scan(
            prefix=prefix,
            start=None if start is None else _check_bound(start, limits, "start"),
            end=None if end is None else _check_bound(end, limits, "end"),
            limit=limit,
            cursor=cursor,
            consistency=_consistency(params),
            ctx=_context(request, accepts_idempotency_key=False),
        )
        return web.json_response(
            {"items": [_kv_json(item) for item in page.items], "next_cursor": page.next_cursor}
        )

    async def txn(self, request: web.Request) -> web.Response:
        ctx = _context(request, accepts_idempotency_key=True)
        body = await read_body(request, txn_body_limit_bytes(self._limits), "txn body")
        txn = parse_txn(body, self._limits)
        for compare in txn.compare:
            authorize(request, Action.READ, compare.key)
        for op in (*txn.success, *txn.failure):
            authorize(request, Action.READ if op.kind is TxnOpKind.GET else Action.WRITE, op.key)
        result = await self._service.txn(txn, ctx)
        return web.json_response(
            {
                "succeeded": result.succeeded,
                "results": [_txn_result_json(item) for item in result.results],
            }
        )

    async def query(self, request: web.Request) -> web.Response:
        ctx = _context(request, accepts_idempotency_key=False)
        body = await read_body(request, MAX_QUERY_BODY_BYTES, "query body")
        try:
            doc = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise InvalidRequest("the body is not valid JSON") from None
        spec = self._service.parse_query(doc)
        # Refused, never clipped: a partial answer could pass for a whole one.
        authorize(request, Action.READ, spec.key_prefix, what="the keys with prefix")
        return web.json_response(await self._service.query(spec, ctx), dumps=_compact_json)

    async def batch(self, request: web.Request) -> web.Response:
        ctx = _context(request, accepts_idempotency_key=False)
        body = await read_body(request, self._limits.max_batch_bytes, "batch body")
        items = parse_batch(body, self._limits)
        for key, _ in items:
            authorize(request, Action.WRITE, key)
        results = await self._service.batch_put(items, ctx)
        # Versions as a bare array in request order, errors apart: encoding one object per key
        # cost a sixth of a bulk load's CPU on the node.
        versions: list[int | None] = []
        errors: list[dict[str, Any]] = []
        for index, result in enumerate(results):
            if isinstance(result, KVError):
                versions.append(None)
                error = {"index": index, "key": items[index][0], "code": result.code}
                errors.append({**error, "message": result.message})
            else:
                versions.append(result)
        if len(errors) == len(results):
            raise next(r for r in results if isinstance(r, KVError))  # one clear error (503...)
        return web.json_response(
            {
                "written": len(results) - len(errors),
                "failed": len(errors),
                "versions": versions,
                "errors": errors,
            }
        )

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(await self._service.cluster_status())

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        is_ready, reason = self._service.is_ready()
        if is_ready:
            return web.json_response({"ready": True})
        return web.json_response(
            {"ready": False, "reason": reason}, status=503, headers={"Retry-After": "1"}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


class _AuthRoutes:
    """Who am I, and (admins only) the user table: add or re-issue, list, delete."""

    def __init__(self, auth: AuthSettings | None) -> None:
        self._auth = auth

    def _settings(self) -> AuthSettings:
        if self._auth is None:
            raise ShardUnavailable("this server keeps no user table", retry_after_s=0)
        return self._auth

    async def whoami(self, request: web.Request) -> web.Response:
        enabled = self._auth is not None and self._auth.enabled
        return web.json_response(_user_json(current_user(request), auth_enabled=enabled))

    async def list_users(self, request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")
        users = self._settings().directory.users()
        return web.json_response({"users": [_user_json(user) for user in users]})

    async def put_user(self, request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")
        body = await read_body(request, _USER_BODY_LIMIT_BYTES, "user body")
        try:
            doc = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise InvalidRequest("the body is not valid JSON") from None
        doc = _object(doc, "the body", frozenset({"name", "grants"}))
        name = check_user_name(doc["name"])
        grants = Grants.from_json(doc["grants"])
        token = new_token()
        await self._settings().admin.put_user(User(name, grants, hash_token(token)))
        # The only time the token is ever shown: the node keeps just its hash.
        return web.json_response({"name": name, "grants": grants.to_json(), "token": token})

    async def delete_user(self, request: web.Request) -> web.Response:
        authorize(request, Action.ADMIN, "")
        name = check_user_name(request.match_info["name"])
        await self._settings().admin.delete_user(name)
        return web.json_response({"name": name, "deleted": True})


_USER_BODY_LIMIT_BYTES: Final = 1 << 20


def _user_json(user: User, **extra: Any) -> dict[str, Any]:
    return {"name": user.name, "grants": user.grants.to_json(), **extra}


def create_app(
    service: KVService, *, registry: CollectorRegistry, auth: AuthSettings | None = None
) -> web.Application:
    """The public API of one node; the node may add its own routes under /v1/internal/.
    Without `auth` (or with auth.enabled False) every request may do everything."""
    limits = service.limits
    # The request line must fit the longest valid scan: three bounds of max_key_bytes, each
    # percent-encoded (3 chars per byte), plus a cursor. aiohttp's default (8190) would answer
    # a valid 4 KiB non-ASCII key with its own plain-text 400 before any handler runs.
    max_line_size = 3 * (3 * limits.max_key_bytes + 16) + 3 * MAX_CURSOR_BYTES + 1024
    app = web.Application(
        middlewares=[
            _metrics_middleware(registry),
            _error_middleware,
            _per_client_limit_middleware(limits),
            _auth_middleware(auth),
        ],
        client_max_size=txn_body_limit_bytes(limits),
        handler_args={"max_line_size": max(max_line_size, 8190)},
    )
    routes = _Routes(service, registry)
    key_path = KV_ROUTE_PREFIX + "{key:.*}"  # ".*": an empty key gets a 400, not a 404
    app.router.add_get(key_path, routes.get_key)
    app.router.add_put(key_path, routes.put_key)
    app.router.add_delete(key_path, routes.delete_key)
    app.router.add_get("/v1/scan", routes.scan)
    app.router.add_post("/v1/txn", routes.txn)
    app.router.add_post("/v1/query", routes.query)
    app.router.add_post("/v1/batch", routes.batch)
    app.router.add_get("/v1/cluster", routes.cluster)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ready", routes.ready)
    app.router.add_get("/metrics", routes.metrics)
    auth_routes = _AuthRoutes(auth)
    app.router.add_get("/v1/auth/whoami", auth_routes.whoami)
    app.router.add_get("/v1/auth/users", auth_routes.list_users)
    app.router.add_post("/v1/auth/users", auth_routes.put_user)
    app.router.add_delete("/v1/auth/users/{name}", auth_routes.delete_user)
    return app
