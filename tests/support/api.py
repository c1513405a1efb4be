"""A client of one organization for Waybill's HTTP API, as the integration tests use it."""

from __future__ import annotations

from typing import Any

import requests

from tests.support.orgs import Org
from tests.support.waiting import wait_for


class Api:
    def __init__(self, base_url: str, org: Org) -> None:
        self.base_url = base_url
        self.org = org
        self.http = requests.Session()
        self.http.headers.update(org.headers)

    def submit(self, body: dict[str, Any], **headers: str) -> requests.Response:
        return self.http.post(self.base_url + "/v1/tasks", json=body, headers=headers, timeout=30)

    def get(self, task_id: str) -> dict[str, Any]:
        r = self.http.get(f"{self.base_url}/v1/tasks/{task_id}", timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait_status(self, task_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
        return dict(
            wait_for(
                lambda: (t := self.get(task_id))["status"] in statuses and t,
                timeout,
                f"task {task_id} to reach {statuses}",
                interval=0.1,
            )
        )
