-- Append a task to its organization's waiting list, unless it already waits or is leased.
-- KEYS[1] waiting list of the organization    KEYS[2] known (set of waiting ids)
-- KEYS[3] leases of the organization (zset)   KEYS[4] ring (list of organizations)
-- KEYS[5] ring members (set)                  KEYS[6] concurrency limits (hash)
-- ARGV[1] organization id   ARGV[2] task id   ARGV[3] concurrency limit
-- ARGV[4] "1" to put it at the front (a task that waited already), else "0"
-- Returns 1 when added, 0 when it was already there.
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
