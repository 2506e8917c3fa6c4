#!lua flags=allow-oom
-- heartbeat.lua: a member's heartbeat on the server's clock, and expiry of
-- members silent for the session timeout (contract §4).
--
-- KEYS[1] group meta (hash; see join.lua)
-- KEYS[2] members (zset: member id -> session deadline, server ms)
-- KEYS[3] subscriptions (hash: member id -> topics)
-- KEYS[4] owners (hash: "topic/partition" -> "member:generation")
-- ARGV[1] member id
-- ARGV[2] "1" to join again if the member was removed
-- ARGV[3] the member's topics, comma-separated (for a rejoin)
-- Returns {present (1/0), generation, mv, done_mv, session, visibility,
--          maxd, parts, owned...} where owned is "topic/partition:gen"
-- for each partition this member owns. mv counts membership changes;
-- done_mv is the mv the owners were last computed for (a member that sees
-- them differ rebalances). Error "NOGROUP" when the group is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOGROUP group does not exist')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local session = tonumber(redis.call('HGET', KEYS[1], 'session'))
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
if #gone > 0 then
  redis.call('ZREM', KEYS[2], unpack(gone))
  redis.call('HDEL', KEYS[3], unpack(gone))
  redis.call('HINCRBY', KEYS[1], 'mv', 1)
end
local present = 1
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], now + session, ARGV[1])
elseif ARGV[2] == '1' then
  redis.call('ZADD', KEYS[2], now + session, ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'mv', 1)
else
  present = 0
end
local g = redis.call('HMGET', KEYS[1], 'gen', 'mv', 'done_mv', 'session', 'visibility', 'maxd', 'parts')
local out = {present}
for i = 1, 7 do out[#out + 1] = tonumber(g[i] or '0') end
local owners = redis.call('HGETALL', KEYS[4])
local me = ARGV[1] .. ':'
for i = 1, #owners, 2 do
  local v = owners[i + 1]
  if string.sub(v, 1, #me) == me then
    out[#out + 1] = owners[i] .. ':' .. string.sub(v, #me + 1)
  end
end
return out
