#!lua flags=allow-oom
-- queue_state.lua: a queue-mode group's standing in one partition (lag,
-- contract §9), and optionally a start for a new cursor (a group that
-- starts at `latest`, or a seek).
--
-- KEYS[1] partition meta (hash: start, end)
-- KEYS[2] group cursor (hash: cur, tok)
-- KEYS[3] leases (zset)
-- KEYS[4] ready (zset)
-- KEYS[5] dead letters to move (hash)
-- KEYS[6] groups with state in this partition (set)
-- ARGV[1] group
-- ARGV[2] "" to only read, else the cursor to set if there is none
-- KEYS[7] lease tokens (hash: offset -> "counter:member:poll")
-- Returns {start, end, cursor (-1: none), in flight, ready, dead, lowest
-- unsettled offset (-1: none below the cursor), ready and due now,
-- member, live leases, member, live leases, ...}. Error "NOTOPIC" when the
-- partition does not exist.
local m = redis.call('HMGET', KEYS[1], 'start', 'end')
if not m[1] then
  return redis.error_reply('NOTOPIC partition does not exist')
end
if ARGV[2] ~= '' and redis.call('HSETNX', KEYS[2], 'cur', ARGV[2]) == 1 then
  redis.call('SADD', KEYS[6], ARGV[1])
end
local cur = tonumber(redis.call('HGET', KEYS[2], 'cur') or '-1')
local low = -1
-- lowest unsettled offset: leases and ready sets are scored by time, so
-- their members are scanned (they are bounded by what is in flight).
for _, key in ipairs({KEYS[3], KEYS[4]}) do
  for _, o in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if low < 0 or tonumber(o) < low then low = tonumber(o) end
  end
end
for _, o in ipairs(redis.call('HKEYS', KEYS[5])) do
  if low < 0 or tonumber(o) < low then low = tonumber(o) end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {tonumber(m[1]), tonumber(m[2]), cur, redis.call('ZCARD', KEYS[3]),
             redis.call('ZCARD', KEYS[4]), redis.call('HLEN', KEYS[5]), low,
             redis.call('ZCOUNT', KEYS[4], '-inf', now)}
local per = {}
local toks = redis.call('HGETALL', KEYS[7])
for i = 1, #toks, 2 do
  local d = redis.call('ZSCORE', KEYS[3], toks[i])
  if d and tonumber(d) > now then
    local member = string.match(toks[i + 1], '^%d+:(%d+):')
    if member then per[member] = (per[member] or 0) + 1 end
  end
end
for member, n in pairs(per) do
  out[#out + 1] = tonumber(member)
  out[#out + 1] = n
end
return out
