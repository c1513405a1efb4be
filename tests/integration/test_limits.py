"""Credits, the queue limit and idempotency keys, exact under concurrency through gunicorn."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from app.models import CreditEntry, Organization, Task
from tests.support import Stack

pytestmark = pytest.mark.integration

CLIENT_THREADS = 48


def _post_many(stack: Stack, api_key: str, bodies: list[dict]) -> list[requests.Response]:
    local = requests.Session
    sessions: dict[int, requests.Session] = {}

    def post(i_body: tuple[int, dict]) -> requests.Response:
        import threading

        ident = threading.get_ident()
        session = sessions.setdefault(ident, local())
        return session.post(
            stack.base_url + "/v1/tasks",
            json=i_body[1],
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        )

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        return list(pool.map(post, enumerate(bodies)))


def _ledger(stack: Stack, org_id: str) -> tuple[int, int, Counter[str]]:
    with stack.db.session() as s:
        org = s.get(Organization, org_id)
        assert org is not None
        total = s.execute(
            select(func.coalesce(func.sum(CreditEntry.amount), 0)).where(
                CreditEntry.organization_id == org_id
            )
        ).scalar_one()
        kinds = Counter(
            dict(
                s.execute(
                    select(CreditEntry.kind, func.count())
                    .where(CreditEntry.organization_id == org_id)
                    .group_by(CreditEntry.kind)
                ).all()
            )
        )
        return org.credits, int(total), kinds


def test_balance_100_and_500_racing_submissions_accept_exactly_100(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.web()
    org = stack.org(credits=100)
    responses = _post_many(stack, org.api_key, [{"type": "echo", "input": i} for i in range(500)])
    codes = Counter(r.status_code for r in responses)
    assert codes == {202: 100, 402: 400}, codes
    problem = next(r for r in responses if r.status_code == 402).json()
    assert problem["balance"] == 0 and problem["cost"] == 1
    credits, ledger_sum, kinds = _ledger(stack, org.id)
    assert credits == 0 == ledger_sum
    assert kinds == {"grant": 1, "reserve": 100}


def test_queue_limit_100_and_300_racing_submissions_accept_exactly_100(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.web()  # no worker: nothing leaves the queue
    org = stack.org(queue_limit=100, credits=10_000)
    responses = _post_many(stack, org.api_key, [{"type": "echo"} for _ in range(300)])
    codes = Counter(r.status_code for r in responses)
    assert codes == {202: 100, 429: 200}, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["type"].endswith("queue-full")
    with stack.db.session() as s:
        queued = s.execute(select(func.count()).where(Task.organization_id == org.id)).scalar_one()
    assert queued == 100
    view = requests.get(stack.base_url + "/v1/organization", headers=org.headers, timeout=10).json()
    assert view["queued"] == 100 and view["queueLimit"] == 100
    assert view["credits"] == 10_000 - 100


def test_idempotency_keys_race_to_exactly_one_task_and_one_charge_each(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.web()
    org = stack.org(credits=10_000)
    bodies = [
        {"type": "echo", "input": {"key": k}, "idempotencyKey": f"key-{k}"}
        for _ in range(20)
        for k in range(100)
    ]
    responses = _post_many(stack, org.api_key, bodies)
    codes = Counter(r.status_code for r in responses)
    assert codes == {202: 100, 200: 1900}, codes
    by_key: dict[str, set[str]] = {}
    for r in responses:
        body = r.json()
        by_key.setdefault(body["idempotencyKey"], set()).add(body["taskId"])
        if r.status_code == 200:
            assert r.headers["Idempotent-Replayed"] == "true"
    assert len(by_key) == 100 and all(len(ids) == 1 for ids in by_key.values())
    credits, ledger_sum, kinds = _ledger(stack, org.id)
    assert kinds["reserve"] == 100 and credits == ledger_sum == 10_000 - 100
    changed = requests.post(
        stack.base_url + "/v1/tasks",
        json={"type": "echo", "input": {"key": "other"}, "idempotencyKey": "key-1"},
        headers=org.headers,
        timeout=10,
    )
    assert changed.status_code == 422
    found = requests.get(
        stack.base_url + "/v1/tasks?idempotencyKey=key-1", headers=org.headers, timeout=10
    ).json()
    assert [t["taskId"] for t in found["data"]] == list(by_key["key-1"])
