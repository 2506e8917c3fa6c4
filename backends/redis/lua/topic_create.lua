-- topic_create.lua: register a topic (contract §1). Topics get a fresh
-- numeric id, used in their partitions' keys, so a topic deleted and
-- created again never sees the old one's records.
--
-- KEYS[1] topic ids (hash: name -> id)
-- KEYS[2] topic configs (hash: id -> config JSON)
-- KEYS[3] id sequence (string counter)
-- ARGV[1] topic name
-- ARGV[2] config JSON (TopicConfig)
-- Returns {id, created (1/0)}. Error "EXISTS <json>" when the topic exists
-- with another config. Safe to retry (a retry finds the same config).
local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then
  local cfg = redis.call('HGET', KEYS[2], id)
  if cfg == ARGV[2] then return {tonumber(id), 0} end
  return redis.error_reply('EXISTS ' .. (cfg or ''))
end
id = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], ARGV[1], id)
redis.call('HSET', KEYS[2], id, ARGV[2])
return {id, 1}
