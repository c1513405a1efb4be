-- Forget a task: free its slot (its lease), or take it out of its waiting list.
-- KEYS[1] leases   KEYS[2] lease -> organization   KEYS[3] known
-- KEYS[4] ready (released, not started)
-- ARGV[1] task id
-- ARGV[2] key prefix (per-organization keys are derived from it; same hash tag)
-- ARGV[3] organization id when the task may be waiting, else ""
local org = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
if org then redis.call('ZREM', ARGV[2] .. 'leases:' .. org, ARGV[1]) end
if redis.call('SREM', KEYS[3], ARGV[1]) == 1 and ARGV[3] ~= '' then
  redis.call('LREM', ARGV[2] .. 'waiting:' .. ARGV[3], 1, ARGV[1])
end
return 1
