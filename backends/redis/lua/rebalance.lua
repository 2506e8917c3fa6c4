#!lua flags=allow-oom
-- rebalance.lua: install the owners a member computed with core's sticky
-- assignment, if membership has not changed since it read it (a
-- compare-and-set on mv). Bumps the generation; a partition whose owner
-- stays keeps the generation it was got in, a moved one gets the new one.
--
-- KEYS[1] group meta (hash: gen, mv, done_mv, parts)
-- KEYS[2] owners (hash: "topic/partition" -> "member:generation")
-- ARGV[1] the mv the assignment was computed for
-- ARGV[2] the partition count it covered (topics' partitions summed)
-- ARGV[3..] pairs: "topic/partition", member id
-- Returns the new generation, or 0 when membership changed meanwhile
-- (nothing written; read again and retry).
if redis.call('HGET', KEYS[1], 'mv') ~= ARGV[1] then return 0 end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
local cur = redis.call('HGETALL', KEYS[2])
local old = {}
for i = 1, #cur, 2 do old[cur[i]] = cur[i + 1] end
local keep = {}
for i = 3, #ARGV, 2 do
  local tp, member = ARGV[i], ARGV[i + 1]
  keep[tp] = true
  local o = old[tp]
  if not (o and string.match(o, '^(%d+):') == member) then
    redis.call('HSET', KEYS[2], tp, member .. ':' .. gen)
  end
end
for tp, _ in pairs(old) do
  if not keep[tp] then redis.call('HDEL', KEYS[2], tp) end
end
redis.call('HSET', KEYS[1], 'done_mv', ARGV[1], 'parts', ARGV[2])
return gen
