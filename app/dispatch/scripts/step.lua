-- One dispatch step: requeue the tasks of expired leases at the front of their
-- organization's list, then take organizations from the ring in turn, skip those
-- at their concurrency limit, pop one task of each and lease it, until the
-- released tasks that no worker has started yet reach the target or nothing can
-- be released. That count is kept here, not read from the broker, so dispatch
-- works the same whether Celery's queues live in Redis or in RabbitMQ.
-- KEYS[1] ring   KEYS[2] ring members   KEYS[3] known   KEYS[4] concurrency limits
-- KEYS[5] leases   KEYS[6] lease -> organization   KEYS[7] ready (released, not started)
-- KEYS[8] drain rates
-- ARGV[1] now (ms)   ARGV[2] lease (ms)   ARGV[3] queue target   ARGV[4] max released
-- ARGV[5] key prefix, from which the per-organization keys are derived (they
--         carry the same hash tag as KEYS[1..6], so they are in the same slot)
-- ARGV[6] time constant of the drain rate (ms)
-- Returns the released task ids; the caller publishes a run message for each.
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
  redis.call('SREM', KEYS[7], task)
  if org then
    redis.call('ZREM', prefix .. 'leases:' .. org, task)
    requeue(org, task)
  end
end
local room = tonumber(ARGV[3]) - redis.call('SCARD', KEYS[7])
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
      redis.call('SADD', KEYS[7], task)
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
