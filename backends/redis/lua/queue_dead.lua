#!lua flags=allow-oom
-- queue_dead.lua: the dead-letter moves of one partition's group (contract
-- §5). "claim" takes up to ARGV[2] waiting moves not claimed in the last
-- ARGV[3] ms (so two members never move the same message at once, and a
-- mover that died is replaced); "done" settles moved messages for good.
--
-- KEYS[1] dead letters to move (hash: offset -> "attempts|claimed until|error")
-- ARGV[1] "claim" or "done"
-- claim: ARGV[2] most moves, ARGV[3] claim time, ms
--   Returns {offset, attempts, error, ...}.
-- done: ARGV[2..] offsets. Returns how many were settled. Safe to retry.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'done' then
  local n = 0
  for i = 2, #ARGV do
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
  return n
end
local max, hold = tonumber(ARGV[2]), tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if #out >= max * 3 then break end
  local a, until_, err = string.match(all[i + 1], '^(%d+)|(%d+)|(.*)$')
  if a and tonumber(until_) <= now then
    redis.call('HSET', KEYS[1], all[i], a .. '|' .. string.format('%d', now + hold) .. '|' .. err)
    out[#out + 1] = all[i]
    out[#out + 1] = a
    out[#out + 1] = err
  end
end
return out
