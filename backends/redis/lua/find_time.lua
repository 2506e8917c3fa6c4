#!lua flags=no-writes
-- find_time.lua: the first offset whose timestamp is >= a time (seek by
-- timestamp). Timestamps never decrease within a partition, so this is a
-- binary search over the dense offsets start..end.
--
-- KEYS[1] partition meta (hash: end, start, ...)
-- KEYS[2] partition log (stream)
-- ARGV[1] the time, ms since the epoch
-- Returns the offset (the log end when every record is older).
-- Error "NOTOPIC" when the partition does not exist. Read only.
local m = redis.call('HMGET', KEYS[1], 'start', 'end')
if not m[1] then
  return redis.error_reply('NOTOPIC partition does not exist')
end
local lo, hi = tonumber(m[1]), tonumber(m[2])
local want = tonumber(ARGV[1])
while lo < hi do
  local mid = math.floor((lo + hi) / 2)
  local e = redis.call('XRANGE', KEYS[2], string.format('%d', mid), '+', 'COUNT', 1)
  if #e == 0 then return hi end
  -- The append time: the entry id's second part ("N-T"), or the field
  -- `t` of an entry written before ids carried it ("N-1").
  local ts = tonumber(string.match(e[1][1], '-(%d+)$'))
  local f = e[1][2]
  for i = 1, #f, 2 do if f[i] == 't' then ts = tonumber(f[i + 1]) end end
  if ts >= want then hi = mid else lo = mid + 1 end
end
return lo
