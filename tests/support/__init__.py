"""What the integration tests and the benchmarks share: processes, a webhook receiver, organizations.

* :class:`Stack` (``stack.py``): Celery workers, beat and gunicorn of one
  run, each a :class:`Process` (``processes.py``) in its own process group;
* :class:`Receiver` (``receiver.py``): a real HTTP webhook receiver;
* :func:`make_org` / :class:`Org` (``orgs.py``): an organization and its key;
* :class:`Api` (``api.py``): one organization's HTTP client;
* :func:`wait_for` (``waiting.py``): every wait is bounded.

Nothing here imports pytest: ``bench/`` runs it as plain Python.
"""

from tests.support.api import Api
from tests.support.orgs import Org, empty_tables, make_org
from tests.support.processes import Process
from tests.support.receiver import Answer, Received, Receiver, answer_no_content, answer_ok
from tests.support.stack import ROOT, Stack
from tests.support.waiting import wait_for

__all__ = [
    "ROOT",
    "Answer",
    "Api",
    "Org",
    "Process",
    "Received",
    "Receiver",
    "Stack",
    "answer_no_content",
    "answer_ok",
    "empty_tables",
    "make_org",
    "wait_for",
]
