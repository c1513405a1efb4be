"""Fair dispatch: where a task waits, and how it reaches a worker.

SQL is the source of truth for every task; Redis holds the dispatch state,
which the sweep can rebuild from SQL at any time:

``waybill:waiting:{org}``   list of the organization's waiting task ids, oldest first
``waybill:known``           set of every task id in some waiting list
``waybill:ring``            list of organizations with waiting tasks, in serving order
``waybill:ring:members``    the same organizations, as a set
``waybill:leases``          zset task id -> lease expiry (ms) of every released task
``waybill:leases:{org}``    the same, per organization: its ZCARD is its running count
``waybill:lease:org``       hash task id -> organization
``waybill:climit``          hash organization -> concurrency limit
``waybill:epoch``           present while the state above is whole; gone = Redis lost it
``waybill:drain``           hash organization -> "rate:ms", its recent release rate (for Retry-After)

A *step* (one Lua script, atomic) first puts the tasks of expired leases back at
the front of their organization's waiting list, then takes organizations from
the ring in turn, skips those at their concurrency limit, pops one task of each
and leases it, until the Celery ``tasks`` queue holds ``queue_target``
messages. The caller publishes ``tasks.run`` for each released id. Order is
therefore decided here, not in a long Celery queue: a newcomer waits about one
turn of the ring, not behind another organization's backlog.

Every crash between steps is covered: a released task whose message was never
published (or was lost) comes back when its lease expires; the sweep checks every
queued task it has not confirmed yet (``dispatched_at IS NULL``) against
Redis and enqueues those that never entered it; and a Redis that lost
everything (no ``waybill:epoch``) is rebuilt from SQL.
The web side touches Celery only through :func:`dispatch_task`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import redis
from sqlalchemy import select, update

from app.db import Database
from app.models import Organization, Task, TaskStatus
from app.models.base import utcnow

log = logging.getLogger("waybill.dispatch")

P = "waybill:"
RING = P + "ring"
RING_MEMBERS = P + "ring:members"
KNOWN = P + "known"
LEASES = P + "leases"
LEASE_ORG = P + "lease:org"
CLIMIT = P + "climit"
EPOCH = P + "epoch"
DRAIN = P + "drain"
VERIFY_CURSOR = P + "verify:cursor"
DRAIN_TAU_SECONDS = 60.0  # time constant of the drain rate's exponential decay
CELERY_TASKS_QUEUE = "tasks"  # kombu's Redis transport keeps a queue in a list of its name


def waiting_key(org_id: str) -> str:
    return f"{P}waiting:{org_id}"


def leases_key(org_id: str) -> str:
    return f"{P}leases:{org_id}"


class Publisher(Protocol):
    def run_task(self, task_id: str) -> None: ...

    def deliver_webhook(self, delivery_id: str, countdown: float | None = None) -> None: ...

    def revoke(self, task_id: str) -> None: ...


# KEYS: waiting, known, org leases, ring, ring members, climit
# ARGV: org, task, concurrency limit, "1" to put it at the front
_ENQUEUE = """
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then return 0 end
if redis.call('ZSCORE', KEYS[3], ARGV[2]) then return 0 end
if ARGV[4] == '1' then
  redis.call('LPUSH', KEYS[1], ARGV[2])
else
  redis.call('RPUSH', KEYS[1], ARGV[2])
end
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[6], ARGV[1], ARGV[3])
if redis.call('SADD', KEYS[5], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[4], ARGV[1])
end
return 1
"""

# KEYS: ring, ring members, known, climit, leases, lease:org, celery tasks queue, drain
# ARGV: now ms, lease ms, queue target, max release, key prefix, drain time constant ms
_STEP = """
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local prefix = ARGV[5]
local tau = tonumber(ARGV[6])
-- The organization's drain rate (tasks released per second), exponentially
-- decayed: rate * exp(-dt / tau) + 1 / tau at every release.
local function drained(org)
  local rate = 0
  local v = redis.call('HGET', KEYS[8], org)
  if v then
    local sep = string.find(v, ':', 1, true)
    local dt = math.max(0, now - tonumber(string.sub(v, sep + 1)))
    rate = tonumber(string.sub(v, 1, sep - 1)) * math.exp(-dt / tau)
  end
  redis.call('HSET', KEYS[8], org, string.format('%.9g:%d', rate + 1000 / tau, now))
end
local function requeue(org, task)
  redis.call('LPUSH', prefix .. 'waiting:' .. org, task)
  redis.call('SADD', KEYS[3], task)
  if redis.call('SADD', KEYS[2], org) == 1 then
    redis.call('RPUSH', KEYS[1], org)
  end
end
-- Leases that expired: their worker died or their message was lost.
local expired = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 1000)
for i = #expired, 1, -1 do
  local task = expired[i]
  local org = redis.call('HGET', KEYS[6], task)
  redis.call('ZREM', KEYS[5], task)
  redis.call('HDEL', KEYS[6], task)
  if org then
    redis.call('ZREM', prefix .. 'leases:' .. org, task)
    requeue(org, task)
  end
end
local room = tonumber(ARGV[3]) - redis.call('LLEN', KEYS[7])
local maxr = tonumber(ARGV[4])
local released = {}
local n = redis.call('LLEN', KEYS[1])
local idle = 0
while room > 0 and #released < maxr and n > 0 and idle < n do
  local org = redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
  local wk = prefix .. 'waiting:' .. org
  local lk = prefix .. 'leases:' .. org
  local limit = tonumber(redis.call('HGET', KEYS[4], org) or '1')
  local got = false
  if redis.call('ZCARD', lk) < limit then
    local task = redis.call('LPOP', wk)
    if task then
      redis.call('SREM', KEYS[3], task)
      redis.call('ZADD', lk, now + lease, task)
      redis.call('ZADD', KEYS[5], now + lease, task)
      redis.call('HSET', KEYS[6], task, org)
      released[#released + 1] = task
      drained(org)
      room = room - 1
      got = true
    end
  end
  if redis.call('LLEN', wk) == 0 then
    redis.call('LREM', KEYS[1], -1, org)
    redis.call('SREM', KEYS[2], org)
    n = n - 1
  end
  if got then idle = 0 else idle = idle + 1 end
end
return released
"""

# KEYS: leases, lease:org; ARGV: task, expiry ms. Only extends a lease that exists.
_RENEW = """
local org = redis.call('HGET', KEYS[2], ARGV[1])
if not org then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
redis.call('ZADD', ARGV[3] .. 'leases:' .. org, 'XX', ARGV[2], ARGV[1])
return 1
"""

# KEYS: leases, lease:org, known; ARGV: task, prefix, org (for a waiting task)
_RELEASE = """
local org = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if org then redis.call('ZREM', ARGV[2] .. 'leases:' .. org, ARGV[1]) end
if redis.call('SREM', KEYS[3], ARGV[1]) == 1 and ARGV[3] ~= '' then
  redis.call('LREM', ARGV[2] .. 'waiting:' .. ARGV[3], 1, ARGV[1])
end
return 1
"""


@dataclass(frozen=True)
class DispatchSettings:
    queue_target: int = 8  # Celery `tasks` messages kept ready for the workers
    release_lease_seconds: float = 300.0  # a released task's lease until a worker claims it
    max_release: int = 100


class Dispatcher:
    """The Redis side of dispatch; every decision is one atomic script."""

    def __init__(self, client: redis.Redis, settings: DispatchSettings | None = None) -> None:
        self.redis = client
        self.settings = settings or DispatchSettings()
        self._enqueue = client.register_script(_ENQUEUE)
        self._step = client.register_script(_STEP)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def enqueue(
        self,
        org_id: str,
        task_id: str,
        concurrency_limit: int,
        *,
        front: bool = False,
        client: Any = None,
    ) -> bool:
        """Append a task to its organization's waiting list (no-op if it waits or is leased).

        With ``client`` a pipeline, the call is queued and its result comes from ``execute``.
        """
        keys = [waiting_key(org_id), KNOWN, leases_key(org_id), RING, RING_MEMBERS, CLIMIT]
        args: list[str | int] = [org_id, task_id, concurrency_limit, "1" if front else "0"]
        return bool(self._enqueue(keys=keys, args=args, client=client))

    def enqueue_and_step(self, org_id: str, task_id: str, concurrency_limit: int) -> list[str]:
        """A submission's dispatch in one round trip: :meth:`enqueue`, then :meth:`step`."""
        keys = [waiting_key(org_id), KNOWN, leases_key(org_id), RING, RING_MEMBERS, CLIMIT]
        return self._pipelined(
            lambda pipe: pipe.evalsha(
                self._enqueue.sha, len(keys), *keys, org_id, task_id, concurrency_limit, "0"
            )
        )

    def finish_and_step(self, task_id: str, *, notify: tuple[str, str] | None = None) -> list[str]:
        """A run's end in one round trip: free its slot, publish ``notify`` (channel, message), step."""
        keys = [LEASES, LEASE_ORG, KNOWN]

        def before(pipe: Any) -> None:
            pipe.evalsha(self._release.sha, len(keys), *keys, task_id, P, "")
            if notify is not None:
                pipe.publish(*notify)

        return self._pipelined(before)

    def _pipelined(self, before: Any) -> list[str]:
        """Run ``before(pipe)``'s commands, then a step, in one pipeline; returns the step's ids.

        EVALSHA directly rather than Script objects: redis-py's pipeline
        sends SCRIPT EXISTS first on every execute when it holds scripts.
        A pipeline goes on past a failed command, so when Redis does not
        know a script (restarted, or never asked for it yet) the step may
        have released tasks anyway: their ids are kept, the scripts are
        loaded and the whole pipeline runs again (enqueue, release and
        publish are idempotent; a second step releases only what has room).
        """
        released: list[str] = []
        for attempt in (1, 2):
            step_keys, step_args = self._step_call(None)
            pipe = self.redis.pipeline(transaction=False)
            before(pipe)
            pipe.evalsha(self._step.sha, len(step_keys), *step_keys, *step_args)
            results = pipe.execute(raise_on_error=False)
            if not isinstance(results[-1], Exception):
                released.extend(_ids(results[-1]))
            errors = [r for r in results if isinstance(r, Exception)]
            if not errors:
                break
            if attempt == 1 and all(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
                for script in (_ENQUEUE, _RELEASE, _STEP):
                    self.redis.script_load(script)
                continue
            if not released:
                raise errors[0]
            # The tasks released must still be published: the caller does it;
            # what failed before the step is covered by lease expiry and the sweep.
            log.warning(
                "dispatch pipeline partly failed",
                extra={"event": "dispatch.failed", "error": repr(errors[0])},
            )
            break
        return released

    def step(self, now: float | None = None) -> list[str]:
        """Release tasks in fair order while the Celery queue has room; returns their ids."""
        keys, args = self._step_call(now)
        return _ids(self._step(keys=keys, args=args))

    def _step_call(self, now: float | None) -> tuple[list[str], list[str | int]]:
        now_ms = int((now if now is not None else time.time()) * 1000)
        keys = [RING, RING_MEMBERS, KNOWN, CLIMIT, LEASES, LEASE_ORG, CELERY_TASKS_QUEUE, DRAIN]
        args: list[str | int] = [
            now_ms,
            int(self.settings.release_lease_seconds * 1000),
            self.settings.queue_target,
            self.settings.max_release,
            P,
            int(DRAIN_TAU_SECONDS * 1000),
        ]
        return keys, args

    def renew(self, task_id: str, lease_seconds: float) -> bool:
        expiry = int((time.time() + lease_seconds) * 1000)
        return bool(self._renew(keys=[LEASES, LEASE_ORG], args=[task_id, expiry, P]))

    def release(self, task_id: str, org_id: str = "", *, client: Any = None) -> None:
        """Forget a task: free its slot, or take it out of its waiting list."""
        self._release(keys=[LEASES, LEASE_ORG, KNOWN], args=[task_id, P, org_id], client=client)

    def drain_rate(self, org_id: str, now: float | None = None) -> float:
        """The organization's recent rate of tasks leaving its waiting list, per second."""
        value = self.redis.hget(DRAIN, org_id)
        if not value:
            return 0.0
        rate, _, at_ms = (value.decode() if isinstance(value, bytes) else str(value)).partition(":")
        now_ms = (now if now is not None else time.time()) * 1000
        return float(rate) * math.exp(-max(0.0, now_ms - float(at_ms)) / (DRAIN_TAU_SECONDS * 1000))

    def set_concurrency_limit(self, org_id: str, limit: int) -> None:
        self.redis.hset(CLIMIT, org_id, limit)

    def running(self, org_id: str) -> int:
        return int(self.redis.zcard(leases_key(org_id)))

    def missing(self, task_ids: list[str]) -> list[str]:
        """The ids that are neither waiting nor leased: dispatch does not know them."""
        if not task_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        pipe.smismember(KNOWN, task_ids)
        pipe.zmscore(LEASES, task_ids)
        waiting, leased = pipe.execute()
        return [t for t, w, score in zip(task_ids, waiting, leased, strict=True) if not w and score is None]

    def verify_cursor(self) -> str:
        value = self.redis.get(VERIFY_CURSOR)
        return value.decode() if isinstance(value, bytes) else (value or "")

    def set_verify_cursor(self, task_id: str) -> None:
        self.redis.set(VERIFY_CURSOR, task_id)

    def eviction_warning(self) -> str | None:
        """A warning when Redis's ``maxmemory-policy`` may evict keys (dispatch state among them)."""
        try:
            policy = str(self.redis.config_get("maxmemory-policy").get("maxmemory-policy", ""))
        except redis.RedisError:  # CONFIG may be disabled on a managed Redis: nothing to say
            return None
        if policy in ("", "noeviction"):
            return None
        return (
            f"warning: maxmemory-policy is {policy}; Redis may evict dispatch state, which the "
            "sweep then rebuilds late (set maxmemory-policy noeviction; docs/operations.rst)"
        )

    def has_epoch(self) -> bool:
        return bool(self.redis.exists(EPOCH))

    def mark_epoch(self) -> None:
        self.redis.set(EPOCH, str(time.time()))


def _ids(raw: Any) -> list[str]:
    if not isinstance(raw, list):  # a pipeline's queued call
        return []
    return [t.decode() if isinstance(t, bytes) else str(t) for t in raw]


def publish_released(publisher: Publisher, task_ids: Iterable[str]) -> int:
    """Publish ``tasks.run`` for released tasks; a failed publish comes back at lease expiry."""
    sent = 0
    for task_id in task_ids:
        try:
            publisher.run_task(task_id)
            sent += 1
        except Exception as exc:
            log.warning(
                "publish failed; the task is released again when its lease expires",
                extra={"event": "task.publish_failed", "task_id": task_id, "error": type(exc).__name__},
            )
    return sent


def dispatch_step(dispatcher: Dispatcher, publisher: Publisher) -> int:
    """One step and its publishes; errors are logged (beat runs another step in a second)."""
    try:
        released = dispatcher.step()
    except redis.RedisError as exc:
        log.warning("dispatch step failed", extra={"event": "dispatch.failed", "error": type(exc).__name__})
        return 0
    return publish_released(publisher, released)


def dispatch_task(
    dispatcher: Dispatcher,
    publisher: Publisher,
    task_id: str,
    org_id: str,
    concurrency_limit: int,
) -> bool:
    """Hand a committed task to dispatch; False leaves it to the sweep.

    Nothing is written to SQL here: the sweep confirms every queued task
    whose ``dispatched_at`` is empty against Redis later, in batches, and
    enqueues the ones Redis does not hold (see :func:`enqueue_from_sql`).
    A submission therefore costs one SQL transaction, not two.
    """
    try:
        released = dispatcher.enqueue_and_step(org_id, task_id, concurrency_limit)
    except redis.RedisError as exc:
        log.warning(
            "enqueue failed; the sweep will enqueue the task",
            extra={"event": "task.enqueue_failed", "task_id": task_id, "error": type(exc).__name__},
        )
        return False
    publish_released(publisher, released)
    return True


def dispatch_delivery(publisher: Publisher, delivery_id: str | None, countdown: float | None = None) -> bool:
    """Publish one webhook attempt; a failure is left to the sweep (next_attempt_at is in SQL)."""
    if delivery_id is None:
        return False
    try:
        publisher.deliver_webhook(delivery_id, countdown)
    except Exception as exc:
        log.warning(
            "publish failed; the sweep will send the webhook",
            extra={"event": "webhook.publish_failed", "webhook_id": delivery_id, "error": type(exc).__name__},
        )
        return False
    return True


def enqueue_from_sql(
    db: Database,
    dispatcher: Dispatcher,
    task_ids: Iterable[str],
    *,
    drop_leases: bool = False,
    status: TaskStatus | None = None,
) -> int:
    """Make sure tasks SQL says are waiting (or whose run died) are in dispatch; returns the missing ones.

    A task Redis already holds, waiting or leased, is left where it is (the
    enqueue script skips it); a missing one goes to the front of its
    organization's list. Every task given gets ``dispatched_at``: the sweep
    has confirmed it and does not look at it again.
    ``drop_leases``: the tasks' runs are known dead (their SQL lease expired),
    so a dispatch lease Redis may still hold for them is stale and is dropped.
    ``status``: only the tasks still in this status (one read, under the check).
    """
    ids = list(task_ids)
    if not ids:
        return 0
    with db.session() as session:
        rows = session.execute(
            select(Task.id, Task.organization_id, Organization.concurrency_limit)
            .join(Organization, Organization.id == Task.organization_id)
            .where(Task.id.in_(ids), *([Task.status == status.value] if status is not None else []))
            .order_by(Task.id.desc())  # LPUSH one by one: the oldest ends up first
        ).all()
    if not rows:
        return 0
    pipe = dispatcher.redis.pipeline(transaction=False)
    for task_id, org_id, limit in rows:
        if drop_leases:
            dispatcher.release(task_id, client=pipe)
        dispatcher.enqueue(org_id, task_id, limit, front=True, client=pipe)
    results = pipe.execute()
    added = sum(1 for r in (results[1::2] if drop_leases else results) if r)
    with db.session() as session:
        session.execute(
            update(Task)
            .where(Task.id.in_([r[0] for r in rows]), Task.dispatched_at.is_(None))
            .values(dispatched_at=utcnow())
        )
    return added


def verify_queued(
    db: Database,
    dispatcher: Dispatcher,
    *,
    grace_seconds: float,
    batches: int = 10,
    batch: int = 2000,
    now: datetime | None = None,
) -> tuple[int, int]:
    """Check queued tasks against Redis, whatever their ``dispatched_at``; returns (checked, restored).

    Redis may come back from an older snapshot (a restart from RDB or AOF,
    a failover to a lagging replica) or evict keys: its epoch is there, the
    sweep's confirmation flag says the task was handed over, and still
    Redis does not know the task. This walk finds every such task: queued
    tasks in id order (the ``(status, id)`` index) from a cursor kept in
    Redis, at most ``batches * batch`` per call, one Redis round trip per
    batch; at the end of the table it starts over. Each sweep (every 5 s)
    checks 20,000: a backlog of 240,000 queued tasks is walked in a minute.
    Tasks younger than the grace period are left to their submission.
    """
    grace = (now or utcnow()) - timedelta(seconds=grace_seconds)
    cursor = dispatcher.verify_cursor()
    checked = restored = 0
    for _ in range(batches):
        with db.read_session() as session:
            ids = list(
                session.execute(
                    select(Task.id)
                    .where(Task.status == TaskStatus.QUEUED.value, Task.id > cursor, Task.created_at < grace)
                    .order_by(Task.id)
                    .limit(batch)
                ).scalars()
            )
        checked += len(ids)
        missing = dispatcher.missing(ids)
        if missing:
            restored += enqueue_from_sql(db, dispatcher, missing, status=TaskStatus.QUEUED)
        if len(ids) < batch:
            cursor = ""  # the end of the table: the next walk starts over
            break
        cursor = ids[-1]
    dispatcher.set_verify_cursor(cursor)
    return checked, restored


def rebuild(db: Database, dispatcher: Dispatcher, *, batch: int = 5000) -> int:
    """Rebuild the dispatch state from SQL after Redis lost it; returns the tasks enqueued."""
    count = 0
    last = ""
    while True:
        with db.session() as session:
            rows: list[Any] = list(
                session.execute(
                    select(Task.id, Task.organization_id, Organization.concurrency_limit)
                    .join(Organization, Organization.id == Task.organization_id)
                    .where(
                        Task.status.in_([TaskStatus.QUEUED.value, TaskStatus.RUNNING.value]), Task.id > last
                    )
                    .order_by(Task.id)
                    .limit(batch)
                ).all()
            )
        if not rows:
            break
        # One round trip per batch: 100,000 waiting tasks must not hold the
        # maintenance queue for 100,000 round trips.
        pipe = dispatcher.redis.pipeline(transaction=False)
        for task_id, org_id, limit in rows:
            dispatcher.enqueue(org_id, task_id, limit, client=pipe)
        count += sum(1 for added in pipe.execute() if added)
        last = rows[-1][0]
    dispatcher.mark_epoch()
    return count
