-- topic_update.lua: replace a topic's config (partitions added), only if
-- the topic still has the id and config the caller read.
--
-- KEYS[1] topic ids (hash: name -> id)
-- KEYS[2] topic configs (hash: id -> config JSON)
-- ARGV[1] topic name
-- ARGV[2] id read
-- ARGV[3] config JSON read
-- ARGV[4] new config JSON
-- Returns 1 when replaced, 0 when the config changed meanwhile.
-- Error "NOTOPIC" when the topic is gone. Safe to retry.
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id or id ~= ARGV[2] then
  return redis.error_reply('NOTOPIC topic does not exist')
end
local cfg = redis.call('HGET', KEYS[2], id)
if cfg == ARGV[4] then return 1 end
if cfg ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[2], id, ARGV[4])
return 1
