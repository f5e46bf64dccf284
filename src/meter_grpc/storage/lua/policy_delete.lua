-- policy_delete.lua: deletes a policy unless licenses still use it.
--
-- KEYS[1]  policy hash                (keys.policy)
-- KEYS[2]  licenses of the policy     (keys.policy_licenses)
--
-- Returns 0 when deleted, -1 when the policy does not exist, else the number of licenses
-- that still use it (nothing deleted).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local n = redis.call('ZCARD', KEYS[2])
if n > 0 then
  return n
end
redis.call('DEL', KEYS[1], KEYS[2])
return 0
