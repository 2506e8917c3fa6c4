#!lua flags=allow-oom
-- queue_settle.lua: nack or extend messages of one partition under their
-- leases, release a member's leases or give back a dropped poll's
-- (contract §4b). A message whose lease no longer holds (expired and
-- re-leased, given back, or already settled) is refused and nothing about
-- it changes. (An ack is a plain ZREM of the lease's member, which checks
-- and settles in one step: src/acks.rs.)
--
-- A lease is one member of the group's state (a sorted set):
-- "offset:attempts:member:poll", scored by its deadline (server ms); its
-- token, given to the consumer, is everything after the offset (unique: a
-- poll leases an offset once, and member ids are random). A message
-- waiting to be offered again is "offset:attempts", scored by when. So a
-- lease is checked by the member's presence and settled by removing it:
-- no other structure holds per-message state.
--
-- KEYS[1] state (zset: see above)
-- KEYS[2] dead letters to move (hash: offset -> "attempts|claimed until|error")
-- ARGV[1] action: "nack", "extend", "release" (every live lease
--         of member ARGV[5] expires now: it left; attempts are kept) or
--         "giveback" (the leases of poll ARGV[5] = "member:poll", whose
--         reply nobody received, are undone: attempts restored, offered
--         again at once)
-- ARGV[2] ms: the nack delay, or the extension (from now)
-- ARGV[3] max deliveries (nack: at or above it the message is dead-lettered)
-- ARGV[4] the nack's reason ("" = none)
-- ARGV[5..] pairs: offset, token
-- Returns one code per pair: 0 lease lost, 1 done, 2 (nack) dead-lettered:
-- waiting in KEYS[2] for the move to the DLQ. A retry of an applied call
-- gets 0 for what it already did.
local fmt = string.format
local action, ms, maxd = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if action == 'release' or action == 'giveback' then
  local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local n = 0
  for i = 1, #all, 2 do
    local mem, at = all[i], tonumber(all[i + 1])
    local o, a, member, poll = string.match(mem, '^(%d+):(%d+):(%d+):(%d+)$')
    if not o then
      -- waiting, not leased
    elseif action == 'release' and member == ARGV[5] then
      if at > now then
        redis.call('ZADD', KEYS[1], fmt('%d', now), mem)
        n = n + 1
      end
    elseif action == 'giveback' and (member .. ':' .. poll) == ARGV[5] then
      redis.call('ZREM', KEYS[1], mem)
      redis.call('ZADD', KEYS[1], fmt('%d', now), o .. ':' .. fmt('%d', tonumber(a) - 1))
      n = n + 1
    end
  end
  return {n}
end
for i = 5, #ARGV, 2 do
  local o, tok = ARGV[i], ARGV[i + 1]
  local mem = o .. ':' .. tok
  if not redis.call('ZSCORE', KEYS[1], mem) then
    out[#out + 1] = 0
  elseif action == 'extend' then
    redis.call('ZADD', KEYS[1], fmt('%d', now + ms), mem)
    out[#out + 1] = 1
  else -- nack
    redis.call('ZREM', KEYS[1], mem)
    local a = string.match(tok, '^(%d+):')
    if tonumber(a) >= maxd then
      redis.call('HSET', KEYS[2], o, a .. '|0|' .. ARGV[4])
      out[#out + 1] = 2
    else
      redis.call('ZADD', KEYS[1], fmt('%d', now + ms), o .. ':' .. a)
      out[#out + 1] = 1
    end
  end
end
return out
