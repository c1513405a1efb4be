"""Bounded, fair webhook sending: slots per organization and per host, and a parking ring.

Before an attempt is sent its sender takes a slot of its organization
(``WEBHOOK_MAX_PER_ORGANIZATION``) and one of its receiving host
(``WEBHOOK_MAX_PER_HOST``, ``host:port``). A slot is a member of a sorted set
whose score is its expiry, as dispatch's leases are: a sender that dies
leaves a slot that frees itself after the attempt's hold (its timeout + 30 s).

An attempt that finds no slot is not sent and not counted: its delivery is
*parked* in its organization's list here, and the organization joins a ring.
Its Celery message ends, so a backlog of one organization leaves the
``webhooks`` queue at once instead of standing in front of everybody else's
messages. Each time a slot is given back, a release step walks the ring
round-robin -- one delivery per organization per turn, only where both its
organization and its host have room -- reserves the slots for what it takes
out (``r:<delivery id>``, converted by the sender that receives it) and the
caller publishes those deliveries again. The sweep runs the same step, for
slots that freed by expiry.

SQL stays the truth: a parked delivery is still ``pending`` and due; if Redis
loses this state the sweep publishes it from ``next_attempt_at`` as any
overdue attempt. While Redis holds it (``{waybill}:wh:held``) the sweep
leaves it to the ring instead.

``{waybill}:wh:oslots:{org}``   zset slot member -> expiry (ms): the organization's attempts in flight
``{waybill}:wh:hslots:{host}``  the same per receiving host
``{waybill}:wh:parked:{org}``   list of the organization's parked delivery ids, oldest first
``{waybill}:wh:ring``           list of organizations with parked deliveries, in serving order
``{waybill}:wh:ring:members``   the same, as a set
``{waybill}:wh:held``           hash delivery id -> "p|<org>|<host>" while parked (or "c": by a circuit)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.dispatch.keys import PREFIX
from app.services.circuits import HELD

RING = PREFIX + "wh:ring"
RING_MEMBERS = PREFIX + "wh:ring:members"


def org_slots_key(org_id: str) -> str:
    return f"{PREFIX}wh:oslots:{org_id}"


def host_slots_key(host: str) -> str:
    return f"{PREFIX}wh:hslots:{host}"


def parked_key(org_id: str) -> str:
    return f"{PREFIX}wh:parked:{org_id}"


@dataclass(frozen=True)
class SlotSettings:
    per_organization: int = 2  # 0: no bound
    per_host: int = 3  # 0: no bound
    lease_seconds: float = 40.0  # a slot's expiry: the attempt's hold (timeout + 30 s)


# Every key is derived from ARGV[1] (the {waybill} prefix): all share one Cluster slot.
# KEYS[1] held (routes the script)
# ARGV: prefix, org, host, delivery id, slot member, now ms, lease ms, org limit, host limit, park
# -> "ok" | "organization" | "host" (refused: with park=1 the delivery is parked)
_ACQUIRE = """
local p, org, host, id, member = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now, lease = tonumber(ARGV[6]), tonumber(ARGV[7])
local olimit, hlimit = tonumber(ARGV[8]), tonumber(ARGV[9])
local okey = p .. 'wh:oslots:' .. org
local hkey = p .. 'wh:hslots:' .. host
redis.call('ZREMRANGEBYSCORE', okey, '-inf', now)
if host ~= '' then redis.call('ZREMRANGEBYSCORE', hkey, '-inf', now) end
local reserved = redis.call('ZREM', okey, 'r:' .. id)
if host ~= '' and redis.call('ZREM', hkey, 'r:' .. id) == 1 then reserved = 1 end
local reason = 'ok'
if reserved == 0 then
  if olimit > 0 and redis.call('ZCARD', okey) >= olimit then
    reason = 'organization'
  elseif host ~= '' and hlimit > 0 and redis.call('ZCARD', hkey) >= hlimit then
    reason = 'host'
  end
end
if reason == 'ok' then
  redis.call('ZADD', okey, now + lease, member)
  redis.call('PEXPIRE', okey, lease * 2)
  if host ~= '' then
    redis.call('ZADD', hkey, now + lease, member)
    redis.call('PEXPIRE', hkey, lease * 2)
  end
  return 'ok'
end
if ARGV[10] ~= '1' then return reason end
if redis.call('HSETNX', KEYS[1], id, 'p|' .. org .. '|' .. host) == 1 then
  redis.call('RPUSH', p .. 'wh:parked:' .. org, id)
  if redis.call('SADD', p .. 'wh:ring:members', org) == 1 then
    redis.call('RPUSH', p .. 'wh:ring', org)
  end
end
return reason
"""

# KEYS[1] held
# ARGV: prefix, org, host, slot member ('' for none), now ms, lease ms, org limit, host limit, max out
# -> the parked delivery ids taken out (their slots reserved), one per organization per turn
_RELEASE = """
local p = ARGV[1]
local now, lease = tonumber(ARGV[5]), tonumber(ARGV[6])
local olimit, hlimit, max_out = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
if ARGV[4] ~= '' then
  redis.call('ZREM', p .. 'wh:oslots:' .. ARGV[2], ARGV[4])
  if ARGV[3] ~= '' then redis.call('ZREM', p .. 'wh:hslots:' .. ARGV[3], ARGV[4]) end
end
local ring, members = p .. 'wh:ring', p .. 'wh:ring:members'
local out = {}
local turns = redis.call('LLEN', ring)
for _ = 1, turns do
  if #out >= max_out then break end
  local org = redis.call('LPOP', ring)
  if not org then break end
  local okey, plist = p .. 'wh:oslots:' .. org, p .. 'wh:parked:' .. org
  redis.call('ZREMRANGEBYSCORE', okey, '-inf', now)
  if olimit <= 0 or redis.call('ZCARD', okey) < olimit then
    local id = redis.call('LPOP', plist)
    if id then
      local why = redis.call('HGET', KEYS[1], id)
      if why and string.sub(why, 1, 2) == 'p|' then
        local host = string.match(why, '^p|[^|]*|(.*)$') or ''
        local hkey = p .. 'wh:hslots:' .. host
        if host ~= '' then redis.call('ZREMRANGEBYSCORE', hkey, '-inf', now) end
        if host ~= '' and hlimit > 0 and redis.call('ZCARD', hkey) >= hlimit then
          redis.call('RPUSH', plist, id)  -- its host is full: the organization's next one, next turn
        else
          redis.call('HDEL', KEYS[1], id)
          redis.call('ZADD', okey, now + lease, 'r:' .. id)
          redis.call('PEXPIRE', okey, lease * 2)
          if host ~= '' then
            redis.call('ZADD', hkey, now + lease, 'r:' .. id)
            redis.call('PEXPIRE', hkey, lease * 2)
          end
          table.insert(out, id)
        end
      elseif not why then
        -- its held entry is gone: hand it on unreserved rather than keep it here forever
        table.insert(out, id)
      end
      -- held by a circuit ("c"): that circuit hands it on; dropped from this list
    end
  end
  if redis.call('LLEN', plist) > 0 then
    redis.call('RPUSH', ring, org)
  else
    redis.call('SREM', members, org)
  end
end
return out
"""


class DeliverySlots:
    """The slot verbs on one Redis client; every one raises ``redis.RedisError`` when Redis is away."""

    def __init__(self, redis: Any, settings: SlotSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)

    def acquire(
        self,
        org_id: str,
        host: str,
        delivery_id: str,
        member: str,
        *,
        park: bool = True,
        now_ms: int | None = None,
    ) -> str:
        """``ok`` (both slots are ``member``'s), else why not (with ``park``, the delivery is parked).

        Parking makes the delivery the release step's to hand on: only a
        caller that holds no claim on it may park it (see ``Circuits.gate``).
        """
        s = self.settings
        return _text(
            self._acquire(
                keys=[HELD],
                args=[
                    PREFIX,
                    org_id,
                    host,
                    delivery_id,
                    member,
                    _now_ms() if now_ms is None else now_ms,
                    int(s.lease_seconds * 1000),
                    s.per_organization,
                    s.per_host,
                    1 if park else 0,
                ],
            )
        )

    def release(
        self,
        org_id: str = "",
        host: str = "",
        member: str = "",
        *,
        max_out: int = 8,
        now_ms: int | None = None,
    ) -> list[str]:
        """Give ``member``'s slots back (if any) and take out parked deliveries that now have room."""
        s = self.settings
        ids = self._release(
            keys=[HELD],
            args=[
                PREFIX,
                org_id,
                host,
                member,
                _now_ms() if now_ms is None else now_ms,
                int(s.lease_seconds * 1000),
                s.per_organization,
                s.per_host,
                max_out,
            ],
        )
        return [_text(i) for i in ids]

    def drop_reservation(self, org_id: str, host: str, delivery_id: str) -> list[str]:
        """A released delivery that had nothing to send: free what was reserved for it, pass it on."""
        return self.release(org_id, host, "r:" + delivery_id)

    def held(self, delivery_ids: Iterable[str]) -> set[str]:
        """Which of these deliveries Redis holds (parked, or waiting for a circuit)."""
        ids = list(delivery_ids)
        if not ids:
            return set()
        values = self.redis.hmget(HELD, ids)
        return {i for i, v in zip(ids, values, strict=True) if v is not None}

    def parked_count(self, org_id: str) -> int:
        return int(self.redis.llen(parked_key(org_id)))

    def in_flight(self, org_id: str = "", host: str = "") -> int:
        """Slots held now (reservations included) by an organization or a host."""
        key = org_slots_key(org_id) if org_id else host_slots_key(host)
        return int(self.redis.zcount(key, _now_ms(), "+inf"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)
