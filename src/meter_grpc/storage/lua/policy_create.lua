-- policy_create.lua: writes a new policy, once. The policy's id is already in the index of all
-- policies (an index entry without its policy is skipped by readers and removed once it is
-- older than the ghost age), so a crash at any point leaves nothing a user can see as wrong.
--
-- KEYS[1]  policy hash                (keys.policy)
-- ARGV[1]  policy JSON (revision 1)
-- ARGV[2]  now (ms, wall clock: the clock the id was minted with)
-- ARGV[3]  the time the id was minted (ms)
-- ARGV[4]  the create window (ms): past it the id may be taken for a ghost and is not used
--
-- Returns {1, json, rev, propagated} when created, {2, json, rev, propagated} when the policy
-- existed already (a retried create), {0} when the window has passed (nothing written).

local p = redis.call('HMGET', KEYS[1], 'json', 'rev', 'synced')
if p[1] then
  return {2, p[1], p[2], p[3] or p[2]}
end
if tonumber(ARGV[2]) - tonumber(ARGV[3]) > tonumber(ARGV[4]) then
  return {0}
end
redis.call('HSET', KEYS[1], 'json', ARGV[1], 'rev', 1, 'synced', 1)
return {1, ARGV[1], '1', '1'}
