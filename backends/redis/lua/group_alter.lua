#!lua flags=allow-oom
-- group_alter.lua: change a group's settings explicitly (alter_group,
-- contract §4), as a compare-and-set on the stored config, so that two
-- alters at once do not lose one's changes. Members read `session`,
-- `visibility` and `maxd` at each heartbeat, lease and failure, so they
-- follow.
--
-- KEYS[1] group meta (hash; see join.lua)
-- ARGV[1] the config JSON the change was computed from
-- ARGV[2] the new config JSON
-- ARGV[3] session timeout, ms
-- ARGV[4] visibility timeout, ms
-- ARGV[5] max deliveries
-- Returns 1 when stored, 0 when the config changed meanwhile (read it
-- again and retry). Error "NOGROUP" when the group does not exist.
local stored = redis.call('HGET', KEYS[1], 'config')
if not stored or redis.call('HEXISTS', KEYS[1], 'mode') == 0 then
  return redis.error_reply('NOGROUP group does not exist')
end
if stored ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'config', ARGV[2], 'session', ARGV[3], 'visibility', ARGV[4],
  'maxd', ARGV[5])
return 1
