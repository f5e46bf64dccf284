-- license_follow_policy.lua: copies a policy revision into a license's policy snapshot, so
-- that the license's scripts check its limits from the license's own keys (one cluster slot).
--
-- KEYS[1]  license hash               (keys.license)
-- ARGV[1]  policy revision
-- ARGV[2..] field, value pairs of the snapshot (p_json, p_uses, ...)
--
-- Returns 1 when applied, 0 when the license is gone or already at this revision or newer.

local rev = redis.call('HGET', KEYS[1], 'p_rev')
if not rev or tonumber(rev) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'p_rev', ARGV[1], unpack(ARGV, 2))
return 1
