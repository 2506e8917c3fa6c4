#!lua flags=allow-oom
-- group_register.lua: list a group in the namespace's registry (join).
-- A script only for its flag: `allow-oom` lets a member join when the
-- server is full (a plain SADD is refused then), as joins must.
--
-- KEYS[1] registry groups (set)
-- ARGV[1] group name
return redis.call("SADD", KEYS[1], ARGV[1])
