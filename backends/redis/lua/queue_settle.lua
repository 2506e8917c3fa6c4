#!lua flags=allow-oom
-- queue_settle.lua: ack, nack or extend messages of one partition under
-- their leases (contract §4b). A message whose lease token no longer
-- matches (expired and released or re-leased, or already settled) is
-- refused and nothing about it changes.
--
-- KEYS[1] leases (zset: offset -> deadline, server ms)
-- KEYS[2] ready (zset: offset -> when available)
-- KEYS[3] attempts (hash: offset -> deliveries made)
-- KEYS[4] lease tokens (hash: offset -> "counter:member:poll")
-- KEYS[5] dead letters to move (hash: offset -> "attempts|claimed until|error")
-- ARGV[1] action: "ack", "nack", "extend", "release" (every live lease
--         of member ARGV[5] expires now: it left; attempts are kept) or
--         "giveback" (the leases of poll ARGV[5] = "member:poll", whose
--         reply nobody received, are undone: attempts restored, offered
--         again at once)
-- ARGV[2] ms: the nack delay, or the extension (from now)
-- ARGV[3] max deliveries (nack: at or above it the message is dead-lettered)
-- ARGV[4] the nack's reason ("" = none)
-- ARGV[5..] pairs: offset, token
-- Returns one code per pair: 0 lease lost, 1 done, 2 (nack) dead-lettered:
-- waiting in KEYS[5] for the move to the DLQ. A retry of an applied call
-- gets 0 for what it already did.
local action, ms, maxd = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
if action == 'ack' then
  -- Acks in bulk, 100 per round of calls: one HMGET of the tokens and one
  -- ZMSCORE of the leases check them all, then one ZREM and two HDELs
  -- settle those that hold (not six calls per message). An offset given
  -- twice settles once: the second gets 0, as it would one call later.
  local seen = {}
  for c0 = 5, #ARGV, 200 do
    local offs, toks = {}, {}
    for i = c0, math.min(c0 + 199, #ARGV), 2 do
      offs[#offs + 1] = ARGV[i]
      toks[#toks + 1] = ARGV[i + 1]
    end
    local have = redis.call('HMGET', KEYS[4], unpack(offs))
    local live = redis.call('ZMSCORE', KEYS[1], unpack(offs))
    local done = {}
    for j, o in ipairs(offs) do
      if have[j] == toks[j] and live[j] and not seen[o] then
        seen[o] = true
        done[#done + 1] = o
        out[#out + 1] = 1
      else
        out[#out + 1] = 0
      end
    end
    if #done > 0 then
      redis.call('ZREM', KEYS[1], unpack(done))
      redis.call('HDEL', KEYS[4], unpack(done))
      redis.call('HDEL', KEYS[3], unpack(done))
    end
  end
  return out
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if action == 'release' or action == 'giveback' then
  local toks = redis.call('HGETALL', KEYS[4])
  local n = 0
  for i = 1, #toks, 2 do
    local o, tok = toks[i], toks[i + 1]
    local member, poll = string.match(tok, '^%d+:(%d+):(%d+)$')
    if action == 'release' and member == ARGV[5] then
      local d = redis.call('ZSCORE', KEYS[1], o)
      if d and tonumber(d) > now then
        redis.call('ZADD', KEYS[1], now, o)
        n = n + 1
      end
    elseif action == 'giveback' and (member .. ':' .. poll) == ARGV[5] then
      redis.call('ZREM', KEYS[1], o)
      redis.call('HDEL', KEYS[4], o)
      if redis.call('HINCRBY', KEYS[3], o, -1) <= 0 then redis.call('HDEL', KEYS[3], o) end
      redis.call('ZADD', KEYS[2], now, o)
      n = n + 1
    end
  end
  return {n}
end
for i = 5, #ARGV, 2 do
  local o, tok = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[4], o) ~= tok or not redis.call('ZSCORE', KEYS[1], o) then
    out[#out + 1] = 0
  elseif action == 'extend' then
    redis.call('ZADD', KEYS[1], now + ms, o)
    out[#out + 1] = 1
  else
    redis.call('ZREM', KEYS[1], o)
    redis.call('HDEL', KEYS[4], o)
    if action == 'ack' then
      redis.call('HDEL', KEYS[3], o)
      out[#out + 1] = 1
    else
      local a = tonumber(redis.call('HGET', KEYS[3], o) or '0')
      if a >= maxd then
        redis.call('HSET', KEYS[5], o, a .. '|0|' .. ARGV[4])
        out[#out + 1] = 2
      else
        redis.call('ZADD', KEYS[2], now + ms, o)
        out[#out + 1] = 1
      end
    end
  end
end
return out
