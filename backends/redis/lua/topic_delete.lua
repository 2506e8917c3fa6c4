#!lua flags=allow-oom
-- topic_delete.lua: unregister a topic. Its partitions' keys are deleted
-- next, one partition at a time (other slots); a crash in between leaves
-- keys under an id nobody will use again, never a half-visible topic.
--
-- KEYS[1] topic ids (hash: name -> id)
-- KEYS[2] topic configs (hash: id -> config JSON)
-- ARGV[1] topic name
-- Returns {id, config JSON}, or an empty list when there is no such topic.
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return {} end
local cfg = redis.call('HGET', KEYS[2], id)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], id)
return {tonumber(id), cfg or ''}
