-- policy_delete.lua: deletes a policy unless licenses still use it.
--
-- KEYS[1]  policy hash                (keys.policy)
-- KEYS[2]  licenses of the policy     (keys.policy_licenses)
-- KEYS[3]  propagation lease          (keys.policy_lease)
--
-- Returns 0 when deleted, -1 when the policy does not exist, else the number of licenses
-- registered with it (nothing deleted). Registered ids whose license does not exist (a create
-- or delete cut short) are removed by the caller, which then tries again.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local n = redis.call('ZCARD', KEYS[2])
if n > 0 then
  return n
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 0
