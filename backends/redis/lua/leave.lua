#!lua flags=allow-oom
-- leave.lua: a member leaves its group at once (close).
--
-- KEYS[1] group meta (hash: mv)
-- KEYS[2] members (zset)
-- KEYS[3] subscriptions (hash)
-- ARGV[1] member id
-- Returns 1 when it was a member. Safe to retry.
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'mv', 1)
return 1
