#!lua flags=allow-oom
-- group_touch.lua: move a group's membership version (a topic it reads
-- was deleted or grew), so that its members rebalance. A script only for
-- its flag: `allow-oom` lets a topic be deleted on a full server (to free
-- memory) without failing at this last step (a plain HINCRBY is refused).
--
-- KEYS[1] group meta (hash: mv)
return redis.call("HINCRBY", KEYS[1], "mv", 1)
