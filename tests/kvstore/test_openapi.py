"""docs/openapi.json must describe exactly the routes create_app serves, and their errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kvstore import errors
from kvstore.admin_api import add_admin_routes
from kvstore.http_api import create_app
from tests.kvstore.fake_admin import FakeAdminService, RecordingMetaProposer
from tests.kvstore.fake_service import FakeKVService

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
ERROR_REF = "#/components/schemas/Error"

# The errors each operation can produce; the spec must list at least these.
SERVICE_ERRORS = {"500", "503", "504"}
LIMITED = {"429"}  # every route: too many requests in flight from one client
AUTHENTICATED = {"401"} | LIMITED  # every route but the public probes, with auth on
AUTHORIZED = {"403"} | AUTHENTICATED  # routes that check a grant
EXPECTED_ERRORS: dict[tuple[str, str], set[str]] = {
    ("GET", "/v1/kv/{key}"): {"400", "404", "413"} | SERVICE_ERRORS | AUTHORIZED,
    ("PUT", "/v1/kv/{key}"): {"400", "412", "413"} | SERVICE_ERRORS | AUTHORIZED,
    ("DELETE", "/v1/kv/{key}"): {"400", "404", "412", "413"} | SERVICE_ERRORS | AUTHORIZED,
    ("GET", "/v1/scan"): {"400"} | SERVICE_ERRORS | AUTHORIZED,
    ("POST", "/v1/txn"): {"400", "413"} | SERVICE_ERRORS | AUTHORIZED,
    ("POST", "/v1/batch"): {"400", "413"} | SERVICE_ERRORS | AUTHORIZED,
    ("POST", "/v1/query"): {"400", "413", "500", "503"} | AUTHORIZED,
    ("GET", "/v1/cluster"): {"500", "503"} | AUTHENTICATED,
    ("GET", "/health"): {"500"} | LIMITED,
    ("GET", "/ready"): {"500", "503"} | LIMITED,
    ("GET", "/metrics"): {"500"} | LIMITED,
    ("GET", "/v1/admin/check"): {"500"} | AUTHORIZED,
    ("POST", "/v1/admin/check"): {"500"} | AUTHORIZED,
    ("GET", "/v1/admin/snapshot/{shard}"): {"400", "404", "500", "503"} | AUTHORIZED,
    ("PUT", "/v1/admin/snapshot/{shard}"): {"400", "404", "412", "413"}
    | SERVICE_ERRORS
    | AUTHORIZED,
    ("GET", "/v1/auth/whoami"): {"500"} | AUTHENTICATED,
    ("GET", "/v1/auth/users"): {"500", "503"} | AUTHORIZED,
    ("POST", "/v1/auth/users"): {"400", "413"} | SERVICE_ERRORS | AUTHORIZED,
    ("DELETE", "/v1/auth/users/{name}"): {"400", "404"} | SERVICE_ERRORS | AUTHORIZED,
    ("POST", "/v1/admin/nodes"): {"400", "412", "413"} | SERVICE_ERRORS | AUTHORIZED,
    ("POST", "/v1/admin/nodes/{node_id}/drain"): {"400", "412"} | SERVICE_ERRORS | AUTHORIZED,
    ("POST", "/v1/admin/shards/{shard}/split"): {"400", "404", "412"} | SERVICE_ERRORS | AUTHORIZED,
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return dict(json.loads(SPEC_PATH.read_text(encoding="utf-8")))


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follows local $refs ("#/components/..."); a dangling one raises KeyError."""
    while isinstance(node, dict) and "$ref" in node:
        ref = str(node["$ref"])
        assert ref.startswith("#/"), ref
        node = spec
        for part in ref[2:].split("/"):
            node = node[part]
    return node


def served_routes() -> set[tuple[str, str]]:
    app = create_app(FakeKVService(), registry=CollectorRegistry())
    add_admin_routes(app, FakeAdminService(), RecordingMetaProposer())
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and not route.resource.canonical.startswith("/v1/internal/")
    }


def test_the_spec_documents_exactly_the_served_routes(spec: dict[str, Any]) -> None:
    assert set(operations(spec)) == served_routes()


def test_the_expected_error_table_covers_every_route(spec: dict[str, Any]) -> None:
    assert set(EXPECTED_ERRORS) == served_routes()


def test_every_operation_documents_its_error_responses(spec: dict[str, Any]) -> None:
    for key, operation in operations(spec).items():
        documented = {status for status in operation["responses"] if status >= "400"}
        missing = EXPECTED_ERRORS[key] - documented
        assert not missing, f"{key} does not document {sorted(missing)}"


def test_every_error_response_is_json_in_the_error_shape(spec: dict[str, Any]) -> None:
    for (method, path), operation in operations(spec).items():
        for status, response in operation["responses"].items():
            if status < "400" or (path, status) == ("/ready", "503"):
                continue  # /ready's 503 carries the readiness body by contract
            schema = resolve(spec, response)["content"]["application/json"]["schema"]
            assert schema == {"$ref": ERROR_REF}, (method, path, status)


def test_every_503_documents_retry_after(spec: dict[str, Any]) -> None:
    for key, operation in operations(spec).items():
        if "503" in operation["responses"]:
            response = resolve(spec, operation["responses"]["503"])
            assert "Retry-After" in response.get("headers", {}), key


def test_every_reference_resolves(spec: dict[str, Any]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(spec, node)  # raises KeyError when dangling
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(spec)


def test_the_error_code_enum_lists_exactly_the_codes_the_api_sends(spec: dict[str, Any]) -> None:
    error = spec["components"]["schemas"]["Error"]["properties"]["error"]
    kv_codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.KVError)
    }
    assert set(error["properties"]["code"]["enum"]) == kv_codes | {
        "route_not_found",
        "method_not_allowed",
    }


def test_the_spec_is_valid_openapi(spec: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")  # optional: not a dev dependency
    validator.validate(spec)
