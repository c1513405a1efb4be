"""waybill-client: the Python SDK of Waybill's HTTP API (``docs/api.md``, version 1.1).

Submit a task, wait for it, follow its events, verify its webhooks::

    from waybill_client import Client

    with Client("http://127.0.0.1:8000", "wb_...") as wb:
        task = wb.submit("echo", {"hello": "world"})
        done = wb.wait(task.task_id, timeout=60)
        print(done.status, done.result)

:class:`AsyncClient` is the same on asyncio. Error answers raise
:class:`ApiError` subclasses carrying the problem+json members; 429, 503 and
connection errors are retried safely (submissions carry an idempotency key).
"""

from waybill_client._version import __version__
from waybill_client.async_client import AsyncClient
from waybill_client.client import Client
from waybill_client.errors import (
    ApiError,
    BadRequest,
    Conflict,
    IdempotencyConflict,
    InsufficientCredits,
    NetworkError,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
    WaitTimeout,
    WaybillError,
    WebhookVerificationError,
)
from waybill_client.models import (
    Attempt,
    BatchItem,
    Delivery,
    Event,
    Organization,
    Problem,
    Progress,
    Submission,
    Task,
    TaskError,
    TaskType,
    TaskWebhook,
    WebhookEvent,
)
from waybill_client.retry import RetryPolicy
from waybill_client.sse import ServerSentEvent, SSEParser
from waybill_client.webhooks import verify_webhook

__all__ = [
    "ApiError",
    "AsyncClient",
    "Attempt",
    "BadRequest",
    "BatchItem",
    "Client",
    "Conflict",
    "Delivery",
    "Event",
    "IdempotencyConflict",
    "InsufficientCredits",
    "NetworkError",
    "NotFound",
    "Organization",
    "PayloadTooLarge",
    "PaymentRequired",
    "Problem",
    "Progress",
    "RateLimited",
    "RetryPolicy",
    "SSEParser",
    "ServerError",
    "ServerSentEvent",
    "ServiceUnavailable",
    "Submission",
    "Task",
    "TaskError",
    "TaskType",
    "TaskWebhook",
    "Unauthorized",
    "UnexpectedResponse",
    "UnsupportedMediaType",
    "WaitTimeout",
    "WaybillError",
    "WebhookEvent",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]
