#!lua flags=allow-oom
-- queue_poll.lua: lease up to `max` messages of one partition to a
-- queue-mode group (contract §4b): due entries of the group's state first
-- (expired leases, on their last attempt moved to wait for the dead-letter
-- move instead; nacked and delayed messages whose time came), then fresh
-- records in offset order. Records addressed to another group (redriven)
-- are settled unseen; delayed ones wait in the state until their time.
--
-- The group's state in the partition is ONE sorted set (see
-- queue_settle.lua for the member format): a message leased, waiting for
-- a redelivery or for its delivery time is one member, scored by when it
-- becomes available (a lease's deadline, a nack's or delay's time).
--
-- KEYS[1] partition meta (hash: start, end)
-- KEYS[2] partition log (stream)
-- KEYS[3] group cursor (hash: cur = next fresh offset)
-- KEYS[4] state (zset: "offset:attempts:member:poll" (leased) or
--         "offset:attempts" (waiting) -> when available, server ms)
-- KEYS[5] dead letters to move (hash: offset -> "attempts|claimed until|error")
-- KEYS[6] groups with state in this partition (set)
-- ARGV[1] group
-- ARGV[2] most messages
-- ARGV[3] visibility timeout, ms
-- ARGV[4] max deliveries
-- ARGV[5] where a new cursor starts ("" = log start)
-- ARGV[6] "member:poll": the polling member's id and this poll's number
--         (a poll dropped before its reply arrived gives back exactly the
--         leases it took: queue_settle.lua "giveback")
-- Returns {messages, dead letters waiting, ms until the next lease expiry
-- or redelivery (-1: none)}; messages is flat: entry id, attempt, fields,
-- entry id, attempt, fields, ... (the id "offset-append time", or
-- "offset-1" for an entry with a field `t`; one table for all: each table and string
-- in the reply costs its conversion). A message's lease token is
-- "attempt:" .. ARGV[6] (unique, as a poll leases an offset once).
-- Error "NOTOPIC" when the partition does not exist.
--
-- Numbers go into arguments as strings made with string.format('%d'): a
-- Lua number given to redis.call (or concatenated) is formatted with a
-- floating-point printf, which cost more than the commands themselves.
local fmt = string.format
local m = redis.call('HMGET', KEYS[1], 'start', 'end')
if not m[1] then
  return redis.error_reply('NOTOPIC partition does not exist')
end
local start, stop = tonumber(m[1]), tonumber(m[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max, vis, maxd = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cur = redis.call('HGET', KEYS[3], 'cur')
if not cur then
  cur = start
  if ARGV[5] ~= '' then cur = tonumber(ARGV[5]) end
  redis.call('SADD', KEYS[6], ARGV[1])
else
  cur = tonumber(cur)
end
if cur < start then cur = start end

-- What this poll leases, in delivery order: `out` (the reply: entry id,
-- attempt (strings, as the entry id and the state have them), fields) and
-- `z` (deadline, state member: written after the scan, one ZADD per 100).
local out, z, n = {}, {}, 0
local deadline = fmt('%d', now + vis)
local tail = ':' .. ARGV[6]
local function lease(o, id, a, fields)
  n = n + 1
  out[#out + 1] = id
  out[#out + 1] = a
  out[#out + 1] = fields
  z[#z + 1] = deadline
  z[#z + 1] = o .. ':' .. a .. tail
end

-- Due entries: up to `max` to lease, and up to 1000 expired leases on
-- their last attempt, which go to wait for their dead-letter move.
local nows = fmt('%d', now)
local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', nows, 'LIMIT', 0, max + 1000)
local gone, dead = {}, {}
for _, mem in ipairs(due) do
  local os, as, tok = string.match(mem, '^(%d+):(%d+)(:?.*)$')
  local a = tonumber(as)
  if tok ~= '' and a >= maxd then
    gone[#gone + 1] = mem
    dead[#dead + 1] = os
    dead[#dead + 1] = as .. '|0|'
  elseif n < max then
    gone[#gone + 1] = mem
    local e = {}
    if tonumber(os) >= start then
      e = redis.call('XRANGE', KEYS[2], os, os)
    end
    -- Removed by retention: settled unseen.
    if #e > 0 then lease(os, e[1][1], fmt('%d', a + 1), e[1][2]) end
  end
end
if #gone > 0 then redis.call('ZREM', KEYS[4], unpack(gone)) end
if #dead > 0 then redis.call('HSET', KEYS[5], unpack(dead)) end

while n < max and cur < stop do
  local es = redis.call('XRANGE', KEYS[2], fmt('%d', cur), '+', 'COUNT', max - n)
  if #es == 0 then
    cur = stop
    break
  end
  for _, e in ipairs(es) do
    local os = string.match(e[1], '^(%d+)')
    cur = tonumber(os) + 1
    local f = e[2]
    local g, d = nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'g' then g = f[i + 1] elseif f[i] == 'd' then d = tonumber(f[i + 1]) end
    end
    if g and g ~= ARGV[1] then
      -- addressed to another group (redriven): settled unseen
    elseif d and d > now then
      redis.call('ZADD', KEYS[4], fmt('%d', d), os .. ':0')
    else
      lease(os, e[1], '1', f)
    end
  end
end
redis.call('HSET', KEYS[3], 'cur', fmt('%d', cur))

for c0 = 1, #z, 200 do
  redis.call('ZADD', KEYS[4], unpack(z, c0, math.min(c0 + 199, #z)))
end

local wait = -1
local nx = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if #nx > 0 then wait = math.max(tonumber(nx[2]) - now, 0) end
return {out, redis.call('HLEN', KEYS[5]), wait}
