#!lua flags=allow-oom
-- group_delete.lua: delete a group's own keys (its slot), unless it has
-- live members (contract §4). The partitions' queue keys of the group are
-- deleted by the caller afterwards, with the topics this returns.
--
-- KEYS[1] group meta (hash)
-- KEYS[2] members (zset: member id -> session deadline, server ms)
-- KEYS[3] subscriptions (hash)
-- KEYS[4] topics the group has read (set)
-- KEYS[5] owners (hash)
-- KEYS[6] commits (hash)
-- Returns {"deleted", topics...}, {"live", member ids...} (nothing
-- deleted), or {"missing"} when the group has no meta. Safe to retry.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
if #live > 0 then
  local out = {'live'}
  for i = 1, #live do out[#out + 1] = live[i] end
  return out
end
local out = {'deleted'}
local topics = redis.call('SMEMBERS', KEYS[4])
for i = 1, #topics do out[#out + 1] = topics[i] end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
return out
