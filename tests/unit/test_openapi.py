"""The OpenAPI document describes the running API: schemathesis fuzzes every operation."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
import schemathesis.checks as checks
from flask import Flask
from flask.testing import FlaskClient
from requests.structures import CaseInsensitiveDict
from schemathesis import Case

from app.api.openapi import build_spec
from app.db import Database
from app.services.waiting import parse_prefer_wait
from tests.support import make_org

_current: dict[str, Flask] = {}


def _proxy(environ: dict[str, Any], start_response: Any) -> Any:
    """Forwards to the test's app; before any test, serves the document schemathesis loads."""
    app = _current.get("app")
    if app is None:
        body = json.dumps(build_spec()).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return app(environ, start_response)


schema = schemathesis.openapi.from_wsgi("/openapi.json", _proxy)


@pytest.fixture
def fuzz_key(app: Flask, db: Database) -> Iterator[str]:
    _current["app"] = app
    yield make_org(db, "fuzz").api_key
    _current.clear()


@schema.parametrize()
@hypothesis.settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
)
def test_every_response_matches_the_document_and_none_is_5xx(case: Case, fuzz_key: str) -> None:
    if case.path == "/metrics":
        return  # plain text; covered by its own tests
    # Schemathesis's own type: generated names may be in any case ("prefer").
    headers = CaseInsensitiveDict(case.headers or {})
    headers["Authorization"] = f"Bearer {fuzz_key}"
    if parse_prefer_wait(headers.get("Prefer")):
        # No worker runs here: a wait would always last its full N seconds
        # (the document's example is wait=10). wait=0 still takes that path.
        headers["Prefer"] = "wait=0"
    case.headers = headers
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.text)
    # The document's conformance: status codes, content types, headers and
    # bodies as documented. (Whether a generated body is *accepted* depends
    # on the task types installed, which a static document cannot enumerate.)
    case.validate_response(
        response,
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_headers_conformance,
            checks.response_schema_conformance,
        ],
    )


def test_openapi_lists_every_spec_path_and_docs_renders_it(client: FlaskClient) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    expected = {
        "/v1/tasks": {"post", "get"},
        "/v1/tasks/{taskId}": {"get"},
        "/v1/tasks/{taskId}/cancel": {"post"},
        "/v1/tasks/{taskId}/deliveries": {"get", "post"},
        "/v1/organization": {"get"},
        "/v1/task-types": {"get"},
        "/v1/webhook-secret": {"get"},
        "/v1/webhook-secret/rotate": {"post"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert set(doc["paths"][path]) == methods, path
    submit = doc["paths"]["/v1/tasks"]["post"]["responses"]
    assert set(submit) == {"200", "202", "400", "401", "402", "413", "415", "422", "429"}
    assert "Retry-After" in submit["429"]["headers"]
    assert "Location" in submit["202"]["headers"]


def test_docs_page_and_its_assets_are_served_by_the_app_itself(client: FlaskClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/openapi.json" in html
    # Offline: nothing is loaded from another host.
    assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
    scripts = re.findall(r'<script src="([^"]+)"', html)
    styles = re.findall(r'<link rel="stylesheet" href="([^"]+)"', html)
    assert scripts and styles
    for url in scripts + styles:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.data) > 10_000, url  # the real Swagger UI files, not an error page
    assert "SwaggerUIBundle" in client.get(scripts[0]).get_data(as_text=True)
    # Only Swagger UI's own files: not the package's demo page, nor anything by path tricks.
    for path in ("index.html", "swagger-initializer.js", "../__init__.py", "%2e%2e/__init__.py"):
        assert client.get(f"/docs/static/{path}").status_code == 404, path
