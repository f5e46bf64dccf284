-- policy_propagated.lua: records that every license of the policy follows a revision.
--
-- KEYS[1]  policy hash                (keys.policy)
-- ARGV[1]  the revision every license now follows (or a newer one)
--
-- Returns the policy's current revision (higher than ARGV[1] when it changed meanwhile: that
-- change is still to propagate), or -1 when the policy is gone.

local f = redis.call('HMGET', KEYS[1], 'rev', 'synced')
if not f[1] then
  return -1
end
if tonumber(f[2] or 0) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'synced', ARGV[1])
end
return tonumber(f[1])
