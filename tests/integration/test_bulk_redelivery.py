"""Bulk redelivery on the real stack: a receiver that was gone comes back, and its failed webhooks follow.

Through the API (``POST /v1/deliveries/redeliver``) for one host, then the
operator's command line (``waybill deliveries redeliver``) for the rest: each
failed delivery arrives once more, with its original ``webhook-id``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
import requests

from tests.support import Api, Receiver, Stack, wait_for
from tests.support.receiver import event_task_id

pytestmark = pytest.mark.integration


def test_failed_webhooks_are_sent_again_by_the_api_and_by_the_cli(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    receiver.respond = lambda _n: (410, {}, b"gone", 0.0)  # 410 ends a delivery at its first attempt
    stack = make_stack()
    stack.web()
    stack.worker()
    stack.webhooks_worker()
    org = stack.org(credits=100)
    api = Api(stack.base_url, org)
    # Two hosts for one receiver: 127.0.0.1 and localhost.
    by_ip = [
        api.submit({"type": "echo", "input": i, "webhook": {"url": receiver.url}}).json()["taskId"]
        for i in range(3)
    ]
    by_name = receiver.url.replace("127.0.0.1", "localhost")
    named = [
        api.submit({"type": "echo", "input": i, "webhook": {"url": by_name}}).json()["taskId"]
        for i in range(2)
    ]
    everything = by_ip + named

    def all_failed() -> bool:
        return all(api.get(t)["webhook"]["status"] == "failed" for t in everything)

    wait_for(all_failed, 60, "every delivery to fail")
    first_ids = {event_task_id(r.body): r.headers["webhook-id"] for r in list(receiver.received)}
    receiver.respond = lambda _n: (200, {}, b"ok", 0.0)  # the receiver is back

    r = requests.post(
        stack.base_url + "/v1/deliveries/redeliver",
        json={"since": "2020-01-01T00:00:00Z", "host": "127.0.0.1"},
        headers=org.headers,
        timeout=30,
    )
    assert r.status_code == 202 and r.json() == {"count": 3}
    wait_for(
        lambda: all(api.get(t)["webhook"]["status"] == "delivered" for t in by_ip), 30, "the API's redelivery"
    )
    assert all(api.get(t)["webhook"]["status"] == "failed" for t in named)

    cli = subprocess.run(
        [sys.executable, "-m", "app.cli", "deliveries", "redeliver", org.id, "--since", "1h"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == {"organizationId": org.id, "count": 2}
    wait_for(
        lambda: all(api.get(t)["webhook"]["status"] == "delivered" for t in named), 30, "the CLI's redelivery"
    )

    delivered = [r for r in list(receiver.received) if event_task_id(r.body) in everything]
    assert len(delivered) == 2 * len(everything)  # the failed attempt, then exactly one more
    for got in delivered:
        assert got.headers["webhook-id"] == first_ids[event_task_id(got.body)]  # the same event
    unknown = subprocess.run(
        [sys.executable, "-m", "app.cli", "deliveries", "redeliver", "org_nope", "--since", "1h"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 1 and "organization" in unknown.stderr.lower()
