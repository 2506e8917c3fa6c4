#!lua flags=allow-oom
-- queue_migrate.lua: convert a queue-mode group's state in one partition
-- from the layout of four structures (leases, ready, attempts, lease
-- tokens) to the one sorted set (queue_settle.lua has its format): every
-- lease keeps its deadline, attempts and holder (the old token
-- "counter:member:poll" loses its counter), every waiting message
-- its time and attempts. The old keys are deleted. Safe to run again:
-- with no old keys it does nothing.
--
-- KEYS[1] state (zset, the new layout)
-- KEYS[2] old leases (zset: offset -> deadline)
-- KEYS[3] old ready (zset: offset -> when available)
-- KEYS[4] old attempts (hash: offset -> deliveries made)
-- KEYS[5] old lease tokens (hash: offset -> "counter:member:poll")
-- Returns how many messages were converted.
if redis.call('EXISTS', KEYS[2], KEYS[3], KEYS[4], KEYS[5]) == 0 then
  return 0
end
local attempts, tokens = {}, {}
local a = redis.call('HGETALL', KEYS[4])
for i = 1, #a, 2 do attempts[a[i]] = a[i + 1] end
local tk = redis.call('HGETALL', KEYS[5])
for i = 1, #tk, 2 do tokens[tk[i]] = tk[i + 1] end
local n = 0
local function put(o, at, tok)
  local m = o .. ':' .. (attempts[o] or '0')
  if tok then m = m .. ':' .. string.match(tok, '^%d+:(.*)$') end
  redis.call('ZADD', KEYS[1], at, m)
  n = n + 1
end
local l = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #l, 2 do put(l[i], l[i + 1], tokens[l[i]]) end
local r = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #r, 2 do put(r[i], r[i + 1], nil) end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return n
