-- license_create.lua: writes a new license, once. The license is already registered with its
-- policy (policy_attach.lua), in the index of all licenses and under its key, so every index
-- that could point at it does before it exists: a crash leaves index entries pointing nowhere,
-- which readers skip and repair, never a license missing from an index.
--
-- KEYS[1]  license hash               (keys.license)
-- KEYS[2]  policy mailbox             (keys.policy_mailbox)
-- KEYS[3]  tombstone                  (keys.license_tombstone)
-- ARGV[1]  now (ms, wall clock: the clock the id was minted with)
-- ARGV[2]  the time the id was minted (ms)
-- ARGV[3]  the create window (ms): past it the id may be taken for a ghost and is not used
-- ARGV[4..] field, value pairs of the license hash (with `p_rev` and the policy snapshot)
--
-- A policy revision that was propagated while the license was being created waits in the
-- mailbox (license_follow_policy.lua); it is applied here when newer than the snapshot.
-- Returns {1, hash} when created, {2, hash} when the license existed already (a retried
-- create), {0} when the window has passed (nothing written), {3} when the license was
-- created and deleted since (a late retry). `hash` is a flat field list.

if redis.call('EXISTS', KEYS[1]) == 1 then
  return {2, redis.call('HGETALL', KEYS[1])}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {3}
end
if tonumber(ARGV[1]) - tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  return {0}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
local mailbox = redis.call('HGETALL', KEYS[2])
if #mailbox > 0 then
  local rev = tonumber(redis.call('HGET', KEYS[2], 'p_rev'))
  if rev > tonumber(redis.call('HGET', KEYS[1], 'p_rev')) then
    local old_meters = redis.call('HGET', KEYS[1], 'p_meters')
    redis.call('HSET', KEYS[1], unpack(mailbox))
    forget_meters(KEYS[1], old_meters)
    redis.call('HDEL', KEYS[1], 'p_json') -- a mailbox left by an earlier version
  end
  redis.call('DEL', KEYS[2])
end
return {1, redis.call('HGETALL', KEYS[1])}
