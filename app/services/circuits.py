"""A circuit per receiving host: stop spending webhook workers on a host that is down.

A host (``host:port`` of the URL, see :func:`host_of`) whose attempts keep
failing at the transport level -- connection refused or reset, or no answer
within ``WEBHOOK_TIMEOUT_SECONDS`` -- opens its circuit after
``WEBHOOK_CIRCUIT_FAILURES`` such failures in a row. Any HTTP answer, 4xx and
5xx included, means the host is up and closes it: those are the receiver's
answers, retried by the delivery's own schedule, not a reason to stop sending.

While a circuit is open its deliveries are *deferred*, not attempted: they
stay ``pending`` with their attempt count, wait in the host's set here, and
their ``next_attempt_at`` moves to the circuit's next probe time (so the
sweep leaves them alone). After a cool-down (``WEBHOOK_CIRCUIT_COOLDOWN_SECONDS``,
doubling after each failed probe up to ``WEBHOOK_CIRCUIT_MAX_COOLDOWN_SECONDS``)
one attempt at a time -- whoever takes the probe lock -- tests the host. A
probe that gets an HTTP answer closes the circuit and the waiting deliveries
are published at once; one that fails opens it again for longer.

Every transition is one Lua script on the dispatch Redis, so any number of
workers share one circuit per host. Redis away: no circuit, attempts go out
as they did before circuits existed. All keys carry the ``{waybill}`` hash
tag (one Redis Cluster slot, as dispatch's).

``{waybill}:wh:circuit:{host}``   hash: state (open|half_open), failures, opened_at,
                                  next_probe_at (ms), cooldown (s); absent = closed
``{waybill}:wh:probe:{host}``     the probe lock (a token, with the attempt's hold as expiry)
``{waybill}:wh:cwait:{host}``     zset delivery id -> when it was told to come back (ms)
``{waybill}:wh:circuits``         set of hosts with a circuit state or waiting deliveries
``{waybill}:wh:held``             hash delivery id -> why Redis holds it (shared with
                                  :mod:`app.services.delivery_slots`; the sweep skips these)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from app.dispatch.keys import PREFIX
from app.services.representation import iso

CIRCUITS = PREFIX + "wh:circuits"
HELD = PREFIX + "wh:held"
HELD_BY_CIRCUIT = "c"  # the value of a delivery's HELD entry while it waits for its host's circuit
MAX_HOSTS = 200  # circuits a snapshot or a sweep looks at
RELEASE_BATCH = 500  # waiting deliveries handed back per close

# Transport failures that say the host is not there (not answering at all).
HOST_DOWN_OUTCOMES = frozenset({"timeout", "connection_refused", "connection_error"})


def circuit_key(host: str) -> str:
    return f"{PREFIX}wh:circuit:{host}"


def probe_key(host: str) -> str:
    return f"{PREFIX}wh:probe:{host}"


def waiting_key(host: str) -> str:
    return f"{PREFIX}wh:cwait:{host}"


def host_of(url: str) -> str:
    """``host:port`` of a webhook URL (lower-cased, default port filled in); "" when unparsable.

    With the port: two receivers on one machine are two services, and one
    of them hanging says nothing about the other.
    """
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return ""
    return f"{host}:{port}" if host else ""


def _iso_ms(ms: Any) -> str | None:
    if ms in (None, b"", ""):
        return None
    return iso(datetime.fromtimestamp(int(float(ms)) / 1000, tz=UTC))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def snapshot(redis: Any) -> list[dict[str, Any]]:
    """Every open or half-open circuit, for operators (the console, /metrics).

    Each: ``{"host": "hooks.example:443", "state": "open" | "half_open",
    "consecutive_failures": 7, "opened_at": ISO, "next_probe_at": ISO}``
    (ISO 8601 UTC strings as the API writes them), ordered by host. A
    half-open circuit has a probe in flight. At most :data:`MAX_HOSTS`.
    """
    hosts = sorted(_text(h) for h in redis.smembers(CIRCUITS))[:MAX_HOSTS]
    if not hosts:
        return []
    pipe = redis.pipeline(transaction=False)
    for host in hosts:
        pipe.hgetall(circuit_key(host))
    out: list[dict[str, Any]] = []
    for host, raw in zip(hosts, pipe.execute(), strict=True):
        fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
        state = fields.get("state")
        if state not in ("open", "half_open"):
            continue
        out.append(
            {
                "host": host,
                "state": state,
                "consecutive_failures": int(fields.get("failures") or 0),
                "opened_at": _iso_ms(fields.get("opened_at")),
                "next_probe_at": _iso_ms(fields.get("next_probe_at")),
            }
        )
    return out


@dataclass(frozen=True)
class CircuitSettings:
    failures: int = 5  # consecutive host-down failures that open a circuit; 0: no circuits
    cooldown_seconds: float = 30.0
    max_cooldown_seconds: float = 300.0
    probe_hold_seconds: float = 40.0  # the probe lock's expiry: a dead prober's probe comes back


# KEYS[1] circuit hash, KEYS[2] probe lock, KEYS[3] waiting zset, KEYS[4] hosts set, KEYS[5] held
# ARGV: host, delivery id, now ms, probe hold ms, probe token, enlist (1|0)
# -> {"closed", 0} | {"probe", 0} | {"wait", until ms} (enlisted: the delivery then waits in KEYS[3])
_GATE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'closed', 0} end
local now = tonumber(ARGV[3])
local due = tonumber(redis.call('HGET', KEYS[1], 'next_probe_at') or '0')
local until_ms = due
if now >= due then
  if redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[4]) then
    redis.call('HSET', KEYS[1], 'state', 'half_open')
    return {'probe', 0}
  end
  local left = redis.call('PTTL', KEYS[2])
  if left < 0 then left = 1000 end
  until_ms = now + left
end
if ARGV[6] ~= '1' then return {'wait', until_ms} end
redis.call('ZADD', KEYS[3], until_ms, ARGV[2])
redis.call('HSET', KEYS[5], ARGV[2], 'c')
redis.call('SADD', KEYS[4], ARGV[1])
return {'wait', until_ms}
"""

# KEYS[1] circuit hash, KEYS[2] probe lock, KEYS[3] hosts set
# ARGV: host, now ms, kind (up|down), probe (1|0), threshold, cooldown s, max cooldown s, probe token
# -> "closed" (it was open or counting and now is not), "opened", "open", "counting", "none"
_RECORD = """
local now = tonumber(ARGV[2])
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[3] == 'up' then
  if ARGV[4] == '1' and redis.call('GET', KEYS[2]) == ARGV[8] then redis.call('DEL', KEYS[2]) end
  if redis.call('DEL', KEYS[1]) == 1 then
    if state then return 'closed' end
    return 'counting'
  end
  return 'none'
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local base = tonumber(ARGV[6])
local cap = tonumber(ARGV[7])
if ARGV[4] == '1' then
  -- a failed probe: open again, for twice as long
  local cooldown = math.min(cap, tonumber(redis.call('HGET', KEYS[1], 'cooldown') or base) * 2)
  redis.call('HSET', KEYS[1], 'state', 'open', 'cooldown', cooldown, 'next_probe_at', now + cooldown * 1000)
  if not redis.call('HGET', KEYS[1], 'opened_at') then redis.call('HSET', KEYS[1], 'opened_at', now) end
  if redis.call('GET', KEYS[2]) == ARGV[8] then redis.call('DEL', KEYS[2]) end
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.floor((cooldown + cap) * 2000))
  return 'opened'
end
if state then return 'open' end  -- an attempt that was in flight when the circuit opened
if failures >= tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'cooldown', base,
             'next_probe_at', now + base * 1000)
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.floor((base + cap) * 2000))
  return 'opened'
end
-- counting: a host that fails now and then forgets its failures after an hour
redis.call('PEXPIRE', KEYS[1], 3600000)
return 'counting'
"""

# KEYS[1] waiting zset, KEYS[2] held, KEYS[3] hosts set, KEYS[4] circuit hash
# ARGV: host, how many
# -> the ids taken out of the waiting set (their HELD entries dropped)
_RELEASE = """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  if redis.call('HGET', KEYS[2], id) == 'c' then redis.call('HDEL', KEYS[2], id) end
end
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
end
return ids
"""

# KEYS[1] circuit hash, KEYS[2] probe lock, KEYS[3] waiting zset, KEYS[4] held
# ARGV: now ms
# -> "release" (no circuit any more: hand every waiting delivery back), "probe" (one waiting
#    delivery is taken out to be the probe: returned as the 2nd value), or "wait"
_DUE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'release', ''} end
local due = tonumber(redis.call('HGET', KEYS[1], 'next_probe_at') or '0')
if tonumber(ARGV[1]) < due or redis.call('EXISTS', KEYS[2]) == 1 then return {'wait', ''} end
local first = redis.call('ZRANGE', KEYS[3], 0, 0)
if #first == 0 then return {'wait', ''} end
redis.call('ZREM', KEYS[3], first[1])
if redis.call('HGET', KEYS[4], first[1]) == 'c' then redis.call('HDEL', KEYS[4], first[1]) end
return {'probe', first[1]}
"""


@dataclass(frozen=True)
class Verdict:
    action: str  # closed | probe | wait
    until_ms: int = 0  # wait: when the delivery may try again (the next probe, or the probe's end)


class Circuits:
    """The circuit verbs on one Redis client; every one raises ``redis.RedisError`` when Redis is away."""

    def __init__(self, redis: Any, settings: CircuitSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._gate = redis.register_script(_GATE)
        self._record = redis.register_script(_RECORD)
        self._release = redis.register_script(_RELEASE)
        self._due = redis.register_script(_DUE)

    @property
    def enabled(self) -> bool:
        return self.settings.failures > 0

    def gate(
        self, host: str, delivery_id: str, token: str, *, enlist: bool = True, now_ms: int | None = None
    ) -> Verdict:
        """May an attempt to ``host`` go out: yes (closed), yes as the probe, or wait.

        ``enlist``: a delivery told to wait joins the host's waiting set
        (held by Redis). Without it, nothing is recorded: the caller, which
        still holds the attempt's claim, gives the claim back first and asks
        again, so that a closing circuit never hands on a delivery whose claim
        is not yet given back.
        """
        now_ms = _now_ms() if now_ms is None else now_ms
        action, until = self._gate(
            keys=[circuit_key(host), probe_key(host), waiting_key(host), CIRCUITS, HELD],
            args=[
                host,
                delivery_id,
                now_ms,
                int(self.settings.probe_hold_seconds * 1000),
                token,
                1 if enlist else 0,
            ],
        )
        return Verdict(_text(action), int(until))

    def record(self, host: str, outcome: str, response_status: int | None, *, probe: bool, token: str) -> str:
        """Count an attempt's outcome against its host; returns the transition (``closed``, ``opened``...).

        An HTTP answer (any status) is "up"; :data:`HOST_DOWN_OUTCOMES` are
        "down"; anything else (an SSRF refusal, a TLS error, an internal error)
        says nothing about the host, except that a probe which got no answer
        failed.
        """
        if response_status is not None:
            kind = "up"
        elif outcome in HOST_DOWN_OUTCOMES or probe:
            kind = "down"
        else:
            return "none"
        s = self.settings
        return _text(
            self._record(
                keys=[circuit_key(host), probe_key(host), CIRCUITS],
                args=[
                    host,
                    _now_ms(),
                    kind,
                    1 if probe else 0,
                    s.failures,
                    s.cooldown_seconds,
                    s.max_cooldown_seconds,
                    token,
                ],
            )
        )

    def abandon_probe(self, host: str, token: str) -> None:
        """Give the probe lock back unused (the attempt could not take a slot): another may probe."""
        key = probe_key(host)
        if _text(self.redis.get(key) or b"") == token:
            self.redis.delete(key)

    def release(self, host: str) -> list[str]:
        """Take the deliveries waiting for ``host`` out of its set (a batch): the circuit closed."""
        ids = self._release(
            keys=[waiting_key(host), HELD, CIRCUITS, circuit_key(host)], args=[host, RELEASE_BATCH]
        )
        return [_text(i) for i in ids]

    def due(self, now_ms: int | None = None) -> list[str]:
        """What beat's sweep hands on: a probe per circuit due, every delivery of a closed one.

        A circuit whose last deliveries were all deferred has nobody left to
        probe it; this takes one waiting delivery out to be published as the
        probe. A circuit gone (closed, or expired) releases what still waits.
        """
        now_ms = _now_ms() if now_ms is None else now_ms
        out: list[str] = []
        hosts = sorted(_text(h) for h in self.redis.smembers(CIRCUITS))[:MAX_HOSTS]
        for host in hosts:
            action, delivery_id = self._due(
                keys=[circuit_key(host), probe_key(host), waiting_key(host), HELD], args=[now_ms]
            )
            action = _text(action)
            if action == "release":
                out.extend(self.release(host))
            elif action == "probe":
                out.append(_text(delivery_id))
        return out


def _now_ms() -> int:
    return int(time.time() * 1000)
