-- Extend a released task's lease; only a lease that exists is extended. A
-- worker's first renewal says it started the task: it no longer counts
-- against the step's target of tasks released and not started.
-- KEYS[1] leases   KEYS[2] lease -> organization   KEYS[3] ready (released, not started)
-- ARGV[1] task id   ARGV[2] new expiry (ms)
-- ARGV[3] key prefix (the organization's leases key is derived from it; same hash tag)
-- Returns 1 when renewed, 0 when the task holds no lease.
local org = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
if not org then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
redis.call('ZADD', ARGV[3] .. 'leases:' .. org, 'XX', ARGV[2], ARGV[1])
return 1
