-- policy_update.lua: replaces a policy if it is still at the revision the caller read
-- (optimistic concurrency: the caller re-reads and retries on a conflict).
--
-- KEYS[1]  policy hash                (keys.policy)
-- ARGV[1]  expected revision
-- ARGV[2]  new policy JSON (with the new revision in it)
--
-- Returns the new revision, 0 on a revision conflict, -1 when the policy does not exist.

local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev then
  return -1
end
if rev ~= ARGV[1] then
  return 0
end
local new = redis.call('HINCRBY', KEYS[1], 'rev', 1)
redis.call('HSET', KEYS[1], 'json', ARGV[2])
return new
