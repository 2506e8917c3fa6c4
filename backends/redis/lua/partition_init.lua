-- partition_init.lua: create a partition's meta hash if missing.
--
-- KEYS[1] partition meta (hash: end, start, bytes, lastts)
-- Returns 1 when created. Safe to retry.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'end', 0, 'start', 0, 'bytes', 0, 'lastts', 0)
return 1
