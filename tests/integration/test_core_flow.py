"""POST -> poll -> final status through gunicorn, a real Celery worker, Redis and SQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import Api, Stack

pytestmark = pytest.mark.integration


@pytest.fixture
def site() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = b"<h1>hello from the test site</h1>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_every_builtin_type_runs_to_its_result(make_stack: Callable[..., Stack], site: str) -> None:
    stack = make_stack()
    stack.web()
    stack.worker()
    org = stack.org(credits=100)
    api = Api(stack.base_url, org)

    submitted = {
        "echo": api.submit({"type": "echo", "input": {"hello": ["world", 1, None]}}),
        "sleep": api.submit({"type": "sleep", "input": {"seconds": 0.3}}),
        "fetch": api.submit({"type": "http.fetch", "input": {"url": site + "/page"}}),
        "head": api.submit({"type": "http.fetch", "input": {"url": site + "/", "method": "HEAD"}}),
        "refused": api.submit({"type": "http.fetch", "input": {"url": "http://127.0.0.1:1/"}}),
    }
    for name, r in submitted.items():
        assert r.status_code == 202, (name, r.text)
        assert r.json()["status"] == "queued"
    ids = {name: r.json()["taskId"] for name, r in submitted.items()}
    done = {name: api.wait_status(task_id, {"succeeded", "failed"}) for name, task_id in ids.items()}

    assert done["echo"]["status"] == "succeeded"
    assert done["echo"]["result"] == {"hello": ["world", 1, None]}
    assert done["sleep"]["status"] == "succeeded"
    assert done["sleep"]["result"]["sleptSeconds"] >= 0.3
    fetched = done["fetch"]["result"]
    assert done["fetch"]["status"] == "succeeded"
    assert fetched["status"] == 200 and "hello from the test site" in fetched["body"]
    assert fetched["headers"]["content-type"] == "text/html" and fetched["elapsedMs"] >= 0
    assert done["head"]["result"]["status"] == 204 and done["head"]["result"]["body"] == ""
    assert done["refused"]["status"] == "failed"
    assert done["refused"]["error"]["code"] == "fetch_connection_refused"
    assert "result" not in done["refused"]
    for task in done.values():
        assert task["startedAt"] and task["completedAt"]

    org_view = api.http.get(stack.base_url + "/v1/organization").json()
    # 1 + 1 + 2 + 2 charged; the refused fetch (2) refunded.
    assert org_view["credits"] == 100 - 6
    assert org_view["queued"] == 0 and org_view["running"] == 0
