#!lua flags=allow-oom
-- queue_state.lua: a queue-mode group's standing in one partition (lag,
-- contract §9), and optionally a start for a new cursor (a group that
-- starts at `latest`, or a seek).
--
-- KEYS[1] partition meta (hash: start, end)
-- KEYS[2] group cursor (hash: cur)
-- KEYS[3] state (zset: "offset:attempts:member:poll" (leased) or
--         "offset:attempts" (waiting) -> when available; queue_settle.lua)
-- KEYS[4] dead letters to move (hash)
-- KEYS[5] groups with state in this partition (set)
-- ARGV[1] group
-- ARGV[2] "" to only read, else the cursor to set if there is none
-- Returns {start, end, cursor (-1: none), in flight (live leases), waiting
-- (the other members of the state), dead, lowest unsettled offset (-1:
-- none below the cursor), waiting and due now, member, live leases,
-- member, live leases, ...}. Error "NOTOPIC" when the partition does not
-- exist.
local m = redis.call('HMGET', KEYS[1], 'start', 'end')
if not m[1] then
  return redis.error_reply('NOTOPIC partition does not exist')
end
if ARGV[2] ~= '' and redis.call('HSETNX', KEYS[2], 'cur', ARGV[2]) == 1 then
  redis.call('SADD', KEYS[5], ARGV[1])
end
local cur = tonumber(redis.call('HGET', KEYS[2], 'cur') or '-1')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local low, live, waiting, due = -1, 0, 0, 0
local per = {}
-- The state is scored by time, so its members are scanned (they are
-- bounded by what is in flight or waiting).
local all = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local o, member = string.match(all[i], '^(%d+):%d+:?(%d*)')
  local at = tonumber(all[i + 1])
  o = tonumber(o)
  if low < 0 or o < low then low = o end
  if member ~= '' and at > now then
    live = live + 1
    per[member] = (per[member] or 0) + 1
  else
    waiting = waiting + 1
    if at <= now then due = due + 1 end
  end
end
for _, o in ipairs(redis.call('HKEYS', KEYS[4])) do
  if low < 0 or tonumber(o) < low then low = tonumber(o) end
end
local out = {tonumber(m[1]), tonumber(m[2]), cur, live, waiting,
             redis.call('HLEN', KEYS[4]), low, due}
for member, n in pairs(per) do
  out[#out + 1] = tonumber(member)
  out[#out + 1] = n
end
return out
