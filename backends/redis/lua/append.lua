#!lua
-- append.lua: append records to one partition, atomically and contiguously,
-- with the dedup window for idempotent produce (contract §3).
--
-- KEYS[1] partition meta (hash: end, start, bytes, lastts)
-- KEYS[2] partition log (stream; the entry id of offset N is "N-T", T the
--         append time in ms: the record's timestamp rides in the id, not
--         in a field, which made every read return half as many strings.
--         Entries written before this are "N-1" with a field `t`)
-- KEYS[3] dedup keys (hash: idempotency key -> "offset:timestamp")
-- KEYS[4] dedup times (zset: idempotency key -> append time, ms)
-- ARGV[1] dedup window, ms
-- ARGV[2] wake-up channel (PUBLISH after a write)
-- ARGV[3] wake-up message
-- ARGV[4] number of records n; then per record a tag and its arguments:
--   "v", value: a record of a value alone (no idempotency key, key,
--     delay, group or headers; its size is the value's), two arguments
--     where a full one takes nine: each argument is a string the server
--     makes, and most records are such;
--   "f" and 8 arguments: idempotency key ("" = none), size (bytes, for
--     retention), delivery delay in ms from now, on the server's clock
--     ("" = none; stored as an absolute server time), addressed group
--     ("" = every group), has key ("1"/"0"), key, value, headers
--     (Conveyor's header encoding)
-- Returns, when no record carries an idempotency key, {first offset,
-- timestamp} (the records got the offsets from the first on, in input
-- order, and the one timestamp); else one "offset:timestamp" per record,
-- in input order (a duplicate gets the original's). Error "NOTOPIC" when
-- the partition does not exist.
-- Nothing is written before every check has passed; a retry after a
-- timeout appends again unless the records carry idempotency keys.
--
-- Numbers go into strings with string.format('%d'): Lua's own number to
-- string conversion (and Redis's, for a number passed to redis.call) is a
-- floating-point printf, which cost more than the XADD itself.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local m = redis.call('HMGET', KEYS[1], 'end', 'bytes', 'lastts')
if not m[1] then
  return redis.error_reply('NOTOPIC partition does not exist')
end
local off = tonumber(m[1])
local bytes = tonumber(m[2])
if now < tonumber(m[3]) then now = tonumber(m[3]) end
local fmt = string.format
local nows = fmt('%d', now)

local window = tonumber(ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. fmt('%d', now - window), 'LIMIT', 0, 1000)
if #old > 0 then
  redis.call('HDEL', KEYS[3], unpack(old))
  redis.call('ZREM', KEYS[4], unpack(old))
end

local n = tonumber(ARGV[4])
local first = off
local keyed = false
local out = {}
local seen = {}
local added = 0
local log = KEYS[2]
local tail = '-' .. nows
local call, argv = redis.call, ARGV
-- A record of 8 arguments from argv[b] (tag "f").
local function full(b)
  local idem = argv[b]
  local prior = false
  if idem ~= '' then
    prior = seen[idem] or call('HGET', KEYS[3], idem)
  end
  if prior then
    keyed = true
    out[#out + 1] = prior
    return
  end
  local offs = fmt('%d', off)
  local id = offs .. tail
  if idem == '' and argv[b + 4] ~= '1' and argv[b + 2] == '' and argv[b + 3] == '' then
    -- No key, no idempotency key, no delay, no group: headers only.
    call('XADD', log, id, 's', argv[b + 1], 'v', argv[b + 6], 'h', argv[b + 7])
  else
    local f = {'s', argv[b + 1], 'v', argv[b + 6], 'h', argv[b + 7]}
    if argv[b + 4] == '1' then f[#f + 1] = 'k'; f[#f + 1] = argv[b + 5] end
    if idem ~= '' then f[#f + 1] = 'i'; f[#f + 1] = idem end
    if argv[b + 2] ~= '' then f[#f + 1] = 'd'; f[#f + 1] = fmt('%d', now + tonumber(argv[b + 2])) end
    if argv[b + 3] ~= '' then f[#f + 1] = 'g'; f[#f + 1] = argv[b + 3] end
    call('XADD', log, id, unpack(f))
  end
  if idem ~= '' then
    local r = offs .. ':' .. nows
    call('HSET', KEYS[3], idem, r)
    call('ZADD', KEYS[4], nows, idem)
    seen[idem] = r
    keyed = true
  end
  out[#out + 1] = offs
  off = off + 1
  bytes = bytes + tonumber(argv[b + 1])
  added = added + 1
end

local a = 5
for _ = 1, n do
  if argv[a] == 'v' then
    -- A value alone: nothing to look up; stored as the value only (its
    -- size is the value's), one field to parse on every read.
    local v = argv[a + 1]
    local offs = fmt('%d', off)
    call('XADD', log, offs .. tail, 'v', v)
    out[#out + 1] = offs
    off = off + 1
    bytes = bytes + #v
    added = added + 1
    a = a + 2
  else
    full(a + 1)
    a = a + 9
  end
end
if added > 0 then
  redis.call('HSET', KEYS[1], 'end', fmt('%d', off), 'bytes', fmt('%d', bytes), 'lastts', nows)
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
if not keyed then return {fmt('%d', first), nows} end
for i = 1, #out do
  if not string.find(out[i], ':', 1, true) then out[i] = out[i] .. ':' .. nows end
end
return out
