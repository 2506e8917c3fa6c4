#!lua flags=allow-oom
-- commit_init.lua: a stream-mode group's first commit in a partition
-- (start `latest`), unless it has one. A script only for its flag:
-- `allow-oom` lets a member join when the server is full (a plain HSETNX
-- is refused then).
--
-- KEYS[1] group commits (hash: topic id/partition -> offset)
-- ARGV[1] field, ARGV[2] offset
return redis.call("HSETNX", KEYS[1], ARGV[1], ARGV[2])
