#!lua flags=allow-oom
-- commit.lua: a stream-mode commit, fenced (contract §4a): it lands only
-- if the member still owns the partition in the generation it got it in.
--
-- KEYS[1] owners (hash: "topic/partition" -> "member:generation")
-- KEYS[2] committed offsets (hash: "topic id/partition" -> offset)
-- ARGV[1] "topic/partition"
-- ARGV[2] "topic id/partition"
-- ARGV[3] "member:generation" of the committer
-- ARGV[4] the offset (the next one to read)
-- ARGV[5] "1": cumulative (never moves the commit back), "0": as given
-- ARGV[6] "1": check the generation too, "0": the member only
-- Returns {1} when committed (or already past, if cumulative), else
-- {0, current owner or ""}. Safe to retry.
local owner = redis.call('HGET', KEYS[1], ARGV[1])
local ok = owner == ARGV[3]
if ARGV[6] == '0' and owner then
  ok = string.match(owner, '^(%d+):') == string.match(ARGV[3], '^(%d+):')
end
if not ok then return {0, owner or ''} end
if ARGV[5] == '1' then
  local cur = redis.call('HGET', KEYS[2], ARGV[2])
  if cur and tonumber(cur) >= tonumber(ARGV[4]) then return {1} end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
return {1}
