-- license_follow_policy.lua: copies a policy revision into a license's policy snapshot, so
-- that the license's scripts check its limits from the license's own keys (one cluster slot).
-- The snapshot holds only the fields the scripts read; the `p_json` copy of the whole policy
-- that earlier versions kept is dropped when a revision is applied.
--
-- KEYS[1]  license hash               (keys.license)
-- KEYS[2]  policy mailbox             (keys.policy_mailbox)
-- ARGV[1]  policy revision
-- ARGV[2]  mailbox TTL (ms): for a license not written yet (being created); 0 = none
-- ARGV[3..] field, value pairs of the snapshot (p_uses, p_machines, ..., `p_meters` and one
--           `pm:<code>` per meter: the fields of meters the policy no longer has are dropped,
--           with their counters, and an empty `p_meters` is not kept)
--
-- Returns 1 when applied, 0 when the license is already at this revision or newer (or gone
-- for good), 2 when the license does not exist yet and the revision was left in its mailbox
-- for license_create.lua.

local rev = redis.call('HGET', KEYS[1], 'p_rev')
if not rev then
  if tonumber(ARGV[2]) <= 0 then
    return 0
  end
  local waiting = redis.call('HGET', KEYS[2], 'p_rev')
  if not waiting or tonumber(waiting) < tonumber(ARGV[1]) then
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[2], 'p_rev', ARGV[1], unpack(ARGV, 3))
    redis.call('PEXPIRE', KEYS[2], ARGV[2])
  end
  return 2
end
if tonumber(rev) >= tonumber(ARGV[1]) then
  return 0
end
local old_meters = redis.call('HGET', KEYS[1], 'p_meters')
redis.call('HSET', KEYS[1], 'p_rev', ARGV[1], unpack(ARGV, 3))
redis.call('HDEL', KEYS[1], 'p_json')
forget_meters(KEYS[1], old_meters)
return 1
