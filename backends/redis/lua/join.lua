#!lua flags=allow-oom
-- join.lua: a member joins a group (contract §4). The group is created on
-- first use with this member's settings; a later member never changes
-- them (only alter does): it must bring the same config JSON, unless it
-- joins with the group's settings (ARGV[9] "existing").
--
-- KEYS[1] group meta (hash: mode, start, config, session, visibility,
--         maxd, gen, mv, done_mv, parts)
-- KEYS[2] members (zset: member id -> session deadline, server ms)
-- KEYS[3] subscriptions (hash: member id -> topics, comma-separated)
-- KEYS[4] topics the group has read (set)
-- ARGV[1] mode ("stream" / "queue")
-- ARGV[2] start ("earliest" / "latest")
-- ARGV[3] session timeout, ms
-- ARGV[4] visibility timeout, ms
-- ARGV[5] max deliveries
-- ARGV[6] config JSON
-- ARGV[7] topics, comma-separated
-- ARGV[8] the member's id (chosen by the client, random: a retried join
--         adds the same member again, which changes nothing)
-- ARGV[9] "match" (the stored config must equal ARGV[6]) or "existing"
-- Returns {member id, start, topics new to the group...}.
-- Error "MODE <mode>" when the group exists in the other mode, "SETTINGS
-- <stored config JSON>" when it exists with another config and ARGV[9] is
-- "match" (nothing written either way; the client compares the fields,
-- and joins with "existing" if only the JSON's spelling differs). Safe to
-- retry.
local mode = redis.call('HGET', KEYS[1], 'mode')
if mode and mode ~= ARGV[1] then
  return redis.error_reply('MODE ' .. mode)
end
if mode then
  local stored = redis.call('HGET', KEYS[1], 'config')
  if ARGV[9] == 'match' and stored ~= ARGV[6] then
    return redis.error_reply('SETTINGS ' .. (stored or '{}'))
  end
else
  redis.call('HSET', KEYS[1], 'mode', ARGV[1], 'start', ARGV[2], 'session', ARGV[3],
    'visibility', ARGV[4], 'maxd', ARGV[5], 'config', ARGV[6])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local session = redis.call('HGET', KEYS[1], 'session')
local id = ARGV[8]
redis.call('ZADD', KEYS[2], now + tonumber(session), id)
redis.call('HSET', KEYS[3], id, ARGV[7])
redis.call('HINCRBY', KEYS[1], 'mv', 1)
local out = {id, redis.call('HGET', KEYS[1], 'start')}
for topic in string.gmatch(ARGV[7], '[^,]+') do
  if redis.call('SADD', KEYS[4], topic) == 1 then out[#out + 1] = topic end
end
return out
