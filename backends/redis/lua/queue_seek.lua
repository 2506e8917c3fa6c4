#!lua flags=allow-oom
-- queue_seek.lua: move a queue-mode group's cursor in one partition (seek,
-- replay). Leases, pending redeliveries and attempts of the partition are
-- dropped: the group starts over from the target.
--
-- KEYS[1] group cursor (hash: cur)
-- KEYS[2] state (zset: leases and waiting messages; queue_settle.lua)
-- KEYS[3] dead letters to move (hash)
-- KEYS[4] groups with state in this partition (set)
-- ARGV[1] group
-- ARGV[2] the new cursor
-- Returns 1. Safe to retry.
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'cur', ARGV[2])
redis.call('SADD', KEYS[4], ARGV[1])
return 1
