#!lua flags=allow-oom
-- queue_poll.lua: lease up to `max` messages of one partition to a
-- queue-mode group (contract §4b): expired leases first become available
-- again (or, on their last attempt, wait for the dead-letter move), then
-- due redeliveries, then fresh records in offset order. Records addressed
-- to another group (redriven) are settled unseen; delayed ones wait in
-- the ready set until their time.
--
-- KEYS[1] partition meta (hash: start, end)
-- KEYS[2] partition log (stream)
-- KEYS[3] group cursor (hash: cur = next fresh offset, tok = lease counter)
-- KEYS[4] leases (zset: offset -> deadline, server ms)
-- KEYS[5] ready (zset: offset -> when available, server ms)
-- KEYS[6] attempts (hash: offset -> deliveries made)
-- KEYS[7] lease tokens (hash: offset -> "token:member")
-- KEYS[8] dead letters to move (hash: offset -> "attempts|claimed until|error")
-- KEYS[9] groups with state in this partition (set)
-- ARGV[1] group
-- ARGV[2] most messages
-- ARGV[3] visibility timeout, ms
-- ARGV[4] max deliveries
-- ARGV[5] where a new cursor starts ("" = log start)
-- ARGV[6] "member:poll": the polling member's id and this poll's number
--         (a poll dropped before its reply arrived gives back exactly the
--         leases it took: queue_settle.lua "giveback")
-- Returns {messages, dead letters waiting, ms until the next lease expiry
-- or redelivery (-1: none)}; a message is {offset, attempt, token
-- ("counter:member:poll"), fields}.
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
  redis.call('SADD', KEYS[9], ARGV[1])
else
  cur = tonumber(cur)
end
if cur < start then cur = start end

local nows = fmt('%d', now)
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', nows, 'LIMIT', 0, 1000)
for _, o in ipairs(expired) do
  redis.call('ZREM', KEYS[4], o)
  redis.call('HDEL', KEYS[7], o)
  local a = tonumber(redis.call('HGET', KEYS[6], o) or '0')
  if a >= maxd then
    redis.call('HSET', KEYS[8], o, a .. '|0|')
  else
    redis.call('ZADD', KEYS[5], nows, o)
  end
end

-- What this poll leases, in delivery order: {offset (a string, as the
-- entry id has it), fields}. The leases are written after the scan, with
-- one HINCRBY of the token counter and a few calls per 100 (below).
local pend = {}
local function lease(o, fields)
  pend[#pend + 1] = {o, fields}
end

if #pend < max then
  local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', nows, 'LIMIT', 0, max)
  for _, o in ipairs(due) do
    redis.call('ZREM', KEYS[5], o)
    local e = {}
    if tonumber(o) >= start then
      e = redis.call('XRANGE', KEYS[2], o .. '-1', o .. '-1')
    end
    if #e == 0 then
      redis.call('HDEL', KEYS[6], o) -- removed by retention: settled unseen
    else
      lease(o, e[1][2])
    end
  end
end

while #pend < max and cur < stop do
  local es = redis.call('XRANGE', KEYS[2], fmt('%d-1', cur), '+', 'COUNT', max - #pend)
  if #es == 0 then
    cur = stop
    break
  end
  for _, e in ipairs(es) do
    local os = string.match(e[1], '^(%d+)')
    local o = tonumber(os)
    cur = o + 1
    local f = e[2]
    local g, d = nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'g' then g = f[i + 1] elseif f[i] == 'd' then d = tonumber(f[i + 1]) end
    end
    if g and g ~= ARGV[1] then
      -- addressed to another group (redriven): settled unseen
    elseif d and d > now then
      redis.call('ZADD', KEYS[5], fmt('%d', d), os)
    else
      lease(os, f)
    end
  end
end
redis.call('HSET', KEYS[3], 'cur', fmt('%d', cur))

local out = {}
if #pend > 0 then
  -- Per 100 leases: one HMGET and one HSET of the attempts, one ZADD of
  -- the deadlines, one HSET of the tokens (not a call per message).
  local deadline = fmt('%d', now + vis)
  local tok0 = redis.call('HINCRBY', KEYS[3], 'tok', #pend) - #pend
  for c0 = 1, #pend, 100 do
    local c1 = math.min(c0 + 99, #pend)
    local offs = {}
    for i = c0, c1 do offs[#offs + 1] = pend[i][1] end
    local prev = redis.call('HMGET', KEYS[6], unpack(offs))
    local z, h, at = {}, {}, {}
    for i = c0, c1 do
      local o = pend[i][1]
      local a = tonumber(prev[i - c0 + 1] or '0') + 1
      local tok = fmt('%d', tok0 + i) .. ':' .. ARGV[6]
      z[#z + 1] = deadline
      z[#z + 1] = o
      h[#h + 1] = o
      h[#h + 1] = tok
      at[#at + 1] = o
      at[#at + 1] = fmt('%d', a)
      out[#out + 1] = {tonumber(o), a, tok, pend[i][2]}
    end
    redis.call('HSET', KEYS[6], unpack(at))
    redis.call('ZADD', KEYS[4], unpack(z))
    redis.call('HSET', KEYS[7], unpack(h))
  end
end

local wait = -1
local nl = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
local nr = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
if #nl > 0 then wait = tonumber(nl[2]) - now end
if #nr > 0 and (wait < 0 or tonumber(nr[2]) - now < wait) then wait = tonumber(nr[2]) - now end
if wait < 0 and (#nl > 0 or #nr > 0) then wait = 0 end
return {out, redis.call('HLEN', KEYS[8]), wait}
