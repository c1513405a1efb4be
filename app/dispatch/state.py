"""The Redis side of fair dispatch: every decision is one atomic Lua script.

The scripts are in ``scripts/*.lua``, each headed by its KEYS and ARGV; the
keys are in :mod:`app.dispatch.keys`. SQL is the source of truth for every
task; this state can be rebuilt from SQL at any time
(:mod:`app.usecases.recovery`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from app.dispatch import keys

log = logging.getLogger("waybill.dispatch")

DRAIN_TAU_SECONDS = 60.0  # time constant of the drain rate's exponential decay


def _script(name: str) -> str:
    return files("app.dispatch").joinpath("scripts", f"{name}.lua").read_text(encoding="utf-8")


ENQUEUE, STEP, RENEW, RELEASE = (_script(n) for n in ("enqueue", "step", "renew", "release"))


def _evalsha(pipe: Any, sha: str, script_keys: list[str], args: list[str | int]) -> None:
    """Queue a script in a pipeline as a plain EVALSHA.

    Not ``pipe.evalsha`` nor a Script object: redis-py's Redis Cluster
    pipeline refuses both (its ``evalsha`` and ``publish`` methods are
    blocked), while ``execute_command`` routes EVALSHA by its keys, which
    share one slot. On one server it is the same command.
    """
    pipe.execute_command("EVALSHA", sha, len(script_keys), *script_keys, *args)


@dataclass(frozen=True)
class DispatchSettings:
    queue_target: int = 8  # tasks released and not yet started, kept ready for the workers
    release_lease_seconds: float = 300.0  # a released task's lease until a worker claims it
    max_release: int = 100


class Dispatcher:
    """Where a task waits, and which task goes next; see ``docs/dispatch.rst``."""

    def __init__(self, client: redis.Redis | RedisCluster, settings: DispatchSettings | None = None) -> None:
        self.redis = client
        self.settings = settings or DispatchSettings()
        self._enqueue = client.register_script(ENQUEUE)
        self._step = client.register_script(STEP)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)

    @staticmethod
    def _enqueue_keys(org_id: str) -> list[str]:
        return [
            keys.waiting_key(org_id),
            keys.KNOWN,
            keys.leases_key(org_id),
            keys.RING,
            keys.RING_MEMBERS,
            keys.CLIMIT,
        ]

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

        With ``client`` a pipeline, the call is queued and its result comes from
        ``execute``; run such a pipeline with :meth:`batch`, which loads the
        scripts when Redis does not know them.
        """
        args: list[str | int] = [org_id, task_id, concurrency_limit, "1" if front else "0"]
        if client is not None:
            _evalsha(client, self._enqueue.sha, self._enqueue_keys(org_id), args)
            return True  # queued
        return bool(self._enqueue(keys=self._enqueue_keys(org_id), args=args))

    def enqueue_and_step(self, org_id: str, task_id: str, concurrency_limit: int) -> list[str]:
        """A submission's dispatch in one round trip: :meth:`enqueue`, then :meth:`step`."""
        enqueue_keys = self._enqueue_keys(org_id)
        return self._pipelined(
            lambda pipe: _evalsha(
                pipe, self._enqueue.sha, enqueue_keys, [org_id, task_id, concurrency_limit, "0"]
            )
        )

    def enqueue_many_and_step(self, org_id: str, task_ids: list[str], concurrency_limit: int) -> list[str]:
        """Tasks of one organization in one round trip: :meth:`enqueue` each, in order, then :meth:`step`."""
        enqueue_keys = self._enqueue_keys(org_id)

        def before(pipe: Any) -> None:
            for task_id in task_ids:
                _evalsha(pipe, self._enqueue.sha, enqueue_keys, [org_id, task_id, concurrency_limit, "0"])

        return self._pipelined(before)

    def finish_and_step(self, task_id: str, *, notify: tuple[str, str] | None = None) -> list[str]:
        """A run's end in one round trip: free its slot, publish ``notify`` (channel, message), step."""
        release_keys = [keys.LEASES, keys.LEASE_ORG, keys.KNOWN, keys.READY]

        def before(pipe: Any) -> None:
            _evalsha(pipe, self._release.sha, release_keys, [task_id, keys.PREFIX, ""])
            if notify is not None:
                # PUBLISH reaches a subscriber on any node of a Cluster.
                pipe.execute_command("PUBLISH", *notify)

        return self._pipelined(before)

    def _pipelined(self, before: Callable[[Any], None]) -> list[str]:
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
            _evalsha(pipe, self._step.sha, step_keys, step_args)
            results = pipe.execute(raise_on_error=False)
            if not isinstance(results[-1], Exception):
                released.extend(_ids(results[-1]))
            errors = [r for r in results if isinstance(r, Exception)]
            if not errors:
                break
            if attempt == 1 and all(isinstance(e, redis.exceptions.NoScriptError) for e in errors):
                self.load_scripts()
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

    def batch(self, build: Callable[[Any], None]) -> list[Any]:
        """Run ``build(pipe)``'s commands in one pipeline (one round trip, no transaction); their results.

        For the calls given ``client=pipe`` (:meth:`enqueue`, :meth:`release`):
        when Redis does not know a script (restarted, never asked for it yet,
        a Cluster node new to it) the scripts are loaded and the whole
        pipeline runs again, so what ``build`` queues must be idempotent
        (enqueue and release are). Each command's result is its first run's
        when that is truthy, else its second's: an enqueue skipped the first
        time (its release had failed) and done the second counts as done.
        Any other error is raised.
        """
        pipe = self.redis.pipeline(transaction=False)
        build(pipe)
        results = pipe.execute(raise_on_error=False)
        if any(_failed(r) for r in results) and all(
            isinstance(r, redis.exceptions.NoScriptError) for r in results if _failed(r)
        ):
            self.load_scripts()
            pipe = self.redis.pipeline(transaction=False)
            build(pipe)
            again = pipe.execute(raise_on_error=False)
            results = [r if r and not _failed(r) else again[i] for i, r in enumerate(results)]
        for result in results:
            if _failed(result):
                raise result
        return list(results)

    def load_scripts(self) -> None:
        """SCRIPT LOAD every script (on every master of a Cluster): what a pipeline's EVALSHA needs."""
        for script in (ENQUEUE, RELEASE, STEP, RENEW):
            self.redis.script_load(script)

    def step(self, now: float | None = None) -> list[str]:
        """Release tasks in fair order while fewer than the target wait for a worker; returns their ids."""
        step_keys, args = self._step_call(now)
        return _ids(self._step(keys=step_keys, args=args))

    def _step_call(self, now: float | None) -> tuple[list[str], list[str | int]]:
        now_ms = int((now if now is not None else time.time()) * 1000)
        step_keys = [
            keys.RING,
            keys.RING_MEMBERS,
            keys.KNOWN,
            keys.CLIMIT,
            keys.LEASES,
            keys.LEASE_ORG,
            keys.READY,
            keys.DRAIN,
        ]
        args: list[str | int] = [
            now_ms,
            int(self.settings.release_lease_seconds * 1000),
            self.settings.queue_target,
            self.settings.max_release,
            keys.PREFIX,
            int(DRAIN_TAU_SECONDS * 1000),
        ]
        return step_keys, args

    def renew(self, task_id: str, lease_seconds: float, *, notify: tuple[str, str] | None = None) -> bool:
        """Extend a task's lease (and count it as started); False when it holds none.

        ``notify`` (channel, message) is published in the same round trip.
        """
        expiry = int((time.time() + lease_seconds) * 1000)
        renew_keys = [keys.LEASES, keys.LEASE_ORG, keys.READY]
        args: list[str | int] = [task_id, expiry, keys.PREFIX]
        if notify is None:
            return bool(self._renew(keys=renew_keys, args=args))

        def build(pipe: Any) -> None:
            _evalsha(pipe, self._renew.sha, renew_keys, args)
            pipe.execute_command("PUBLISH", *notify)  # a second one after NOSCRIPT is harmless

        return bool(self.batch(build)[0])

    def give_back(self, task_id: str) -> None:
        """A released task whose run message could not be published: its lease ends now.

        The next step puts it back at the front of its organization's list
        and releases it again; until then it no longer takes the room of a
        task waiting for a worker.
        """
        self.renew(task_id, -1.0)

    def release(self, task_id: str, org_id: str = "", *, client: Any = None) -> None:
        """Forget a task: free its slot, or take it out of its waiting list.

        With ``client`` a pipeline, the call is queued (see :meth:`batch`).
        """
        release_keys = [keys.LEASES, keys.LEASE_ORG, keys.KNOWN, keys.READY]
        args: list[str | int] = [task_id, keys.PREFIX, org_id]
        if client is not None:
            _evalsha(client, self._release.sha, release_keys, args)
            return
        self._release(keys=release_keys, args=args)

    def drain_rate(self, org_id: str, now: float | None = None) -> float:
        """The organization's recent rate of tasks leaving its waiting list, per second."""
        value = self.redis.hget(keys.DRAIN, org_id)
        if not value:
            return 0.0
        rate, _, at_ms = (value.decode() if isinstance(value, bytes) else str(value)).partition(":")
        now_ms = (now if now is not None else time.time()) * 1000
        return float(rate) * math.exp(-max(0.0, now_ms - float(at_ms)) / (DRAIN_TAU_SECONDS * 1000))

    def set_concurrency_limit(self, org_id: str, limit: int) -> None:
        self.redis.hset(keys.CLIMIT, org_id, limit)

    def running(self, org_id: str) -> int:
        return int(self.redis.zcard(keys.leases_key(org_id)))

    def missing(self, task_ids: list[str]) -> list[str]:
        """The ids that are neither waiting nor leased: dispatch does not know them."""
        if not task_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        pipe.smismember(keys.KNOWN, task_ids)
        pipe.zmscore(keys.LEASES, task_ids)
        waiting, leased = pipe.execute()
        return [t for t, w, score in zip(task_ids, waiting, leased, strict=True) if not w and score is None]

    def verify_cursor(self) -> str:
        value = self.redis.get(keys.VERIFY_CURSOR)
        return value.decode() if isinstance(value, bytes) else (value or "")

    def set_verify_cursor(self, task_id: str) -> None:
        self.redis.set(keys.VERIFY_CURSOR, task_id)

    def eviction_warning(self) -> str | None:
        """A warning when Redis's ``maxmemory-policy`` may evict keys (dispatch state among them)."""
        try:
            if isinstance(self.redis, RedisCluster):
                # The node holding the dispatch slot, not whichever node
                # redis-py would ask by default.
                node = self.redis.get_node_from_key(keys.EPOCH)
                answer = self.redis.config_get("maxmemory-policy", target_nodes=node)
            else:
                answer = self.redis.config_get("maxmemory-policy")
            policy = str(answer.get("maxmemory-policy", ""))
        except (redis.RedisError, RedisClusterException):  # CONFIG may be disabled: nothing to say
            return None
        if policy in ("", "noeviction"):
            return None
        return (
            f"warning: maxmemory-policy is {policy}; Redis may evict dispatch state, which the "
            "sweep then rebuilds late (set maxmemory-policy noeviction; docs/operations.rst)"
        )

    def ping(self) -> bool:
        """PING the server that holds dispatch state (on a Cluster, that node, not any)."""
        if isinstance(self.redis, RedisCluster):
            return bool(self.redis.ping(target_nodes=self.redis.get_node_from_key(keys.EPOCH)))
        return bool(self.redis.ping())

    def has_epoch(self) -> bool:
        return bool(self.redis.exists(keys.EPOCH))

    def mark_epoch(self) -> None:
        self.redis.set(keys.EPOCH, str(time.time()))


def _failed(result: Any) -> bool:
    return isinstance(result, Exception)


def _ids(raw: Any) -> list[str]:
    if not isinstance(raw, list):  # a pipeline's queued call
        return []
    return [t.decode() if isinstance(t, bytes) else str(t) for t in raw]
