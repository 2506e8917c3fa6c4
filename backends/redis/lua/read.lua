-- read.lua: a partition's bounds and up to `count` records from `from`.
--
-- KEYS[1] partition meta (hash: end, start, bytes, lastts)
-- KEYS[2] partition log (stream)
-- ARGV[1] first offset wanted
-- ARGV[2] most records to return (0: bounds only)
-- Returns {start, end, bytes, entries} (entries as XRANGE gives them).
-- Error "NOTOPIC" when the partition does not exist. Read only.
local m = redis.call('HMGET', KEYS[1], 'start', 'end', 'bytes')
if not m[1] then
  return redis.error_reply('NOTOPIC partition does not exist')
end
local from = tonumber(ARGV[1])
if from < tonumber(m[1]) then from = tonumber(m[1]) end
local entries = {}
if tonumber(ARGV[2]) > 0 and from < tonumber(m[2]) then
  entries = redis.call('XRANGE', KEYS[2], from .. '-1', '+', 'COUNT', ARGV[2])
end
return {tonumber(m[1]), tonumber(m[2]), tonumber(m[3]), entries}
