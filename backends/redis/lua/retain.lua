#!lua flags=allow-oom
-- retain.lua: retention of one partition (contract §6): removes whole
-- records from the head while they are older than the age limit or the
-- partition holds more than the byte limit, and moves the log start. The
-- log end never moves. Records still leased to a queue-mode group are
-- removed too (their leases then settle unseen; see the crate docs).
--
-- KEYS[1] partition meta (hash: start, end, bytes)
-- KEYS[2] partition log (stream)
-- ARGV[1] max age, ms (-1: none)
-- ARGV[2] max bytes (-1: none)
-- ARGV[3] most records to remove in this call
-- Returns the number of records removed. Safe to retry.
local m = redis.call('HMGET', KEYS[1], 'start', 'end', 'bytes')
if not m[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local start, stop, bytes = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
local age, maxb, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local at = start
local done = false
while not done and at < stop and (at - start) < budget do
  local es = redis.call('XRANGE', KEYS[2], string.format('%d', at), '+', 'COUNT', 100)
  if #es == 0 then break end
  for _, e in ipairs(es) do
    -- The id is "offset-append time" (or "offset-1" with a field `t`,
    -- for entries written before ids carried the time).
    local os, tid = string.match(e[1], '^(%d+)-(%d+)$')
    local o = tonumber(os)
    local f = e[2]
    local ts, size, vsize = tonumber(tid), nil, 0
    for i = 1, #f, 2 do
      local n = f[i]
      if n == 't' then ts = tonumber(f[i + 1])
      elseif n == 's' then size = tonumber(f[i + 1])
      elseif n == 'v' then vsize = #f[i + 1] end
    end
    -- No `s`: a record of a value alone (append.lua), its size the value's.
    size = size or vsize
    local old = age >= 0 and ts < now - age
    local big = maxb >= 0 and bytes > maxb
    if (old or big) and (o - start) < budget then
      bytes = bytes - size
      at = o + 1
    else
      done = true
      break
    end
  end
end
if at > start then
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', at))
  redis.call('HSET', KEYS[1], 'start', at, 'bytes', bytes)
end
return at - start
