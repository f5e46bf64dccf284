-- policy_attach.lua: registers a new license with its policy, if the policy exists, and
-- returns the policy, so that DeletePolicy can never orphan a license being created.
--
-- KEYS[1]  policy hash                (keys.policy)
-- KEYS[2]  licenses of the policy     (keys.policy_licenses)
-- ARGV[1]  license id
--
-- Returns {json, rev} of the policy, or false when the policy does not exist.

local p = redis.call('HMGET', KEYS[1], 'json', 'rev')
if not p[1] then
  return false
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return p
