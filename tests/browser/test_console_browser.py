"""An operator in a real browser: sign in, find a task, redeliver it, change a limit, revoke a key.

Every action is checked through the API afterwards, as a customer would see
it. Each page is photographed (``make browser`` keeps the pictures in
docs/images for docs/operations.rst).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import Api, Receiver, Stack, wait_for

pytestmark = pytest.mark.integration


def test_an_operator_finds_a_task_redelivers_changes_a_limit_and_revokes_a_key(
    make_stack: Callable[..., Stack], receiver: Receiver, browser: Any, screenshots: Path
) -> None:
    receiver.respond = lambda _n: (410, {}, b"gone", 0.0)  # the customer's receiver is gone for now
    stack = make_stack()
    stack.web()
    stack.worker()
    stack.webhooks_worker()
    org = stack.org("Globex", credits=500)
    api = Api(stack.base_url, org)
    task_id = api.submit({"type": "echo", "input": {"order": 42}, "webhook": {"url": receiver.url}}).json()[
        "taskId"
    ]
    wait_for(lambda: api.get(task_id)["webhook"]["status"] == "failed", 60, "the webhook to fail")
    for i in range(3):  # a little history for the pages
        api.submit({"type": "sleep", "input": {"seconds": 0.2 + i / 10}})

    # Without credentials (or with wrong ones) the console answers 401 and shows nothing.
    # (Headless Chromium turns a 401 into a navigation error: asked with requests.)
    bare = requests.get(stack.base_url + "/console/", timeout=10)
    assert bare.status_code == 401 and "Globex" not in bare.text
    wrong = requests.get(stack.base_url + "/console/", auth=("operator", "guess"), timeout=10)
    assert wrong.status_code == 401

    user, password = stack.console_auth
    context = browser.new_context(
        base_url=stack.base_url,
        http_credentials={"username": user, "password": password},
        viewport={"width": 1280, "height": 900},
    )
    page = context.new_page()
    try:
        # Signed in: the overview lists the organization.
        assert page.goto("/console/").status == 200
        assert page.inner_text("[data-test=console-user]") == user
        assert "Globex" in page.inner_text("main")
        page.screenshot(path=str(screenshots / "console-overview.png"), full_page=True)

        # Find the task by its id, open it.
        page.click("#nav-tasks")
        page.fill("#search-task-id", task_id)
        page.click("#task-search-submit")
        page.wait_for_selector("[data-test=task-row]")  # the results page, not the form's
        rows = page.query_selector_all("[data-test=task-row]")
        assert [r.get_attribute("data-task-id") for r in rows] == [task_id]
        page.screenshot(path=str(screenshots / "console-tasks.png"), full_page=True)
        page.click("[data-test=task-link]")
        assert page.inner_text("[data-test=task-id]") == task_id
        assert '"order": 42' in page.inner_text("[data-test=task-input]")
        assert page.inner_text("[data-test=delivery-status]") == "failed"

        # The receiver is back: redeliver from the task's page.
        receiver.respond = lambda _n: (200, {}, b"ok", 0.0)
        page.click("#redeliver-submit")
        page.wait_for_selector("[data-test=notice]")  # raises unless the next page shows it
        wait_for(lambda: api.get(task_id)["webhook"]["status"] == "delivered", 30, "the redelivery")
        page.reload()
        assert page.inner_text("[data-test=delivery-status]") == "delivered"
        page.screenshot(path=str(screenshots / "console-task.png"), full_page=True)

        # Change the queue limit on the organization's page; the API shows it.
        page.click("#task-org-link")
        page.fill("#queue-limit", "7")
        page.click("#limits-submit")
        assert page.inner_text("[data-test=queue-limit]") == "7"
        assert api.http.get(stack.base_url + "/v1/organization", timeout=10).json()["queueLimit"] == 7
        # A bad value is refused and changes nothing.
        page.fill("#queue-limit", "-1")
        page.click("#limits-submit")
        page.wait_for_selector("[data-test=form-errors]")  # raises unless the next page shows it
        assert api.http.get(stack.base_url + "/v1/organization", timeout=10).json()["queueLimit"] == 7

        # Create a key, see it once, revoke it: the API refuses it from then on.
        page.click("#key-create-submit")
        new_key = page.inner_text("[data-test=new-api-key]")
        new_key_id = page.inner_text("[data-test=new-key-id]")
        assert _status(stack, new_key) == 200
        page.click("#back-to-org")
        page.click(f"#revoke-{new_key_id} [data-test=key-revoke]")
        assert _status(stack, new_key) == 401
        assert _status(stack, org.api_key) == 200  # the organization's other key still works
        page.screenshot(path=str(screenshots / "console-organization.png"), full_page=True)

        # The audit records name the operator and each action, newest first.
        actors = [a.inner_text() for a in page.query_selector_all("[data-test=audit-actor]")]
        actions = [a.inner_text() for a in page.query_selector_all("[data-test=audit-action]")]
        assert set(actors) == {user} and len(actions) >= 3, (actors, actions)

        page.click("#nav-deliveries")
        page.wait_for_selector("#bulk-redeliver-form")  # raises unless the next page shows it
        page.screenshot(path=str(screenshots / "console-deliveries.png"), full_page=True)
    finally:
        context.close()


def _status(stack: Stack, key: str) -> int:
    return requests.get(
        stack.base_url + "/v1/organization", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).status_code
