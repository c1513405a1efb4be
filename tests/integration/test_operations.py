"""What an operator sees: Flower, /metrics, and JSON logs that follow a request id."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.embedded_redis import free_port
from tests.support import Api, Receiver, Stack, wait_for

pytestmark = pytest.mark.integration


def test_flower_shows_waybill_tasks_by_name_and_state_and_requires_credentials(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.web()
    stack.worker(queues="tasks", concurrency=2)
    stack.webhooks_worker()  # consumes the maintenance queue too: beat's ticks run there
    stack.beat()
    port = free_port()
    flower = stack.start(
        "flower",
        [sys.executable, "-m", "app.cli", "flower"],
        FLOWER_PORT=str(port),
        FLOWER_BASIC_AUTH="ops:s3cret",
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(base + "/api/workers", auth=("ops", "s3cret"), timeout=2).status_code == 200
        except requests.RequestException:
            return not flower.alive()

    wait_for(up, 60, "Flower to answer")
    assert flower.alive(), flower.output()
    org = stack.org()
    api = Api(stack.base_url, org)
    secret_input = {"password": "hunter2-never-shown"}
    ids = [api.submit({"type": "echo", "input": {**secret_input, "n": i}}).json()["taskId"] for i in range(3)]
    for task_id in ids:
        api.wait_status(task_id, {"succeeded"})
    time.sleep(3)  # beat's dispatch step ticks every second meanwhile

    def seen() -> dict:
        r = requests.get(base + "/api/tasks", auth=("ops", "s3cret"), timeout=5)
        everything = r.json()
        found = {k: v for k, v in everything.items() if v.get("state") == "SUCCESS" and k in ids}
        return everything if set(ids) <= set(found) else {}

    tasks = wait_for(seen, 30, "Flower to list the tasks")
    for task_id in ids:
        # Named by its Waybill type, with its organization beside the id; never the input.
        assert tasks[task_id]["name"] == "waybill.tasks.run:echo", tasks[task_id]
        assert task_id in tasks[task_id]["args"] and org.id in tasks[task_id]["args"]
        assert "hunter2" not in json.dumps(tasks[task_id])
    # Beat's maintenance ticks send no task events: the operators' list holds only their tasks.
    assert not [v["name"] for v in tasks.values() if str(v.get("name", "")).startswith("waybill.maintenance")]
    assert requests.get(base + "/api/tasks", timeout=5).status_code == 401
    assert requests.get(base + "/api/tasks", auth=("ops", "wrong"), timeout=5).status_code == 401


def test_flower_refuses_to_start_without_credentials_outside_the_local_run(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    proc = stack.start("flower", [sys.executable, "-m", "app.cli", "flower"], FLOWER_PORT=str(free_port()))
    proc.process.wait(30)
    assert proc.process.returncode == 2
    assert "FLOWER_BASIC_AUTH" in proc.output()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_move_by_exactly_what_a_run_did(
    make_stack: Callable[..., Stack], tmp_path, receiver: Receiver
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    # With the token, /metrics shows per-organization series (without it they are summed).
    stack = make_stack(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), METRICS_TOKEN="scrape-me")
    scrape = {"Authorization": "Bearer scrape-me"}
    stack.web()
    stack.worker(queues="tasks", concurrency=2)
    stack.webhooks_worker()
    # Room for the four tasks submitted back to back below: whether the
    # worker has claimed one by the fourth is a race the test must not depend on.
    api = Api(stack.base_url, stack.org(credits=5, queue_limit=4))
    assert requests.get(stack.base_url + "/metrics", timeout=10).status_code == 401
    before = _samples(requests.get(stack.base_url + "/metrics", headers=scrape, timeout=10).text)

    ok = [api.submit({"type": "echo", "input": i, "webhook": {"url": receiver.url}}) for i in range(3)]
    assert [r.status_code for r in ok] == [202] * 3
    replay = api.submit({"type": "echo", "idempotencyKey": "k"})
    assert replay.status_code == 202
    assert api.submit({"type": "echo", "idempotencyKey": "k"}).status_code == 200
    for r in [*ok, replay]:
        api.wait_status(r.json()["taskId"], {"succeeded"})
    wait_for(lambda: len(receiver.received) == 3, 30, "three webhooks")
    assert api.submit({"type": "nope"}).status_code == 400
    fifth = api.submit({"type": "echo"})  # the 5th and last credit
    assert fifth.status_code == 202
    assert api.submit({"type": "echo"}).status_code == 402
    api.wait_status(fifth.json()["taskId"], {"succeeded"})

    after_text = requests.get(stack.base_url + "/metrics", headers=scrape, timeout=10).text
    after = _samples(after_text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("waybill_submissions_total", outcome="accepted") == 5
    assert delta("waybill_submissions_total", outcome="replayed") == 1
    assert delta("waybill_submissions_total", outcome="rejected_4xx") == 1
    assert delta("waybill_submissions_total", outcome="rejected_402") == 1
    assert delta("waybill_limit_rejections_total", organization=api.org.id, limit="credits") == 1
    assert delta("waybill_tasks_finished_total", type="echo", status="succeeded") == 5
    assert delta("waybill_task_run_seconds_count", type="echo") == 5
    assert delta("waybill_task_latency_seconds_count", type="echo") == 5
    assert delta("waybill_webhook_attempts_total", outcome="delivered") == 3
    assert delta("waybill_webhook_delivery_seconds_count") == 3
    assert ("waybill_queue_depth", (("queue", "tasks"),)) in after
    assert after[("waybill_organization_waiting", (("organization", "other"),))] == 0


def test_logs_are_json_and_one_request_id_follows_the_task_to_its_webhook(
    make_stack: Callable[..., Stack], receiver: Receiver
) -> None:
    stack = make_stack()
    stack.web()
    stack.worker(queues="tasks", concurrency=2)
    stack.webhooks_worker()
    api = Api(stack.base_url, stack.org())
    r = api.submit({"type": "echo", "webhook": {"url": receiver.url}}, **{"X-Request-Id": "trace-42"})
    assert r.headers["X-Request-Id"] == "trace-42"
    task_id = r.json()["taskId"]
    wait_for(lambda: receiver.received, 30, "the webhook")
    # The first attempt is sent, and logged, by the tasks worker (app/usecases/first_attempt.py).
    wait_for(lambda: any("webhook.attempt" in p.output() for p in stack.procs), 10, "the attempt log")
    events: dict[str, dict] = {}
    for proc in stack.procs:
        for line in proc.output().splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)  # every structured line is valid JSON
            assert {"timestamp", "level", "message"} <= set(record)
            if record.get("task_id") == task_id:
                events.setdefault(record.get("event", ""), record)
    for event in ("task.accepted", "task.started", "task.finished", "webhook.attempt"):
        assert events[event]["request_id"] == "trace-42", (event, events.get(event))
    assert events["webhook.attempt"]["webhook_id"].startswith("msg_")
    all_text = "".join(p.output() for p in stack.procs)
    assert api.org.api_key not in all_text and api.org.webhook_secret not in all_text
